"""``kd3 inspect``: look at a run (any stage done so far) in the terminal, as contact sheets, as neighbours.

* ``kd3 inspect runs/<name>`` (or its manifest.json): per-class table (crawled, valid, duplicates,
  contaminated, off-class, kept, shards, bytes) and the distill runs with accuracy and selection rates.
* ``--html``: the static report ``runs/<name>/report/index.html`` (see :mod:`pipeline.app.report`).
* ``--similar IMG|KEY [-k 16]`` / ``--text "a photo of a dog"``: nearest neighbours in the FAISS index.
* ``--class C --sheet out.png``: one class's contact sheet.

Everything works on partial runs: what is missing is said, not crashed on.
"""
from __future__ import annotations

import io
import itertools
import logging
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import yaml
from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.core.config import load_config
from pipeline.core.errors import DataError, Kd3Error
from pipeline.core.records import DROP_REASONS, VALIDATE_REASONS, CrawlRecord, Decision, DropReason, \
    SelectionRow, iter_decisions, iter_records, read_decisions, read_embeddings, read_index, read_manifest, \
    read_metrics, read_pool_keys, read_records, read_selection
from pipeline.core.runs import RunDir, run_dir_of
from pipeline.curate.embed import make_embedder
from pipeline.curate.scan import work_side
from pipeline.curate.validate import inspect_image

from .sheets import ACCENTS, Tile, write_sheet

log = logging.getLogger("kd3.inspect")

COUNT_FIELDS = ("crawled", "downloaded", "errors", "valid", *DROP_REASONS, "kept", "shards", "bytes")


@dataclass
class DistillRun:
    name: str
    path: Path
    metrics: dict
    selection: list[SelectionRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.selection = [r if isinstance(r, SelectionRow) else SelectionRow.from_row(r) for r in self.selection]

    @property
    def final(self) -> dict:
        return self.metrics.get("final") or {}

    @property
    def epochs(self) -> list[dict]:
        return self.metrics.get("epochs") or []

    @property
    def selects(self) -> bool:
        """True when the log names a subset per epoch (kd3); False for "all" (kd, dfnd) or no log."""
        return any(r.selects for r in self.selection)

    def selected_keys(self, pool: Optional[Iterable[str]] = None) -> set[str]:
        """Union over epochs of the selected keys, whatever form each row takes (keys, "all", mask)."""
        out: set[str] = set()
        for row in self.selection:
            out |= row.keys(pool or [], self.path)
        return out


class Run:
    """Everything present in a run directory, loaded lazily; absent parts are None / empty."""

    def __init__(self, path: str | Path):
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p} does not exist (expected a run directory or its manifest.json)")
        if p.is_file() and p.suffix != ".json" and p.name != "config.yaml":
            raise DataError(f"{p}: expected a run directory or its manifest.json")
        self.rd: RunDir = run_dir_of(p)
        self.manifest_path = p if p.is_file() and p.suffix == ".json" else self.rd.manifest
        if not self.rd.root.is_dir():
            raise DataError(f"run directory {self.rd.root} does not exist")
        marks = (self.rd.config, self.rd.crawl, self.rd.curate, self.manifest_path)
        if not any(m.exists() for m in marks):
            raise DataError(f"{self.rd.root} is not a run directory: it has none of config.yaml, crawl/, curate/, "
                            f"manifest.json (kd3 writes runs under <runs_root>/<name>/)")

    # ---- raw parts ----
    @cached_property
    def manifest(self) -> Optional[dict]:
        return read_manifest(self.manifest_path) if self.manifest_path.is_file() else None

    @cached_property
    def records(self) -> list[CrawlRecord]:
        return read_records(self.rd.records)

    @cached_property
    def decisions(self) -> list[Decision]:
        return read_decisions(self.rd.decisions)

    def each_record(self) -> Iterator[CrawlRecord]:
        """The crawl records a row at a time, unless they are loaded already (the summary holds none: a pool's
        records run to 10^6 rows)."""
        if "records" in self.__dict__:
            return iter(self.records)
        return iter_records(self.rd.records) if self.rd.records.is_file() else iter(())

    def each_decision(self) -> Iterator[Decision]:
        """The curate decisions a row at a time, unless they are loaded already."""
        if "decisions" in self.__dict__:
            return iter(self.decisions)
        return iter_decisions(self.rd.decisions) if self.rd.decisions.is_file() else iter(())

    @cached_property
    def distill_runs(self) -> list[DistillRun]:
        out = []
        if not self.rd.distill.is_dir():
            return out
        for mpath in sorted(self.rd.distill.glob("*/metrics.json")):
            try:
                metrics = read_metrics(mpath)
            except DataError as e:
                log.warning("skipping %s", e)
                continue
            sel = read_selection(mpath.parent / "selection.jsonl")
            out.append(DistillRun(mpath.parent.name, mpath.parent, metrics, sel))
        return out

    @cached_property
    def config_classes(self) -> list[str]:
        if not self.rd.config.is_file():
            return []
        try:
            data = yaml.safe_load(self.rd.config.read_text(encoding="utf-8")) or {}
            return [str(c) for c in (data.get("classes") or [])]
        except Exception:  # noqa: BLE001 - a broken config only costs the class order
            return []

    @cached_property
    def classes(self) -> list[str]:
        if self.manifest and self.manifest.get("classes"):
            return list(self.manifest["classes"])
        seen = list(self.config_classes)
        for row in itertools.chain(self.each_decision(), self.each_record()):
            c = row.cls
            if c is not None and c not in seen:
                seen.append(c)
        return seen

    # ---- derived ----
    @cached_property
    def by_id(self) -> dict[str, Decision]:
        """id -> first decision row (same content in two classes shares the id)."""
        out: dict[str, Decision] = {}
        for d in self.decisions:
            out.setdefault(d.id, d)
        return out

    @cached_property
    def by_key(self) -> dict[str, Decision]:
        return {d.key: d for d in self.decisions if d.key}

    @cached_property
    def pool_keys(self) -> dict[str, str]:
        """Shard key -> class of every kept sample."""
        return {d.key: d.cls for d in self.each_decision() if d.kept and d.key}

    def class_bytes(self) -> dict[str, int]:
        """class -> bytes of its kept samples' members in the shards (tar headers only are read)."""
        out: dict[str, int] = Counter()
        if not self.manifest:
            return out
        keys, base = self.pool_keys, self.manifest_path.parent
        for s in self.manifest.get("shardlist", []):
            path = base / s["url"]
            if not path.is_file():
                continue
            try:
                with tarfile.open(path) as tf:
                    for ti in tf:
                        cls = keys.get(ti.name.split(".", 1)[0]) if ti.isfile() else None
                        if cls is not None:
                            out[cls] += ti.size
            except tarfile.TarError as e:
                raise DataError(f"shard {path} is not a readable tar ({e})") from None
        return out

    def image_file(self, row: Union[Decision, CrawlRecord]) -> Optional[Path]:
        p = row.path
        if not p:
            return None
        path = self.rd.root / p
        return path if path.is_file() else None

    def missing(self) -> list[str]:
        """One line per stage output that is not there yet."""
        out = []
        rd = self.rd
        if not rd.records.is_file():
            out.append(f"no crawl records ({rd.records.relative_to(rd.root)}): run `kd3 crawl`")
        if not rd.decisions.is_file():
            out.append(f"not curated yet ({rd.decisions.relative_to(rd.root)} missing): run `kd3 curate`")
        if self.manifest is None:
            out.append("no manifest.json: no shards to distill from yet (`kd3 curate`)")
        else:
            base = self.manifest_path.parent
            gone = [s["url"] for s in self.manifest.get("shardlist", []) if not (base / s["url"]).is_file()]
            if gone:
                out.append(f"{len(gone)} shard(s) listed in the manifest are missing, e.g. {gone[0]}")
        if rd.decisions.is_file() and not rd.index.is_file():
            out.append("no FAISS index (curate/index.faiss): --similar/--text unavailable")
        if not self.distill_runs:
            out.append("no distill runs (distill/*/metrics.json): run `kd3 distill`")
        return out


def _rate(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or not b:
        return None
    return a / b


def _count_records(run: Run, per: dict) -> None:
    for c in run.classes:
        per[c].update(crawled=0, downloaded=0, errors=0)
    for r in run.each_record():
        if r.cls not in per:
            continue
        per[r.cls]["crawled"] += 1
        if r.status == "ok":
            per[r.cls]["downloaded"] += 1
        elif r.status == "error":
            per[r.cls]["errors"] += 1


def _count_decisions(run: Run, per: dict, has_records: bool) -> tuple[dict[str, set], int]:
    """Per class: valid, each drop reason, kept. Returns the shards each class's kept samples lie in and how
    many distinct images are kept; one pass over the decisions, none of them held."""
    for c in run.classes:
        per[c].update({k: 0 for k in ("valid", *DROP_REASONS, "kept")})
        if per[c]["downloaded"] is None:
            per[c]["downloaded"] = 0
    shards_of: dict[str, set] = defaultdict(set)
    kept_ids = bytearray()  # 64 bytes per kept image (its sha256 in hex), not a set of strings
    keys: dict[str, str] = {}
    for d in run.each_decision():
        if d.kept:
            kept_ids += d.id.encode().ljust(64, b"\0")[:64]
            if d.key:
                keys[d.key] = d.cls
                if d.shard:
                    shards_of[d.cls].add(d.shard)
        if d.cls not in per:
            continue
        row = per[d.cls]
        if not has_records:
            row["downloaded"] += 1
        if d.reason is not None:
            row[d.reason.value] += 1
        if d.reason is None or d.reason.group != "validate":
            row["valid"] += 1
        if d.kept:
            row["kept"] += 1
    run.__dict__.setdefault("pool_keys", keys)  # Run.pool_keys from this pass, not another read of the file
    return shards_of, len(np.unique(np.frombuffer(bytes(kept_ids), "S64")))


def _count_shards(run: Run, per: dict, has_decisions: bool, shards_of: dict[str, set]) -> None:
    bytes_of = run.class_bytes() if has_decisions else {}
    for c in run.classes:
        per[c]["shards"] = len(shards_of.get(c, ()))
        per[c]["bytes"] = int(bytes_of.get(c, 0))
        if not has_decisions:
            per[c]["kept"] = int((run.manifest.get("class_counts") or {}).get(c, 0))


def teacher_text(teacher: Any, top1: Optional[float]) -> Optional[str]:
    """The teacher of a distill run in one phrase: ``cnn_small · 10 classes · top-1 96.9%``."""
    if teacher is None:
        return None
    if not isinstance(teacher, dict):
        parts = [Path(str(teacher)).name]
    else:
        parts = [str(teacher.get("arch") or Path(str(teacher.get("path") or "teacher")).name)]
        if teacher.get("classes"):
            parts.append(f"{len(teacher['classes'])} classes")
    if top1 is not None:
        parts.append(f"top-1 {_pct(top1)}")
    return " · ".join(parts)


def selection_counts(run: Run, dr: DistillRun, row: Optional[SelectionRow], selected: dict) -> dict:
    """One epoch's selected images per class, with what each count is out of.

    kd3 counts a selected image under the class its teacher/student mix predicts, so the count is out of
    the pool images with that predicted label (``pred_counts`` in its selection log); methods that log no
    predictions count by query label, out of the pool images of that query class (``pool_keys.txt``, or
    the kept images when the run has no key list)."""
    classes = run.classes
    pred = (row.extra.get("pred_counts") if row is not None else None) or None
    if pred is not None and len(pred) == len(classes):
        of = {c: int(pred[i]) for i, c in enumerate(classes)}
        by = "teacher label"
    else:
        keys_path = dr.path / "pool_keys.txt"
        keys = read_pool_keys(keys_path) if keys_path.is_file() else list(run.pool_keys)
        cnt = Counter(run.pool_keys.get(k) for k in keys)
        of = {c: cnt.get(c, 0) for c in classes}
        by = "query label"
    return {"by": by, "selected": {c: selected.get(c) for c in classes}, "of": of,
            "rate": {c: _rate(selected.get(c), of[c]) if c in selected else None for c in classes}}


def _distill_rows(run: Run) -> list[dict]:
    out = []
    for dr in run.distill_runs:
        f = dr.final
        last = dr.epochs[-1] if dr.epochs else {}
        last_row = next((r for r in reversed(dr.selection) if r.epoch == last.get("epoch")), None)
        sel = selection_counts(run, dr, last_row, last.get("selected_per_class") or {})
        out.append({
            "name": dr.name, "method": dr.metrics.get("method"), "student": dr.metrics.get("student"),
            "teacher": teacher_text(dr.metrics.get("teacher"), f.get("teacher_top1")), "epochs": len(dr.epochs),
            "top1": f.get("top1", last.get("eval_top1")), "teacher_top1": f.get("teacher_top1"),
            "agreement": f.get("agreement", last.get("val_agreement")), "params": f.get("params"),
            "flops_per_image": f.get("flops_per_image"), "cpu_latency_ms_b1": f.get("cpu_latency_ms_b1"),
            "cpu_latency_ms_b64": f.get("cpu_latency_ms_b64"),
            "throughput_img_s": f.get("throughput_img_s"), "selected_fraction": f.get("selected_fraction"),
            "eval": f.get("eval"), "selection_by": sel["by"], "selected_last": sel["selected"],
            "selected_of": sel["of"], "selection_rate": sel["rate"], "has_selection_log": dr.selects,
            "finished": bool(dr.metrics.get("final")), "confusion": f.get("confusion"),
        })
    return out


def summarize(run_dir: str | Path) -> dict:
    """All the numbers ``kd3 inspect`` prints, as a dict (JSON-able)."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    classes = run.classes
    per: dict[str, dict[str, Any]] = {c: {k: None for k in COUNT_FIELDS} for c in classes}
    has_records = run.rd.records.is_file()
    has_decisions = run.rd.decisions.is_file()
    if has_records:
        _count_records(run, per)
    shards_of: dict[str, set] = {}
    kept_unique = 0
    if has_decisions:
        shards_of, kept_unique = _count_decisions(run, per, has_records)
    if run.manifest is not None:
        _count_shards(run, per, has_decisions, shards_of)
    totals: dict[str, Any] = {}
    for k in COUNT_FIELDS:
        vals = [per[c][k] for c in classes if per[c][k] is not None]
        totals[k] = sum(vals) if vals else None
    if run.manifest is not None:
        totals["shards"] = len(run.manifest.get("shardlist", []))
    if has_decisions:
        totals["kept_unique"] = kept_unique
    m = run.manifest or {}
    return {
        "run": run.rd.name, "root": str(run.rd.root), "classes": classes, "per_class": per, "totals": totals,
        "funnel": _funnel(totals, has_records, has_decisions), "stats": m.get("stats") or {},
        "distill": _distill_rows(run), "missing": run.missing(),
        "manifest": {k: m.get(k) for k in ("name", "nsamples", "class_counts", "embedding", "thresholds",
                                           "config_hash", "created", "versions")} if m else None,
        "present": {"records": has_records, "decisions": has_decisions, "manifest": run.manifest is not None,
                    "index": run.rd.index.is_file(), "distill": bool(run.distill_runs)},
    }


def _funnel(t: dict, has_records: bool, has_decisions: bool) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    if has_records:
        out.append(("URLs tried", t["crawled"]))
    if t.get("downloaded") is not None:
        out.append(("downloaded", t["downloaded"]))
    if has_decisions:
        n = t["valid"]
        out.append(("valid", n))
        n -= sum(t[r.value] for r in DropReason if r.group == "duplicate")
        out.append(("unique", n))
        n -= t["contaminated"]
        out.append(("uncontaminated", n))
        n -= t["off_class"]
        out.append(("on-class", n))
        out.append(("kept", t["kept"]))
    return out


# ---------------------------------------------------------------- terminal output

def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "–"
    x = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if x < 1000 or unit == "TB":
            return f"{x:.0f}{unit}" if unit == "B" else f"{x:.1f}{unit}"
        x /= 1000
    return str(n)


def fmt(v: Any) -> str:
    return "–" if v is None else str(v)


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def render_summary(s: dict, console=None) -> None:
    """Print the summary dict as rich tables."""
    con = console or Console()
    m = s.get("manifest") or {}
    head = f"[bold]run[/bold] {s['run']}  [dim]{s['root']}[/dim]"
    if m:
        emb = m.get("embedding") or {}
        head += (f"\n[bold]manifest[/bold] {m.get('nsamples')} samples, created {m.get('created')}, "
                 f"config {m.get('config_hash')}, embedding {emb.get('backend')}:{emb.get('model')}")
    con.print(head)
    t = Table(title="per class  (duplicates: exact / pHash / near / cross-class)", title_justify="left",
              header_style="bold", show_footer=True, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))
    cols = [("class", "class"), ("crawled", "crawl"), ("downloaded", "ok"), ("valid", "valid"),
            ("exact_dup", "exact"), ("phash_dup", "pHash"), ("near_dup", "near"),
            ("cross_class_dup", "xcls"), ("contaminated", "cont"), ("off_class", "off"),
            ("kept", "kept"), ("shards", "shards"), ("bytes", "bytes")]
    tot = s["totals"]
    for key, label in cols:
        if key == "class":
            t.add_column(label, footer="total", style="bold", overflow="fold", min_width=5)
        else:
            foot = fmt_bytes(tot.get(key)) if key == "bytes" else fmt(tot.get(key))
            t.add_column(label, justify="right", footer=foot, no_wrap=True,
                         style="green" if key == "kept" else ("yellow" if key in DROP_REASONS else None))
    for c in s["classes"]:
        row = s["per_class"][c]
        t.add_row(c, *[fmt_bytes(row[k]) if k == "bytes" else fmt(row[k]) for k, _ in cols[1:]])
    con.print(t)
    inv = {r: tot.get(r) for r in VALIDATE_REASONS if tot.get(r)}
    if inv:
        con.print("[dim]invalid at validation: " + ", ".join(f"{DropReason(r).label} {n}" for r, n in inv.items())
                  + "[/dim]")
    if s["distill"]:
        d = Table(title="distill runs", title_justify="left", header_style="bold", box=box.SIMPLE_HEAD,
                  pad_edge=False)
        for col in ("run", "method", "student", "epochs", "top-1", "teacher", "agree", "selected", "params",
                    "MFLOPs", "ms b1/b64"):
            d.add_column(col, justify="left" if col in ("run", "method", "student") else "right")
        for r in s["distill"]:
            d.add_row(r["name"], fmt(r["method"]), fmt(r["student"]), str(r["epochs"]), _pct(r["top1"]),
                      _pct(r["teacher_top1"]), _pct(r["agreement"]), _pct(r["selected_fraction"]), *size_cells(r))
        con.print(d)
        con.print(selection_table(s))
    for line in s["missing"]:
        con.print(f"[yellow]missing:[/yellow] {line}")


def size_cells(r: dict) -> tuple[str, str, str]:
    """A distill run's deployed size beside its top-1: parameters, MFLOPs per image, CPU ms at batch 1 / 64."""
    lat = [r.get("cpu_latency_ms_b1"), r.get("cpu_latency_ms_b64")]
    return (f'{r["params"]:,}' if r.get("params") else "–",
            f'{r["flops_per_image"] / 1e6:.1f}' if r.get("flops_per_image") else "–",
            "/".join("–" if v is None else f"{v:.1f}" for v in lat))


def selection_table(s: dict) -> Table:
    """Last-epoch selection per class (rows) and distill run (columns): ``selected/of (share)``, where
    ``of`` is the number of pool images with the label the count is by (teacher label for kd3)."""
    sel = Table(title="selected in the last epoch, per class: selected/of the pool images with that label",
                title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    sel.add_column("class")
    for r in s["distill"]:
        sel.add_column(f"{r['name']}\n[dim]by {r['selection_by']}[/dim]", justify="right")
    for c in s["classes"]:
        cells = []
        for r in s["distill"]:
            n, of = r["selected_last"].get(c), r["selected_of"].get(c)
            cells.append("–" if n is None else f"{n}/{of} ({_pct(r['selection_rate'].get(c))})")
        sel.add_row(c, *cells)
    return sel


# ---------------------------------------------------------------- neighbours

def _lookup_embedding(run: Run, key: str):
    """Row of curate/embeddings.npy for an image id or key (any unique id prefix)."""
    emb, ids = read_embeddings(run.rd.require(run.rd.embeddings, "curate"),
                               run.rd.require(run.rd.embedding_ids, "curate"))
    key = key.lower()
    hits = [i for i, x in enumerate(ids) if x.lower().startswith(key)]
    if not hits:
        d = run.by_key.get(key)
        if d is not None:
            hits = [i for i, x in enumerate(ids) if x == d.id]
    if not hits:
        raise DataError(f"{key!r} is neither an image file nor an id/key in {run.rd.embedding_ids}")
    if len({ids[i] for i in hits}) > 1:
        raise DataError(f"key {key!r} is ambiguous in {run.rd.embedding_ids} ({len(hits)} ids start with it)")
    return np.asarray(emb[hits[0]], dtype=np.float32), ids[hits[0]]


def _run_config(run: Run):
    if not run.rd.config.is_file():
        raise DataError(f"{run.rd.config} is missing: cannot rebuild the embedding model of this run")
    return load_config(run.rd.config, {"name": run.rd.name, "runs_root": str(run.rd.root.parent)})


def _embedder(run: Run):
    """The embedding model the manifest names, built by the curate stage's own code (pipeline.curate.embed)."""
    emb = (run.manifest or {}).get("embedding") or {}
    if not emb:
        raise DataError(f"{run.manifest_path}: no `embedding` section; cannot embed a query the same way")
    cfg = _run_config(run)
    embedder = make_embedder(cfg.curate, run.classes, cfg.teacher)
    if emb.get("backend") and embedder.backend != emb.get("backend") or (
            emb.get("model") and embedder.model_name != emb.get("model")):
        raise DataError(f"{run.rd.config} now names {embedder.backend}:{embedder.model_name} but the index was "
                        f"built with {emb.get('backend')}:{emb.get('model')}; re-curate or restore the config")
    return embedder


def embed_image_file(run: Run, path: Path):
    """Embed one image file with the run's embedding model -> (dim,) float32, L2-normalised."""
    import torch  # heavy: only for --similar on a file

    try:
        data = Path(path).read_bytes()
        Image.open(io.BytesIO(data)).close()  # a file that is no image is refused before the model is built
    except Exception as e:  # noqa: BLE001
        raise DataError(f"--similar {path}: not a readable image ({e})") from None
    embedder = _embedder(run)
    f, img = inspect_image(data, _run_config(run).curate.max_pixels, work_side(embedder))  # as curate decoded the pool
    if img is None:
        raise DataError(f"--similar {path}: not a readable image ({f.error})")
    vec, _ = embedder.embed(torch.stack([embedder.preprocess(img)]))
    return vec[0]


def neighbours(run: Run, *, query_vec, k: int, exclude: Optional[str] = None) -> list[dict]:
    index, ids = read_index(run.rd.require(run.rd.index, "curate"), run.rd.require(run.rd.index_ids, "curate"))
    q = np.asarray(query_vec, dtype=np.float32).reshape(1, -1)
    if q.shape[1] != index.d:
        raise DataError(f"query embedding has dim {q.shape[1]} but {run.rd.index} has dim {index.d}")
    q = q / (np.linalg.norm(q) + 1e-12)
    n = min(index.ntotal, k + (1 if exclude else 0))
    if n == 0:
        return []
    scores, rows = index.search(q, n)
    out = []
    for s, r in zip(scores[0], rows[0]):
        if r < 0:
            continue
        iid = ids[r]
        if exclude and iid == exclude:
            continue
        d = run.by_id.get(iid) or run.by_key.get(iid)
        out.append({"rank": len(out) + 1, "score": float(s), "id": d.id if d else iid, "key": d.key if d else None,
                    "class": d.cls if d else None, "path": d.path if d else None})
        if len(out) >= k:
            break
    return out


def similar(run_dir: str | Path, query: str, k: int = 16) -> tuple[list[dict], dict]:
    """Neighbours of an image file or of an image id/key. Returns (hits, query-info)."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    qpath = Path(query)
    if qpath.is_file():
        vec = embed_image_file(run, qpath)
        info = {"query": str(qpath), "path": qpath, "id": None}
        return neighbours(run, query_vec=vec, k=k), info
    vec, iid = _lookup_embedding(run, query)
    d = run.by_id.get(iid)
    info = {"query": query, "id": iid, "path": run.image_file(d) if d else None, "class": d.cls if d else None}
    return neighbours(run, query_vec=vec, k=k, exclude=iid), info


def text_query(run_dir: str | Path, text: str, k: int = 16) -> list[dict]:
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    emb = (run.manifest or {}).get("embedding") if run.manifest else None
    if run.manifest is None:
        raise DataError(f"{run.manifest_path} is missing: run `kd3 curate` first")
    emb = emb or {}
    if emb.get("backend") != "clip":
        raise Kd3Error(f"--text needs CLIP embeddings; this run was embedded with the "
                       f"{emb.get('backend') or 'unknown'} backend (set curate.embed_backend=clip and re-curate)")
    trained = emb.get("trained")
    if trained is False or (trained is None and not emb.get("pretrained")):
        raise Kd3Error(f"--text needs real CLIP weights; this run's embeddings come from {emb.get('model')} "
                       "with random weights (set curate.clip_pretrained or curate.clip_weights and re-curate)")
    embedder = _embedder(run)
    if not getattr(embedder, "has_text", False):
        raise Kd3Error(f"--text: the {emb.get('backend')} embedder of this run cannot embed text")
    vec = embedder.text_embeddings([text])[0]
    return neighbours(run, query_vec=vec, k=k)


# ---------------------------------------------------------------- sheets

def neighbour_sheet(run: Run, hits: list[dict], out: Path, *, title: str, query_image=None) -> Path:
    tiles = []
    if query_image is not None:
        tiles.append(Tile(query_image, "query", "", ACCENTS["query"]))
    for h in hits:
        path = run.rd.root / h["path"] if h.get("path") else None
        tiles.append(Tile(path, f"#{h['rank']} {h.get('class') or ''}", f"{h['score']:.3f}  {(h.get('key') or h['id'])[:12]}"))
    return write_sheet(tiles, out, title=title, cols=min(9, max(1, len(tiles))), thumb=150)


def class_sheet(run_dir: str | Path, cls: str, out: str | Path, *, include_dropped: bool = True,
                limit: int = 200) -> Path:
    """Contact sheet PNG of one class: kept images first, then dropped ones with their reason."""
    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    if cls not in run.classes:
        raise DataError(f"class {cls!r} is not in run {run.rd.name} (classes: {', '.join(run.classes) or 'none'})")
    tiles: list[Tile] = []
    if run.decisions:
        rows = [d for d in run.decisions if d.cls == cls]
        kept = [d for d in rows if d.kept]
        dropped = [d for d in rows if not d.kept]
        dropped.sort(key=lambda d: DROP_REASONS.index(d.reason.value) if d.reason is not None else 99)
        for d in kept:
            tiles.append(Tile(run.image_file(d), d.key or d.id[:16], f"{d.w}x{d.h}", ACCENTS["kept"]))
        if include_dropped:
            for d in dropped:
                tiles.append(Tile(run.image_file(d), d.reason.label if d.reason else "dropped", d.detail or "",
                                  ACCENTS["dropped"]))
        sub = f"{len(kept)} kept (green), {len(dropped)} dropped (red)"
    else:
        rows = [r for r in run.records if r.cls == cls and r.status == "ok"]
        for r in rows:
            tiles.append(Tile(run.rd.root / r.path if r.path else None, (r.sha256 or "")[:16],
                              f"{r.w}x{r.h} {r.engine}"))
        sub = f"{len(rows)} downloaded (not curated yet)"
    if len(tiles) > limit:
        sub += f"; first {limit} of {len(tiles)} shown"
        tiles = tiles[:limit]
    return write_sheet(tiles, out, title=f"{run.rd.name} · {cls}", subtitle=sub, cols=10, thumb=128)
