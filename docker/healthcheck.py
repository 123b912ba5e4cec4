"""Health checks of the kd3 stack (the containers' and docker/start-worker.sh's).

``python healthcheck.py``        container health: GET <KD3_HEALTH_URL or PREFECT_API_URL>/health
``python healthcheck.py --api``  before a worker starts: can this process use the Prefect API? An
                                 authenticated call (``/admin/version``) with ``PREFECT_API_AUTH_STRING``;
                                 a server that is still starting is waited for (``KD3_API_WAIT_S``, 60 s);
                                 a rejected auth string or an unreachable API ends in one line, exit 1.
"""
import base64
import os
import sys
import time
import urllib.error
import urllib.request


def _get(url: str, auth: str | None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def container_health() -> int:
    url = os.environ.get("KD3_HEALTH_URL") or os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    try:
        return 0 if _get(url.rstrip("/") + "/health", auth) == 200 else 1
    except Exception as e:  # noqa: BLE001
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


def api_usable() -> int:
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not api:
        print("start-worker.sh: PREFECT_API_URL is not set: the worker has no Prefect API to poll", file=sys.stderr)
        return 1
    auth = os.environ.get("PREFECT_API_AUTH_STRING") or None
    deadline = time.monotonic() + float(os.environ.get("KD3_API_WAIT_S", "60"))
    while True:
        try:
            _get(api + "/admin/version", auth)
            return 0
        except urllib.error.HTTPError as e:
            if e.code == 401:
                told = "a wrong PREFECT_API_AUTH_STRING" if auth else "no PREFECT_API_AUTH_STRING"
                print(f"start-worker.sh: the Prefect API at {api} answered 401 Unauthorized to {told}: set it to "
                      f"the server's PREFECT_SERVER_API_AUTH_STRING", file=sys.stderr)
                return 1
            err = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            err = str(getattr(e, "reason", e))
        if time.monotonic() > deadline:
            print(f"start-worker.sh: the Prefect API at {api} is unreachable: {err}", file=sys.stderr)
            return 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(api_usable() if "--api" in sys.argv[1:] else container_health())
