#!/bin/sh
# Start a kd3 Prefect worker: create its process work pool, register the deployments, then poll.
#   start-worker.sh cpu   -> pool kd3-cpu: kd3-pipeline, kd3-crawl, kd3-curate
#   start-worker.sh gpu   -> pool kd3-gpu: kd3-distill
set -eu
kind="$1"
pool="kd3-${kind}"
prefect work-pool create "$pool" --type process 2>/dev/null || true
python -m flows.deploy --config "${KD3_CONFIG:-/app/docker/run.yaml}" --pools "$kind" \
    ${KD3_CRON:+--cron "$KD3_CRON"}
exec prefect worker start --pool "$pool" --type process --limit "${KD3_WORKER_LIMIT:-2}"
