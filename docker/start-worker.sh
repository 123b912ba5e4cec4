#!/bin/sh
# Start a kd3 Prefect worker: make sure its process work pool exists, register the deployments, then poll.
#   start-worker.sh cpu   -> pool kd3-cpu: kd3-pipeline, kd3-crawl, kd3-curate (KD3_WORKER_LIMIT runs at once)
#   start-worker.sh gpu   -> pool kd3-gpu: kd3-distill, one run at a time: a distill takes every GPU the
#                            container reserves (KD3_GPUS = the config's flow.gpus), two would share them
# Any error stops the worker: an unreachable API or a rejected PREFECT_API_AUTH_STRING in one line (checked
# first, healthcheck.py --api), a config that cannot be registered with kd3's one-line error.
set -eu
kind="$1"
pool="kd3-${kind}"
case "$kind" in
  cpu) limit="${KD3_WORKER_LIMIT:-2}" ;;
  gpu) limit=1 ;;
  *) echo "start-worker.sh: expected cpu or gpu, got '$kind'" >&2; exit 2 ;;
esac
python "$(dirname "$0")/healthcheck.py" --api
if ! prefect work-pool inspect "$pool" >/dev/null 2>&1; then
  prefect work-pool create "$pool" --type process
fi
python -m flows.deploy --config "${KD3_CONFIG:-/app/docker/run.yaml}" --pools "$kind" \
    ${KD3_CRON:+--cron "$KD3_CRON"}
# --with-healthcheck: the container's health check asks this worker (port 8080), not the server
exec prefect worker start --pool "$pool" --type process --limit "$limit" --with-healthcheck
