"""Shared by the deployment tests: the stack tool, the run's name, a Prefect API helper."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import local_stack as ls  # noqa: E402,F401

RUN = "deploy"
# flow runs send a heartbeat every 30 s (Prefect's minimum); one silent for 60 s is marked Crashed
UNRESPONSIVE_S = 60


class Api:
    """Triggers deployment runs and waits for them, with the synchronous Prefect client."""

    def client(self):
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    def trigger(self, deployment: str, config: Optional[dict] = None, run_name: Optional[str] = None):
        params: dict = {}
        if config is not None:
            params["config"] = config
        if run_name is not None:
            params["run_name"] = run_name
        with self.client() as c:
            dep = c.read_deployment_by_name(deployment)
            return c.create_flow_run_from_deployment(dep.id, parameters=params)

    def read(self, flow_run_id):
        with self.client() as c:
            return c.read_flow_run(flow_run_id)

    def wait(self, flow_run_id, timeout: float = 420, until=lambda fr: fr.state is not None and fr.state.is_final()):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                fr = self.read(flow_run_id)
            except Exception:  # noqa: BLE001 - the API may be down on purpose (the fault tests)
                fr = None
            if fr is not None and until(fr):
                return fr
            time.sleep(2)
        raise AssertionError(f"flow run {flow_run_id} not there within {timeout}s: "
                             f"{fr.state.type if fr and fr.state else 'unknown'}")
