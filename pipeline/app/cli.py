"""The ``kd3`` command line.

Every subcommand takes ``--config run.yaml`` and/or ``--run runs/<name>``, and every config field
as a flag (``--crawl.per_class 50``, ``--curate.relevance_filter``) or as ``--set key=value``.
User mistakes end with ``kd3: error: <one line>`` and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from distill.teacher_cli import add_teacher_arguments, teacher_cli
from pipeline.core import interrupt, plugins
from pipeline.core.config import DistillConfig, RunConfig, iter_fields, load_config, moved_distill_keys, parse_override_value
from pipeline.core.errors import ConfigError, Kd3Error, report
from pipeline.core.logs import setup_logging
from pipeline.core.preflight import STAGES, preflight
from pipeline.core.runlock import RunLocked, run_lock

from .inspect_cli import add_inspect_arguments, inspect_cli

log = logging.getLogger("kd3")

SECTIONS_OF = {
    "crawl": ("crawl",),
    "curate": ("curate",),
    "distill": ("distill",),
    "run": ("crawl", "curate", "distill", "flow", "loop"),
    "serve": ("crawl", "curate", "distill", "flow", "loop"),
}


class Kd3ArgumentParser(argparse.ArgumentParser):
    """Every ``kd3`` parser: no prefix abbreviations (``--crawl.per_clas`` is not ``--crawl.per_class``),
    and a bad command line is one line, ``kd3: error: ...``, naming the closest known flag or command."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras:  # each (sub)parser refuses what it does not know, so the hint names its own flags
            flag = next((x for x in extras if x.startswith("-")), None)
            if flag is None:
                self.error(f"unexpected argument {' '.join(extras)!r}")
            self.error(f"unknown flag {flag.split('=', 1)[0]}{self._closest(flag.split('=', 1)[0], self._flags())}")
        return ns, extras

    def _flags(self) -> list[str]:
        return [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings]

    @staticmethod
    def _closest(word: str, choices: list[str]) -> str:
        near = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        return f"; did you mean {near[0]}?" if near else ""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip(" '") for c in m.group(2).split(",")]
            message = f"unknown {'command' if 'COMMAND' in message or 'ACTION' in message else 'value'} " \
                      f"{m.group(1)!r}{self._closest(m.group(1), choices)}"
        self.exit(2, f"kd3: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _metavar(ann: Any) -> str:
    """What a config flag takes, for --help: {a,b} for a choice, N, X, PATH, TEXT, A,B for lists."""
    args = [a for a in (typing.get_args(ann) or (ann,)) if a is not type(None)]
    if _is_list(ann) or (len(args) == 1 and _is_list(args[0])):
        return "A,B,..."
    if typing.get_origin(ann) is typing.Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(ann)) + "}"
    if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
        return _metavar(args[0])
    if typing.get_origin(ann) is dict or (len(args) == 1 and typing.get_origin(args[0]) is dict):
        return "YAML"
    names = {getattr(a, "__name__", str(a)) for a in args}
    for kinds, meta in ((("int",), "N"), (("float",), "X"), (("Path",), "PATH")):
        if names and names <= set(kinds):
            return meta
    return "TEXT"


def _is_text_type(ann: Any) -> bool:
    args = typing.get_args(ann) or (ann,)
    return all(a in (str, Path, type(None)) for a in args)


def _is_bool(ann: Any) -> bool:
    args = [a for a in (typing.get_args(ann) or (ann,)) if a is not type(None)]
    return args == [bool]


def _is_list(ann: Any) -> bool:
    return typing.get_origin(ann) is list


def _convert(ann: Any, raw: str) -> Any:
    """Text fields stay text; lists take ``a,b,c`` or YAML ``[a, b]``; the rest is read as YAML."""
    if _is_list(ann):
        if raw.lstrip().startswith("["):
            return parse_override_value(raw)
        text_items = typing.get_args(ann)[0] is str
        return [x.strip() if text_items else parse_override_value(x.strip()) for x in raw.split(",") if x.strip()]
    if _is_text_type(ann):
        return raw
    return parse_override_value(raw)


def add_config_arguments(p: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", "-c", type=Path, metavar="RUN.YAML", help="YAML run config")
    g.add_argument("--run", type=Path, metavar="RUNS/NAME",
                   help="existing run directory runs/<name> (its config.yaml is the base)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set crawl.per_class=50 (repeatable)")
    groups: dict[str, argparse._ArgumentGroup] = {"": g}
    for dotted, ann, info in iter_fields(RunConfig):
        section = dotted.split(".")[0] if "." in dotted else ""
        if section and section not in sections:
            continue
        if section not in groups:
            groups[section] = p.add_argument_group(f"{section} config")
        flag = "--" + dotted if section else "--" + dotted.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        help_ = (info.description or "") + (f" (default: {default})" if default not in (None, [], {}) else "")
        help_ = help_.replace("%", "%%")
        if _is_bool(ann):
            groups[section].add_argument(flag, dest="ov__" + dotted, action=argparse.BooleanOptionalAction,
                                         default=None, help=help_)
        else:
            groups[section].add_argument(flag, dest="ov__" + dotted, default=None, metavar=_metavar(ann),
                                         type=lambda raw, ann=ann: ("raw", ann, raw), help=help_)
    if "distill" in sections:  # the flat keys of old: accepted here so the config names their new place
        method_settings = [s for _, s in DistillConfig.plugin_fields()]
        for old in moved_distill_keys():
            info = next((s.model_fields[old] for s in method_settings if old in s.model_fields), None)
            kind = argparse.BooleanOptionalAction if info is not None and info.annotation is bool else "store"
            g.add_argument("--distill." + old, dest="ov__distill." + old, action=kind, default=None,
                           help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides: dict[str, Any] = {}
    base = args.config
    if getattr(args, "manifest", None) is not None and args.run is None:
        if not Path(args.manifest).is_file():
            raise ConfigError(f"manifest {args.manifest} does not exist")
        args.run = Path(args.manifest).parent
    if args.run is not None and base is None:
        cand = Path(args.run) / "config.yaml"
        if cand.is_file():
            base = cand
        elif not Path(args.run).is_dir():
            raise ConfigError(f"run directory {args.run} does not exist")
    flags: dict[str, str] = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = parse_override_value(v)
        flags[k.strip()] = f"--set {k.strip()}"
    for key, val in vars(args).items():
        if key.startswith("ov__") and val is not None:
            dotted, _, typed = key[4:].partition("#")  # a shortcut's dest names its flag: errors blame it
            if isinstance(val, tuple) and val[:1] == ("raw",):
                val = _convert(val[1], val[2])
            overrides[dotted] = val
            flags[dotted] = typed or f"--{dotted}"
    if args.run is not None:
        run = Path(args.run)
        overrides["name"] = run.name
        overrides["runs_root"] = str(run.parent)
    return load_config(base, overrides, flags)


def add_logging_arguments(p: argparse.ArgumentParser) -> None:
    """``-v`` (other libraries' INFO; ``-vv`` DEBUG) and ``--log-level`` (kd3's own lines), where missing."""
    have = {o for a in p._actions for o in a.option_strings}
    if "-v" not in have:
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="also show other libraries' INFO lines (Prefect, httpx, faiss, open_clip); -vv: DEBUG")
    if "--log-level" not in have:
        p.add_argument("--log-level", default=os.environ.get("KD3_LOG_LEVEL", "INFO"), metavar="LEVEL",
                       help="level of kd3's own log lines (default: INFO)")


def _leaf_parsers(p: argparse.ArgumentParser):
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for a in subs:
        for child in dict.fromkeys(a.choices.values()):
            yield from _leaf_parsers(child)


# ---- subcommand handlers: each imports its stage when it runs, so `kd3 --help` and config errors
# stay fast (the stages bring requests/icrawler, open_clip/FAISS, torch, Prefect) ----

def _locked(cfg: RunConfig, stage: str, join: Optional[str] = None):
    """A stage run from the CLI writes its run directory alone, like a flow (pipeline.core.runlock), with the
    other nodes of its multi-node distill (``join``); a run directory that is not there yet is left for the
    stage to create or to report missing."""
    if stage != "crawl" and not Path(cfg.run_dir).is_dir():
        return contextlib.nullcontext()
    return run_lock(cfg.run_dir, f"kd3 {stage}" + (f" {join}" if join else ""), join)


def _cmd_crawl(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    preflight(cfg, ["crawl"])
    from crawlers.stage import crawl  # heavy: see above

    with _locked(cfg, "crawl"):
        summary = crawl(cfg)
    return 0 if summary.get("ok", True) else 1


def _cmd_curate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    preflight(cfg, ["curate"])
    from pipeline.curate import curate  # heavy: see above

    with _locked(cfg, "curate"):
        curate(cfg)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from distill.launch import distill_cli, rendezvous_id  # heavy: see above
    from distill.stage import output_dir

    if cfg.flow.nodes > 1:  # one node of several: the lock may be another node's, or a flow's not yet at distill
        with _node_lock(cfg, rendezvous_id(cfg, output_dir(cfg, args.out_id))):
            return distill_cli(cfg, args)
    join = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        join = "torchrun-" + os.environ["TORCHELASTIC_RUN_ID"]  # the ranks of a torchrun the user started
    with _locked(cfg, "distill", join):
        return distill_cli(cfg, args)


NODE_WAIT_S = 600.0  # as long as torchrun's rendezvous waits for the other nodes


@contextlib.contextmanager
def _node_lock(cfg: RunConfig, join: str):
    """The run lock for one node of a multi-node distill: taken, or joined once its holder (another node, or
    the flow that reaches distill later) lets this rendezvous in; until then it waits, up to NODE_WAIT_S."""
    deadline, said = time.monotonic() + NODE_WAIT_S, False
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(_locked(cfg, "distill", join))
                break
            except RunLocked as e:
                if time.monotonic() > deadline:
                    raise
                if not said:
                    log.info("%s; waiting up to %.0f s for it to let distill %s in", e, NODE_WAIT_S, join)
                    said = True
                time.sleep(2.0)
        yield


def _cmd_inspect(args: argparse.Namespace) -> int:
    return inspect_cli(args)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    manifest = Path(cfg.run_dir) / "manifest.json"
    preflight(cfg, [args.stage] if args.stage else STAGES, manifest if manifest.is_file() else None)
    from flows.cli import run_cli  # heavy (Prefect): see above

    return run_cli(cfg, args)


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    from flows.cli import serve_cli  # heavy (Prefect): see above

    return serve_cli(cfg, args)


def _cmd_teacher(args: argparse.Namespace) -> int:
    return teacher_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Kd3ArgumentParser(
        prog="kd3",
        description="Distill a small student from your teacher on curated web images (KD³, ICCV 2023).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Kd3ArgumentParser)

    def add(name: str, handler: Callable, help_: str, extra: Callable | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if name in SECTIONS_OF:
            add_config_arguments(p, SECTIONS_OF[name])
        if extra is not None:
            extra(p)
        p.set_defaults(handler=handler)
        return p

    add("crawl", _cmd_crawl, "crawl the web for images of each class into runs/<name>/crawl/")
    add("curate", _cmd_curate, "validate, deduplicate, embed, index, decontaminate and shard the crawl")

    def shortcut(g, flag: str, key: str, typ: type, metavar: str, help_: str) -> None:
        """``flag`` sets config ``key`` (= ``--set key=VALUE``); an error in its value names ``flag``."""
        g.add_argument(flag, dest=f"ov__{key}#{flag}", type=lambda s: ("raw", typ, s), metavar=metavar, help=help_)

    def distill_extra(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("distill shortcuts")
        g.add_argument("--manifest", type=Path, metavar="MANIFEST.JSON", help="manifest.json of a curated run (sets --run)")
        shortcut(g, "--student", "distill.student", str, "ARCH", "student architecture (= --distill.student)")
        shortcut(g, "--method", "distill.method", str, "METHOD", "kd3, kd or dfnd (= --distill.method)")
        shortcut(g, "--epochs", "distill.epochs", int, "N", "epochs (= --distill.epochs)")
        shortcut(g, "--eval-dir", "distill.eval_dir", str, "PATH",
                 "labelled ImageFolder of original-domain images (= --distill.eval_dir)")
        g.add_argument("--out-id", metavar="ID", help="name of the output folder distill/<method>-<id> (default: derived)")
        g.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
        m = p.add_argument_group("several processes or machines (torchrun; the same command on every node)")
        shortcut(m, "--nproc-per-node", "flow.gpus", int, "G", "ranks on this node, one per GPU (= --set flow.gpus=G)")
        shortcut(m, "--nnodes", "flow.nodes", int, "N", "machines taking part (= --set flow.nodes=N); needs --rdzv")
        shortcut(m, "--rdzv", "flow.rdzv", str, "HOST:PORT",
                 "rendezvous every node reaches, on one of them (= --set flow.rdzv=HOST:PORT)")

    add("distill", _cmd_distill, "distill a student from the teacher on the curated shards", distill_extra)

    sub_inspect = sub.add_parser("inspect", help="summarise a run; HTML report; nearest neighbours; contact sheets")
    add_inspect_arguments(sub_inspect)
    sub_inspect.set_defaults(handler=_cmd_inspect)

    def run_extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stage", choices=["crawl", "curate", "distill"],
                       help="rerun only this stage on an existing run")
        p.add_argument("--loop", type=int, metavar="N",
                       help="then N rounds of the crawl-selection loop (flow kd3-loop; settings: --loop.*)")

    add("run", _cmd_run, "run the end-to-end Prefect flow (embedded local mode, no server needed)", run_extra)

    def serve_extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cron", help='schedule of the end-to-end deployment, e.g. "0 3 * * *"')

    add("serve", _cmd_serve, "serve Prefect deployments for the end-to-end flow and each stage", serve_extra)

    teacher = sub.add_parser("teacher", help="train or describe a teacher checkpoint")
    add_teacher_arguments(teacher)
    teacher.set_defaults(handler=_cmd_teacher)

    for name in plugins.names("kd3.commands"):  # subcommands from other packages (kd3demo: `kd3 demo`)
        plugins.load("kd3.commands", name)(sub)
    for leaf in _leaf_parsers(parser):
        add_logging_arguments(leaf)
    return parser


def _on_interrupt(signum, frame):  # pragma: no cover - exercised by a subprocess test
    """Ctrl-C: tell worker threads to stop (crawl downloads look at it), then interrupt the main thread."""
    interrupt.request_stop()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"), getattr(args, "verbose", 0))
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_interrupt) if on_main else None
    interrupt.reset()
    try:
        return _run(args)
    finally:
        if on_main:
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace) -> int:
    """The subcommand; a user mistake, Ctrl-C or a full disk end in one line (exit 2, 130, 2)."""
    try:
        return int(args.handler(args) or 0)
    except Kd3Error as e:
        return report(e)
    except KeyboardInterrupt:
        print("kd3: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk is the user's to fix: one line, finished work is kept
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"kd3: error: {e.strerror or e}{where}: free space and rerun the same command; "
              "finished files are kept and nothing half-written was left", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
