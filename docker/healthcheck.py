"""Container health check: GET <api>/health (with the basic-auth string when one is configured)."""
import base64
import os
import sys
import urllib.request

url = os.environ.get("KD3_HEALTH_URL") or os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api")
req = urllib.request.Request(url.rstrip("/") + "/health")
auth = os.environ.get("PREFECT_API_AUTH_STRING") or os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
if auth:
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # noqa: BLE001
    print(f"unhealthy: {e}", file=sys.stderr)
    sys.exit(1)
