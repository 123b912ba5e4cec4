#!/usr/bin/env python3
"""docker-compose.yml's stack without Docker: Postgres, the Prefect server on it, the CPU and GPU workers.

    python tools/local_stack.py up --dir /tmp/kd3-stack --config my-run.yaml   # prints the env to export
    python tools/local_stack.py status --dir /tmp/kd3-stack
    python tools/local_stack.py down --dir /tmp/kd3-stack

The same processes the compose file runs, read from the compose file itself (one source: each
service's command and environment, with the file's ``${VAR:-default}`` interpolation), mapped from
the containers to this host: ``/app`` is this checkout, ``postgres:5432`` and ``prefect-server:4200``
are free ports on 127.0.0.1, each worker's health server gets a port of its own.

- Postgres: ``initdb`` of a fresh data directory (as the ``postgres`` user when run as root: initdb and
  postgres refuse root), started on 127.0.0.1 only, a ``prefect`` role with a generated password and a
  ``prefect`` database.
- The Prefect server: the compose command on ``postgresql+asyncpg://``, with a generated
  ``PREFECT_SERVER_API_AUTH_STRING`` (basic auth) unless one is set.
- The workers: ``docker/start-worker.sh cpu|gpu`` (the script the containers run), each in its own
  process group, polling ``kd3-cpu`` / ``kd3-gpu``.

Nothing listens on anything but 127.0.0.1. Logs: ``<dir>/logs/``; state: ``<dir>/stack.json``. ``down``
stops the workers, the server, then Postgres, and checks that no process of the stack is left.
Anything wrong (no Postgres binaries, a port taken, a worker that cannot register) ends with one line
naming it and exit 2.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
SERVICES = {"server": "prefect-server", "cpu": "worker-cpu", "gpu": "worker-gpu"}
PG_USER = "postgres"  # the OS user Debian's package creates; initdb/postgres run as it when we are root
START_TIMEOUT_S = float(os.environ.get("KD3_STACK_TIMEOUT_S", "180"))


class StackError(Exception):
    """One line naming what is wrong."""


# ------------------------------------------------------------------ the compose file, interpolated

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(5)
        colon, op, arg = m.group(2), m.group(3), m.group(4)
        value = env.get(name)
        unset = value is None or (colon == ":" and value == "")
        if op == "-" and unset:
            return interpolate(arg, env)
        if op == "?" and unset:
            raise StackError(f"{COMPOSE.name}: {name}: {arg or 'required'}")
        return value or ""

    return _VAR.sub(sub, text)


def _interpolated(obj, env: dict[str, str]):
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [_interpolated(x, env) for x in obj]
    if isinstance(obj, dict):
        return {k: _interpolated(v, env) for k, v in obj.items()}
    return obj


def compose_services(env: dict[str, str], path: Path = COMPOSE) -> dict[str, dict]:
    """Each service's ``command`` (a list) and ``environment`` (str -> str) as the compose file resolves
    them with ``env``: YAML anchors and merge keys, then interpolation (what ``docker compose config`` does)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    out = {}
    for name, svc in raw["services"].items():
        svc = _interpolated(svc, env)
        envmap = svc.get("environment") or {}
        if isinstance(envmap, list):
            envmap = dict(item.split("=", 1) for item in envmap)
        out[name] = {"command": svc.get("command"),
                     "environment": {k: "" if v is None else str(v) for k, v in envmap.items()}}
    return out


# ------------------------------------------------------------------ from the containers to this host

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int, what: str) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"port {port} on 127.0.0.1 ({what}) is taken: choose another or stop what uses it") from None
    return port


def localize(value: str, st: dict) -> str:
    """A compose value as it reads on this host: the service names and /app replaced."""
    value = value.replace("@postgres:5432/", f"@127.0.0.1:{st['pg']['port']}/")
    value = value.replace("http://prefect-server:4200", f"http://127.0.0.1:{st['server']['port']}")
    value = value.replace("http://127.0.0.1:4200", f"http://127.0.0.1:{st['server']['port']}")
    return str(REPO) + value[len("/app"):] if value == "/app" or value.startswith("/app/") else value


def local_command(cmd: list[str], st: dict) -> list[str]:
    out = [localize(c, st) for c in cmd]
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(st["server"]["port"]))):
        if flag in out:
            out[out.index(flag) + 1] = value
    return ["sh", out[0], *out[1:]] if out[0].endswith(".sh") else out


def process_env(service_env: dict[str, str], st: dict, extra: Optional[dict] = None) -> dict[str, str]:
    """This process's environment (PATH with this interpreter's bin first), a Prefect home of the stack's
    own, then the service's environment as it reads here."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_HOME"] = str(Path(st["dir"]) / "prefect-home")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout's code
    env.pop("PREFECT_API_URL", None)
    env.update({k: localize(v, st) for k, v in service_env.items()})
    env.update(extra or {})
    return env


# ------------------------------------------------------------------ processes

def _log_tail(path: Path, n: int = 1) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    """Start ``cmd`` in its own process group (session), output to ``log``; returns its pid (= pgid)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    return p.pid


def group_alive(pgid: Optional[int]) -> bool:
    if not pgid:
        return False
    _reap(pgid)  # a leader that is our exited child would otherwise linger as a zombie
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: Optional[int]) -> bool:
    """The process exists and is not a zombie."""
    if not pid:
        return False
    _reap(pid)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc."""
    kids: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(") ", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def stop_group(pgid: Optional[int], grace_s: float = 15.0, sig: int = signal.SIGTERM) -> list[int]:
    """Signal a process group and every process below its leader (a process worker starts each flow run in
    a session of its own, which a group signal misses); SIGKILL what is left after ``grace_s``. Returns the
    processes still alive after that (none)."""
    if not group_alive(pgid):
        return []
    below = descendants(pgid)

    def signal_all(s: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, s)
        for v in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(v, s)

    def gone() -> bool:
        return not group_alive(pgid) and not any(alive(v) for v in below)

    for s, wait_s in ((sig, grace_s), (signal.SIGKILL, 10.0)):
        signal_all(s)
        t0 = time.monotonic()
        while not gone() and time.monotonic() - t0 < wait_s:
            time.sleep(0.2)
        if gone():
            return []
    return [p for p in [pgid, *below] if alive(p)]


def http_ok(url: str, auth: Optional[str] = None, timeout: float = 3.0) -> bool:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def wait_until(ready, pid: Optional[int], what: str, log: Path, timeout: float = START_TIMEOUT_S) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready():
            return time.monotonic() - t0
        if pid is not None and not alive(pid):
            tail = _log_tail(log)
            raise StackError(f"{what} exited before it was ready{': ' + tail if tail else ''} (log: {log})")
        time.sleep(0.3)
    raise StackError(f"{what} was not ready within {timeout:g}s (log: {log})")


# ------------------------------------------------------------------ Postgres

def postgres_bindir() -> Path:
    """``KD3_PG_BINDIR`` when set; else the folder of ``pg_ctl`` on PATH, else the newest Debian install."""
    given = os.environ.get("KD3_PG_BINDIR")
    if given:
        cands, where = [Path(given)], f"in KD3_PG_BINDIR={given}"
    else:
        found = shutil.which("pg_ctl")
        debian = sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0], reverse=True)
        cands, where = [Path(found).resolve().parent] * bool(found) + debian, "on PATH or under /usr/lib/postgresql/*/bin"
    for d in cands:
        if all((d / b).is_file() for b in ("initdb", "pg_ctl", "postgres")):
            return d
    raise StackError(f"no Postgres server binaries (initdb, pg_ctl, postgres) {where}: install them "
                     "(Debian: apt-get install postgresql) or point KD3_PG_BINDIR at their folder")


def _as_pg_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        raise StackError(f"running as root, but there is no '{PG_USER}' user to run Postgres as "
                         "(initdb and postgres refuse root): install Debian's postgresql package") from None
    return ["runuser", "-u", PG_USER, "--"]


def _pg(st: dict, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    pg = st["pg"]
    cmd = [*_as_pg_user(), str(Path(pg["bin"]) / tool), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    if check and r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()
        raise StackError(f"{tool} failed (exit {r.returncode}): {tail[-1] if tail else 'no output'}")
    return r


def pg_start(st: dict) -> None:
    pg = st["pg"]
    opts = f"-c listen_addresses=127.0.0.1 -p {pg['port']} -k {pg['home']}"
    _pg(st, "pg_ctl", "-D", pg["data"], "-l", pg["log"], "-w", "-t", "60", "-o", opts, "start")


def pg_stop(st: dict) -> None:
    pg = st["pg"]
    if Path(pg["data"], "postmaster.pid").exists():
        _pg(st, "pg_ctl", "-D", pg["data"], "-m", "fast", "-w", "-t", "60", "stop", check=False)


def pg_up(st: dict) -> None:
    pg = st["pg"]
    home = Path(tempfile.mkdtemp(prefix="kd3-pg-"))  # its own folder: the postgres user must reach it
    pg.update(home=str(home), data=str(home / "data"), log=str(home / "postgres.log"))
    if _as_pg_user():
        os.chown(home, pwd.getpwnam(PG_USER).pw_uid, pwd.getpwnam(PG_USER).pw_gid)
    su = PG_USER if _as_pg_user() else pwd.getpwuid(os.geteuid()).pw_name
    _pg(st, "initdb", "-D", pg["data"], "-U", su, "--auth-local=peer", "--auth-host=scram-sha-256",
        "-E", "UTF8", "--no-instructions")
    pg_start(st)
    link = Path(st["dir"]) / "logs" / "postgres.log"
    link.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        link.symlink_to(pg["log"])
    sql = [f"CREATE ROLE prefect LOGIN PASSWORD '{pg['password']}'", "CREATE DATABASE prefect OWNER prefect"]
    for stmt in sql:
        _pg(st, "psql", "-h", pg["home"], "-p", str(pg["port"]), "-U", su, "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-q", "-c", stmt)


def pg_down(st: dict) -> None:
    pg = st.get("pg") or {}
    if pg.get("data"):
        pg_stop(st)
    if pg.get("home"):
        shutil.rmtree(pg["home"], ignore_errors=True)


# ------------------------------------------------------------------ the stack

def _state_path(d: Path) -> Path:
    return d / "stack.json"


def load_state(d: Path) -> dict:
    p = _state_path(d)
    if not p.is_file():
        raise StackError(f"{p} does not exist: no stack was brought up with --dir {d}")
    return json.loads(p.read_text())


def save_state(st: dict) -> None:
    p = _state_path(Path(st["dir"]))
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(st, indent=2))
    tmp.replace(p)


def compose_env(st: dict) -> dict[str, str]:
    """The variables the compose file is interpolated with (the ``.env`` a Docker user writes)."""
    env = dict(os.environ)
    env.update(POSTGRES_PASSWORD=st["pg"]["password"], PREFECT_SERVER_API_AUTH_STRING=st["auth"],
               KD3_CONFIG=st["config"], KD3_GPUS=st.get("gpus", env.get("KD3_GPUS", "1")))
    return env


def api_env(st: dict) -> dict[str, str]:
    """What a client (the prefect CLI, a test) sets to talk to this stack."""
    return {"PREFECT_API_URL": f"http://127.0.0.1:{st['server']['port']}/api", "PREFECT_API_AUTH_STRING": st["auth"]}


def server_start(st: dict) -> float:
    svc = compose_services(compose_env(st))[SERVICES["server"]]
    log = Path(st["dir"]) / "logs" / "server.log"
    env = process_env(svc["environment"], st)
    st["server"]["pid"] = spawn(local_command(svc["command"], st), env, log)
    save_state(st)
    url = api_env(st)["PREFECT_API_URL"]
    return wait_until(lambda: http_ok(url + "/health") and http_ok(url + "/admin/version", st["auth"]),
                      st["server"]["pid"], "the Prefect server", log)


def worker_start(st: dict, kind: str, extra_env: Optional[dict] = None, wait: bool = True) -> float:
    """``docker/start-worker.sh <kind>`` with the compose service's environment; ready once its health
    server answers (it registered the deployments and polls its pool)."""
    svc = compose_services(compose_env(st))[SERVICES[kind]]
    port = free_port()
    env = process_env(svc["environment"], st, {"PREFECT_WORKER_WEBSERVER_PORT": str(port),
                                                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                                                "KD3_HEALTH_URL": f"http://127.0.0.1:{port}", **(extra_env or {})})
    log = Path(st["dir"]) / "logs" / f"worker-{kind}.log"
    pid = spawn(local_command(svc["command"], st), env, log)
    st["workers"][kind] = {"pid": pid, "port": port, "log": str(log)}
    save_state(st)
    if not wait:
        return 0.0
    return wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/health"), pid, f"the {kind} worker", log)


def worker_stop(st: dict, kind: str, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> list[int]:
    w = st["workers"].get(kind) or {}
    return stop_group(w.get("pid"), grace_s=grace_s, sig=sig)


def up(d: Path, config: Path, workers: list[str], pg_port: Optional[int] = None,
       api_port: Optional[int] = None, auth: Optional[str] = None) -> dict:
    d = d.resolve()
    if _state_path(d).is_file() and any(group_alive(p) for p in _pids(load_state(d))):
        raise StackError(f"a stack is already up in {d}: `down` it first")
    if not config.is_file():
        raise StackError(f"--config {config}: no such file")
    bindir = postgres_bindir()
    _as_pg_user()
    st = {"dir": str(d), "config": str(config.resolve()), "auth": auth or f"kd3:{secrets.token_hex(12)}",
          "pg": {"bin": str(bindir), "port": check_port(pg_port, "Postgres") if pg_port else free_port(),
                 "password": secrets.token_hex(16)},
          "server": {"port": check_port(api_port, "Prefect API") if api_port else free_port()}, "workers": {}}
    (d / "logs").mkdir(parents=True, exist_ok=True)
    save_state(st)
    try:
        t0 = time.monotonic()
        pg_up(st)
        save_state(st)
        st["timings_s"] = {"postgres": round(time.monotonic() - t0, 1)}
        st["timings_s"]["server"] = round(server_start(st), 1)
        for kind in workers:
            st["timings_s"][f"worker-{kind}"] = round(worker_start(st, kind), 1)
        save_state(st)
    except BaseException:
        down(d)
        raise
    return st


def _pids(st: dict) -> list[int]:
    return [p for p in [(st.get("server") or {}).get("pid"), *((w or {}).get("pid") for w in st.get("workers", {}).values())] if p]


def down(d: Path) -> list[int]:
    """Stop the workers (and any flow run below them), the server, then Postgres; returns the processes
    still alive (none)."""
    st = load_state(d.resolve())
    left = []
    for kind in list(st.get("workers", {})):
        left += worker_stop(st, kind)
    left += stop_group((st.get("server") or {}).get("pid"))
    pg_down(st)
    left += [p for p in _pids(st) if group_alive(p)]
    if not left:
        _state_path(d.resolve()).unlink(missing_ok=True)
    return left


def status(d: Path) -> dict:
    st = load_state(d.resolve())
    url = api_env(st)["PREFECT_API_URL"]
    return {"api": url, "api_healthy": http_ok(url + "/health"),
            "postgres": Path(st["pg"].get("data", "/nonexistent"), "postmaster.pid").exists(),
            **{f"worker-{k}": alive(w.get("pid")) for k, w in st.get("workers", {}).items()}}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="tools/local_stack.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kd3-stack",
                   help="state and logs of the stack (default: $TMPDIR/kd3-stack)")
    p.add_argument("--config", type=Path, default=REPO / "docker" / "run.yaml",
                   help="the run config the workers register deployments for (KD3_CONFIG)")
    p.add_argument("--workers", default="cpu,gpu", help="which workers to start: cpu,gpu, cpu, gpu or none")
    p.add_argument("--pg-port", type=int, help="Postgres port (default: a free one)")
    p.add_argument("--api-port", type=int, help="Prefect API/UI port (default: a free one)")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            workers = [w for w in args.workers.split(",") if w and w != "none"]
            bad = set(workers) - {"cpu", "gpu"}
            if bad:
                raise StackError(f"--workers {args.workers!r}: expected cpu, gpu, cpu,gpu or none")
            st = up(args.dir, args.config, workers, args.pg_port, args.api_port,
                    os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or None)
            for k, v in api_env(st).items():
                print(f"export {k}={v}")
            print(f"# up in {st['timings_s']}; UI http://127.0.0.1:{st['server']['port']}; logs {args.dir.resolve()}/logs",
                  file=sys.stderr)
        elif args.action == "down":
            left = down(args.dir)
            if left:
                raise StackError(f"process groups still alive after down: {left}")
        else:
            print(json.dumps(status(args.dir), indent=2))
    except StackError as e:
        print(f"local_stack: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
