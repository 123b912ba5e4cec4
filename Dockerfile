# kd3 image: the Prefect server, the CPU worker and the GPU worker of docker-compose.yml all run it.
# CUDA wheels of torch run on CPU too, so one image serves both workers.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    XDG_CACHE_HOME=/cache

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

# The torch build kd3 is tested with (the Makefile's TORCH_REQ pins; tests/flows/test_compose.py keeps the
# two equal). The constraints file keeps `pip install -e .` from replacing it.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
RUN printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /etc/kd3-torch.txt \
 && pip install --index-url "${TORCH_INDEX_URL}" -c /etc/kd3-torch.txt torch torchvision

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY crawlers ./crawlers
COPY distill ./distill
COPY flows ./flows
COPY docker ./docker
RUN pip install -c /etc/kd3-torch.txt -e .[server]

RUN useradd --create-home --uid 1000 kd3 && mkdir -p /runs /cache && chown kd3 /runs /cache
USER kd3
VOLUME ["/runs", "/cache"]
EXPOSE 4200
CMD ["kd3", "--help"]
