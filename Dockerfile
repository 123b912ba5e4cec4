# kd3 image: the Prefect server, the CPU worker and the GPU worker of docker-compose.yml all run it.
# CUDA wheels of torch run on CPU too, so one image serves both workers.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    KD3_RUNS=/runs

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.3" "torchvision>=0.18"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY crawlers ./crawlers
COPY distill ./distill
COPY flows ./flows
COPY kd3demo ./kd3demo
COPY docker ./docker
RUN pip install -e . asyncpg

RUN useradd --create-home --uid 1000 kd3 && mkdir -p /runs && chown kd3 /runs
USER kd3
VOLUME ["/runs"]
EXPOSE 4200
CMD ["kd3", "--help"]
