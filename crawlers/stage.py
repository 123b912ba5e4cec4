"""The crawl stage: class names -> raw images with provenance in ``runs/<name>/crawl/``.

``crawl(cfg)`` runs every class; ``crawl_class(cfg, name)`` one (flows fan out on it);
``class_done(cfg, name)`` says whether a class reached ``crawl.per_class``.

Per class, sources are tried in ``crawl.sources`` order (the next one only when the previous one is
exhausted below the target); for engines every query of ``query_templates x (name + synonyms)`` is
asked in turn. Downloads run on ``crawl.threads`` threads through :class:`crawlers.fetch.Fetcher`.
Images are stored content-addressed (``crawl/images/<sha[:2]>/<sha>.<ext>``, atomic, never
overwritten) and every URL tried gets one row in ``crawl/records.jsonl`` (status ok | duplicate | error).
A rerun reads the records: classes at their target are skipped, URLs already tried are not fetched again
(their outcome is reused for other classes). A kill -9 loses at most the downloads in flight.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.config import RunConfig, save_resolved
from pipeline.errors import ConfigError
from pipeline.io import JsonlAppender, atomic_write_bytes, atomic_write_json, read_json, read_jsonl, sha256_bytes
from pipeline.runs import RECORD_FIELDS, RunDir
from pipeline.slug import unique_slugs

from .fetch import Fetcher, FetchResult, check_image_bytes, redact
from .sources import ENGINES, EngineError, engine_results, expand_queries, folder_files, load_url_list

log = logging.getLogger("kd3.crawl")

# outcomes that do not count as "tried": a rerun tries the URL again
RETRYABLE = ("deadline",)


@dataclass
class Candidate:
    url: str
    query: str
    engine: str
    local: Path | None = None


def _rel(run: RunDir, p: Path) -> str:
    return p.relative_to(run.root).as_posix()


def check_sources(cfg: RunConfig) -> None:
    """Fail fast, naming the setting, when a listed source cannot work."""
    c = cfg.crawl
    if "flickr" in c.sources and not c.flickr_key():
        raise ConfigError("source 'flickr' needs an API key: set crawl.flickr_api_key or env FLICKR_API_KEY")
    if "urls" in c.sources:
        if c.url_list is None:
            raise ConfigError("source 'urls' needs crawl.url_list (a .txt/.csv/.parquet file)")
        if not Path(c.url_list).is_file():
            raise ConfigError(f"crawl.url_list {c.url_list} does not exist")
    if "folder" in c.sources:
        if c.folder is None:
            raise ConfigError("source 'folder' needs crawl.folder (a folder <root>/<class>/*)")
        if not Path(c.folder).is_dir():
            raise ConfigError(f"crawl.folder {c.folder} is not a folder")


class _State:
    """What the records say so far (loaded once, updated as rows are written)."""

    def __init__(self, run: RunDir):
        self.lock = threading.Lock()
        self.tried: set[tuple[str, str]] = set()
        self.by_url: dict[str, dict] = {}
        self.class_shas: dict[str, set[str]] = defaultdict(set)
        self.ok: Counter = Counter()
        self.dup: Counter = Counter()
        self.failed: dict[str, Counter] = defaultdict(Counter)
        self.urls: dict[str, set[str]] = defaultdict(set)
        for r in read_jsonl(run.records):
            self.add(r)

    def add(self, r: dict) -> None:
        cls, url = r.get("class"), r.get("url")
        self.urls[cls].add(url)
        if r.get("status") == "error":
            self.failed[cls][r.get("error") or "error"] += 1
        elif r.get("status") == "duplicate":
            self.dup[cls] += 1
        if r.get("error") in RETRYABLE:
            return
        self.tried.add((cls, url))
        prev = self.by_url.get(url)
        if prev is None or prev.get("status") == "error":
            self.by_url[url] = r
        if r.get("status") in ("ok", "duplicate") and r.get("sha256"):
            self.class_shas[cls].add(r["sha256"])
        if r.get("status") == "ok":
            self.ok[cls] += 1


def _remove_stale_tmp(run: RunDir, age_s: float = 600.0) -> None:
    """Temp files of downloads cut by a crash (old enough not to belong to a crawl running beside us)."""
    if not run.images.is_dir():
        return
    now = time.time()
    for p in run.images.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > age_s:
                p.unlink()


class Crawler:
    """One crawl: a run directory, a fetcher (shared rate limiter + deadline), the records log."""

    def __init__(self, cfg: RunConfig, deadline_s: float | None = None):
        self.cfg = cfg
        self.c = cfg.crawl
        self.run = RunDir(cfg.run_dir)
        self.run.crawl.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (deadline_s if deadline_s is not None else self.c.deadline_s)
        self.fetcher = Fetcher(self.c, deadline=self.deadline)
        self.state = _State(self.run)
        _remove_stale_tmp(self.run)
        self.records = JsonlAppender(self.run.records)
        self._url_lists: dict[str, list[str]] | None = None
        self.deadline_hit = False

    def close(self) -> None:
        self.records.close()

    # ---- candidates
    def url_list(self, classes: list[str]) -> dict[str, list[str]]:
        if self._url_lists is None:
            self._url_lists = load_url_list(Path(self.c.url_list), classes, self.c.url_column, self.c.class_column)
        return self._url_lists

    def candidates(self, name: str, notes: list[str], classes: list[str]) -> Iterator[Candidate]:
        for source in self.c.sources:
            if source in ENGINES:
                for q in expand_queries(self.c, name):
                    try:
                        for urls in engine_results(source, self.c, q, self.fetcher):
                            for u in urls:
                                yield Candidate(u, q, source)
                    except EngineError as e:
                        notes.append(str(e))
                        log.warning("class %r: %s", name, e)
                        if e.give_up:
                            break
                    if self.fetcher.past_deadline():
                        return
            elif source == "urls":
                for u in self.url_list(classes).get(name, []):
                    yield Candidate(u, "", "urls")
            elif source == "folder":
                d, files = folder_files(Path(self.c.folder), name)
                if d is None:
                    msg = f"folder: no sub-folder for class {name!r} under {self.c.folder}"
                    notes.append(msg)
                    log.warning("%s", msg)
                for f in files:
                    yield Candidate(f.resolve().as_uri(), "", "folder", local=f)

    # ---- one URL (worker thread)
    def _download(self, cand: Candidate) -> FetchResult:
        if cand.local is not None:
            res = FetchResult(url=cand.url, ok=False)
            try:
                size = cand.local.stat().st_size
                if size > self.c.max_bytes:
                    res.error, res.detail = "too_large", f"{size} bytes > max_bytes {self.c.max_bytes}"
                    return res
                data = cand.local.read_bytes()
            except OSError as e:
                res.error, res.detail = "unreadable", str(e)[:200]
                return res
            err, detail, ext, w, h = check_image_bytes(data)
            res.data = data
            if err:
                res.error, res.detail = err, detail
                return res
            res.ok, res.ext, res.w, res.h = True, ext, w, h
        else:
            res = self.fetcher.fetch_image(cand.url)
        if res.ok and res.data is not None:
            sha = sha256_bytes(res.data)
            path = self.run.image_path(sha, res.ext)
            if not path.exists():
                atomic_write_bytes(path, res.data, overwrite=False)
            res.detail = sha  # carried to the committing thread
        return res

    def _record(self, name: str, cand: Candidate, status: str, error: str = "", sha: str = "",
                nbytes: int = 0, w: int = 0, h: int = 0, path: str = "") -> dict:
        row = {"class": name, "query": cand.query, "engine": cand.engine, "url": redact(cand.url),
               "status": status, "error": error or None, "sha256": sha or None, "bytes": nbytes,
               "w": w, "h": h, "path": path or None, "time": round(time.time(), 3)}
        assert tuple(row) == RECORD_FIELDS
        self.records.write(row)
        with self.state.lock:
            self.state.add(row)
        return row

    def _commit(self, name: str, cand: Candidate, res: FetchResult) -> dict:
        if res.ok:
            sha = res.detail
            path = _rel(self.run, self.run.image_path(sha, res.ext))
            status = "duplicate" if sha in self.state.class_shas[name] else "ok"
            return self._record(name, cand, status, "", sha, len(res.data or b""), res.w, res.h, path)
        if res.error == "deadline":
            self.deadline_hit = True
        log.debug("%s %s: %s %s", name, redact(cand.url), res.error, res.detail)
        return self._record(name, cand, "error", res.error, nbytes=len(res.data or b""))

    def _reuse(self, name: str, cand: Candidate) -> dict | None:
        """A URL already tried for another class: record its outcome without fetching again."""
        prev = self.state.by_url.get(cand.url)
        if prev is None:
            return None
        if prev.get("status") in ("ok", "duplicate"):
            if not prev.get("path") or not (self.run.root / prev["path"]).exists():
                return None  # file lost: fetch again
            sha = prev["sha256"]
            status = "duplicate" if sha in self.state.class_shas[name] else "ok"
            return self._record(name, cand, status, "", sha, prev.get("bytes") or 0, prev.get("w") or 0,
                                prev.get("h") or 0, prev["path"])
        return self._record(name, cand, "error", prev.get("error") or "error", nbytes=prev.get("bytes") or 0)

    # ---- one class
    def crawl_class(self, name: str, classes: list[str] | None = None) -> dict:
        classes = classes or [name]
        target = self.c.per_class
        have = self.state.ok[name]
        notes: list[str] = []
        counts: Counter = Counter()
        if have >= target:
            log.info("class %r: already has %d/%d images, skipped", name, have, target)
            return self._class_summary(name, notes, counts, skipped=True)
        from tqdm import tqdm

        bar = tqdm(total=target, initial=have, desc=name[:24], unit="img", disable=None, leave=True,
                   file=sys.stderr)
        seen: set[str] = set()
        gen = self.candidates(name, notes, classes)
        exhausted = False
        inflight: dict = {}
        threads = self.c.threads
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kd3-dl") as ex:
            try:
                while True:
                    while (not exhausted and len(inflight) < threads
                           and self.state.ok[name] + len(inflight) < target):
                        if self.fetcher.past_deadline():
                            self.deadline_hit = True
                            exhausted = True
                            break
                        cand = next(gen, None)
                        if cand is None:
                            exhausted = True
                            break
                        if cand.url in seen or (name, redact(cand.url)) in self.state.tried:
                            continue
                        seen.add(cand.url)
                        counts["found"] += 1
                        row = self._reuse(name, cand)
                        if row is not None:
                            counts[row["status"]] += 1
                            if row["status"] == "ok":
                                bar.update(1)
                            continue
                        inflight[ex.submit(self._download, cand)] = cand
                    if not inflight:
                        break
                    done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                    for fut in done:
                        cand = inflight.pop(fut)
                        try:
                            res = fut.result()
                        except Exception as e:  # noqa: BLE001 - one bad URL never stops the class
                            log.exception("unexpected error on %s", redact(cand.url))
                            res = FetchResult(url=cand.url, ok=False, error="internal", detail=str(e)[:200])
                        row = self._commit(name, cand, res)
                        counts[row["status"]] += 1
                        if row["status"] == "ok":
                            bar.update(1)
            finally:
                gen.close()
                bar.close()
        if self.fetcher.past_deadline() and self.state.ok[name] < target:
            self.deadline_hit = True
            notes.append(f"deadline of {self.c.deadline_s:g}s reached")
        return self._class_summary(name, notes, counts)

    def _class_summary(self, name: str, notes: list[str], counts: Counter, skipped: bool = False) -> dict:
        st = self.state
        with st.lock:
            failed = Counter(st.failed[name])
            ok, dup, found = st.ok[name], st.dup[name], len(st.urls[name])
        return {
            "target": self.c.per_class,
            "found": found,
            "downloaded": ok,
            "duplicates": dup,
            "failed": dict(sorted(failed.items())),
            "done": ok >= self.c.per_class,
            "skipped": skipped,
            "this_run": {"found": counts["found"], "ok": counts["ok"], "duplicate": counts["duplicate"],
                         "error": counts["error"]},
            "notes": notes,
        }


# ---------------------------------------------------------------- summary

@contextlib.contextmanager
def _summary_lock(run: RunDir):
    run.crawl.mkdir(parents=True, exist_ok=True)
    fh = open(run.crawl / ".summary.lock", "w")
    try:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        yield
    finally:
        fh.close()


def _write_summary(cfg: RunConfig, per_class: dict[str, dict], extra: dict | None = None) -> dict:
    """Merge per-class summaries into ``crawl/summary.json`` (locked: flows crawl classes in parallel)."""
    run = RunDir(cfg.run_dir)
    slugs = unique_slugs(cfg.resolved_classes()) if (cfg.classes or cfg.classes_file or cfg.teacher) else {}
    with _summary_lock(run):
        old = read_json(run.crawl_summary) if run.crawl_summary.exists() else {}
        classes = dict(old.get("classes", {}))
        for name, s in per_class.items():
            s = dict(s)
            s["slug"] = slugs.get(name) or unique_slugs([name])[name]
            classes[name] = s
        total = {"found": 0, "downloaded": 0, "duplicates": 0, "failed": 0}
        for s in classes.values():
            total["found"] += s["found"]
            total["downloaded"] += s["downloaded"]
            total["duplicates"] += s["duplicates"]
            total["failed"] += sum(s["failed"].values())
        summary = {
            "ok": all(s["downloaded"] > 0 for s in classes.values()) if classes else False,
            "run_dir": str(run.root),
            "sources": list(cfg.crawl.sources),
            "per_class": cfg.crawl.per_class,
            "classes": classes,
            "total": total,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        summary.update(extra or {})
        atomic_write_json(run.crawl_summary, summary)
    return summary


def print_summary(summary: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    reasons = sorted({r for s in summary["classes"].values() for r in s["failed"]})
    t = Table(title=f"crawl summary: {summary['run_dir']}")
    t.add_column("class")
    for col in ("target", "found", "downloaded", "duplicates"):
        t.add_column(col, justify="right")
    t.add_column("failed by reason")
    for name, s in summary["classes"].items():
        fails = ", ".join(f"{r} {s['failed'][r]}" for r in reasons if r in s["failed"]) or "-"
        style = None if s["done"] else "yellow"
        t.add_row(name, str(s["target"]), str(s["found"]), str(s["downloaded"]), str(s["duplicates"]), fails,
                  style=style)
    console = Console(file=file or sys.stderr, width=max(100, shutil.get_terminal_size((120, 20)).columns))
    console.print(t)
    for name, s in summary["classes"].items():
        for n in s.get("notes", [])[:5]:
            console.print(f"[yellow]{name}[/yellow]: {n}", markup=True, highlight=False)
    if summary.get("deadline_hit"):
        console.print("[yellow]the crawl deadline was reached; rerun to continue[/yellow]")


# ---------------------------------------------------------------- public API

def crawl(cfg: RunConfig, classes: list[str] | None = None) -> dict:
    """Crawl every class (or ``classes``); returns the summary (also ``crawl/summary.json``)."""
    names = list(classes) if classes is not None else cfg.resolved_classes()
    if not names:
        raise ConfigError("no classes to crawl")
    check_sources(cfg)
    save_resolved(cfg)
    crawler = Crawler(cfg)
    per: dict[str, dict] = {}
    t0 = time.time()
    try:
        for name in names:
            per[name] = crawler.crawl_class(name, names)
            if crawler.fetcher.past_deadline():
                for rest in names[len(per):]:
                    per[rest] = crawler._class_summary(rest, [f"deadline of {cfg.crawl.deadline_s:g}s reached "
                                                              "before this class"], Counter())
                break
    finally:
        crawler.close()
    summary = _write_summary(cfg, per, {"deadline_hit": crawler.deadline_hit,
                                        "elapsed_s": round(time.time() - t0, 2)})
    print_summary(summary)
    return summary


def crawl_class(cfg: RunConfig, name: str) -> dict:
    """Crawl one class (resumable); returns its summary and merges it into ``crawl/summary.json``."""
    check_sources(cfg)
    save_resolved(cfg)
    try:
        classes = cfg.resolved_classes()
    except ConfigError:
        classes = [name]
    if name not in classes:
        classes = classes + [name]
    crawler = Crawler(cfg)
    try:
        s = crawler.crawl_class(name, classes)
    finally:
        crawler.close()
    _write_summary(cfg, {name: s}, {"deadline_hit": crawler.deadline_hit})
    log.info("class %r: %d/%d images (%d found, %d duplicates, %d failed)", name, s["downloaded"], s["target"],
             s["found"], s["duplicates"], sum(s["failed"].values()))
    return s


def class_done(cfg: RunConfig, name: str) -> bool:
    """True when the records hold ``crawl.per_class`` downloaded images for ``name``."""
    run = RunDir(cfg.run_dir)
    n = sum(1 for r in read_jsonl(run.records) if r.get("class") == name and r.get("status") == "ok")
    return n >= cfg.crawl.per_class
