"""kd3's Prefect flows. Importing this package sets kd3's defaults for Prefect before Prefect reads its
settings (each only when the environment does not set it already): no analytics or telemetry, and an
embedded-server start-up timeout that survives a loaded machine (Prefect's own default is 20 s)."""
import os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the embedded server would otherwise send telemetry
    "DO_NOT_TRACK": "1",                          # Prefect's client-side opt-out
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
for _k, _v in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_k, _v)
