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
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from pipeline.core.config import RunConfig, save_resolved
from pipeline.core.errors import ConfigError, DataError
from pipeline.core.interrupt import stop_requested
from pipeline.core.preflight import check_sources
from pipeline.core.io import atomic_write_bytes, sha256_bytes
from pipeline.core.records import ClassSummary, CrawlRecord, CrawlSummary, RecordLog, read_records, \
    update_crawl_summary
from pipeline.core.runs import RunDir
from pipeline.core.slug import unique_slugs

from .expand import PlannedQuery
from .fetch import Fetcher, FetchResult, check_image_bytes, redact
from .source import Candidate, CrawlContext, Source, source_class, sources_of
from .sources import EngineError

log = logging.getLogger("kd3.crawl")

# outcomes that do not count as "tried": a rerun tries the URL again
RETRYABLE = ("deadline", "interrupted")


def _rel(run: RunDir, p: Path) -> str:
    return p.relative_to(run.root).as_posix()


class _State:
    """What the records say so far (loaded once, updated as rows are written)."""

    def __init__(self, run: RunDir):
        self.lock = threading.Lock()
        self.tried: set[tuple[str, str]] = set()
        self.by_url: dict[str, dict] = {}
        self.class_shas: dict[str, set[str]] = defaultdict(set)
        self.ok: Counter = Counter()
        self.ok_by_query: Counter = Counter()  # (class, engine, query) -> downloads
        self.dup: Counter = Counter()
        self.failed: dict[str, Counter] = defaultdict(Counter)
        self.urls: dict[str, set[str]] = defaultdict(set)
        for r in read_records(run.records):
            self.add(r)

    def add(self, r: CrawlRecord) -> None:
        cls, url = r.cls, r.url
        self.urls[cls].add(url)
        if r.status == "error":
            self.failed[cls][r.error or "error"] += 1
        elif r.status == "duplicate":
            self.dup[cls] += 1
        if r.error in RETRYABLE:
            return
        self.tried.add((cls, url))
        prev = self.by_url.get(url)
        if prev is None or prev.status == "error":
            self.by_url[url] = r
        if r.status in ("ok", "duplicate") and r.sha256:
            self.class_shas[cls].add(r.sha256)
        if r.status == "ok":
            self.ok[cls] += 1
            self.ok_by_query[(cls, r.engine, r.query)] += 1


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
        self.records = RecordLog(self.run.records)
        self.ctx = CrawlContext(self.fetcher, reject=self._reject)
        self._sources: dict[str, Source] = {}
        self.deadline_hit = False

    def close(self) -> None:
        self.records.close()

    # ---- candidates
    def source(self, name: str) -> Source:
        if name not in self._sources:
            self._sources[name] = source_class(name)(self.ctx)
        return self._sources[name]

    def candidates(self, name: str, classes: list[str]) -> Iterator[Candidate]:
        """Every source's candidates for class ``name``, in ``crawl.sources`` order."""
        self.ctx.classes = classes
        for source in self.c.sources:
            yield from self.source(source).candidates(name, self.cfg)
            if self.fetcher.past_deadline():
                return

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
                nbytes: int = 0, w: int = 0, h: int = 0, path: str = "") -> CrawlRecord:
        rec = CrawlRecord(cls=name, query=cand.query, engine=cand.engine, url=redact(cand.url), status=status,
                          error=error or None, sha256=sha or None, bytes=nbytes, w=w, h=h, path=path or None,
                          time=round(time.time(), 3))
        self.records.append(rec)
        with self.state.lock:
            self.state.add(rec)
        return rec

    def _reject(self, url: str, engine: str, error: str, detail: str) -> None:
        """A candidate no class could be given (a pool sample that cannot be read): one record, class ""."""
        if ("", redact(url)) not in self.state.tried:
            log.debug("%s: %s %s", redact(url), error, detail)
            self._record("", Candidate(url, "", engine), "error", error)

    def _commit(self, name: str, cand: Candidate, res: FetchResult) -> CrawlRecord:
        if res.ok:
            sha = res.detail
            path = _rel(self.run, self.run.image_path(sha, res.ext))
            status = "duplicate" if sha in self.state.class_shas[name] else "ok"
            return self._record(name, cand, status, "", sha, len(res.data or b""), res.w, res.h, path)
        if res.error == "deadline":
            self.deadline_hit = True
        log.debug("%s %s: %s %s", name, redact(cand.url), res.error, res.detail)
        return self._record(name, cand, "error", res.error, nbytes=len(res.data or b""))

    def _reuse(self, name: str, cand: Candidate) -> CrawlRecord | None:
        """A URL already tried for another class: record its outcome without fetching again."""
        prev = self.state.by_url.get(cand.url)
        if prev is None:
            return None
        if prev.status in ("ok", "duplicate"):
            if not prev.path or not (self.run.root / prev.path).exists():
                return None  # file lost: fetch again
            status = "duplicate" if prev.sha256 in self.state.class_shas[name] else "ok"
            return self._record(name, cand, status, "", prev.sha256, prev.bytes, prev.w, prev.h, prev.path)
        return self._record(name, cand, "error", prev.error or "error", nbytes=prev.bytes)

    # ---- one class
    def crawl_class(self, name: str, classes: list[str] | None = None) -> ClassSummary:
        """Crawl one class up to its target (``crawl.target()``; None: every candidate); a class already
        there is skipped (the records decide)."""
        classes = classes or [name]
        target = self.c.target()
        room = (lambda n: True) if target is None else (lambda n: n < target)  # noqa: E731
        have = self.state.ok[name]
        notes = self.ctx.notes[name] = []
        counts: Counter = Counter()
        if not room(have):
            log.info("class %r: already has %d/%d images, skipped", name, have, target)
            return self._class_summary(name, notes, counts, skipped=True)
        bar = tqdm(total=target, initial=have, desc=name[:24], unit="img", disable=None, leave=True,
                   file=sys.stderr)
        try:
            exhausted = self._fill(name, self.candidates(name, classes), lambda: self.state.ok[name], target,
                                   counts, bar)
        finally:
            bar.close()
        cut = self.fetcher.past_deadline()
        if cut and room(self.state.ok[name]) and not stop_requested():
            self.deadline_hit = True
            notes.append(f"deadline of {self.c.deadline_s:g}s reached")
        return self._class_summary(name, notes, counts, every_tried=exhausted and not cut)

    def crawl_plan(self, name: str, plan: list[PlannedQuery], target: int) -> ClassSummary:
        """Download for one class from planned queries: each up to its ``base + quota`` downloads (plus
        what the queries before it could not deliver), the class up to ``target``. Counted from the
        records, so a rerun after a crash continues where it stopped."""
        notes = self.ctx.notes[name] = []
        counts: Counter = Counter()
        have = self.state.ok[name]
        bar = tqdm(total=max(target, have), initial=have, desc=name[:24], unit="img", disable=None, leave=True,
                   file=sys.stderr)
        carry = 0
        try:
            for p in plan:
                key = (name, p.source, p.query)
                goal = p.base + p.quota + carry
                if self.state.ok[name] < target and self.state.ok_by_query[key] < goal:
                    left = target - self.state.ok[name]
                    goal = min(goal, self.state.ok_by_query[key] + left)
                    with contextlib.suppress(EngineError):
                        self._fill(name, self.source(p.source).query(p.query, name, self.cfg),
                                   lambda k=key: self.state.ok_by_query[k], goal, counts, bar)
                carry = max(0, goal - self.state.ok_by_query[key])
                if self.fetcher.past_deadline():  # or Ctrl-C
                    self.deadline_hit = not stop_requested()
                    if self.deadline_hit:
                        notes.append(f"deadline of {self.c.deadline_s:g}s reached")
                    break
        finally:
            bar.close()
        return self._class_summary(name, notes, counts)

    def _fill(self, name: str, gen: Iterator[Candidate], have, target: int | None, counts: Counter, bar) -> bool:
        """Download candidates from ``gen`` on the thread pool until ``have()`` (+ downloads in flight)
        reaches ``target`` (None: no cap) or ``gen`` runs dry; every URL gets its record. True when every
        candidate was tried (or the deadline / Ctrl-C ended it)."""
        seen: set[str] = set()
        exhausted = False
        inflight: dict = {}
        threads = self.c.threads
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kd3-dl") as ex:
            try:
                while True:
                    while not exhausted and len(inflight) < threads and (
                            target is None or have() + len(inflight) < target):
                        if self.fetcher.past_deadline():  # or Ctrl-C: the downloads in flight end at once
                            self.deadline_hit = not stop_requested()
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
                            counts[row.status] += 1
                            if row.status == "ok":
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
                        counts[row.status] += 1
                        if row.status == "ok":
                            bar.update(1)
            finally:
                gen.close()
        return exhausted

    def _class_summary(self, name: str, notes: list[str], counts: Counter, skipped: bool = False,
                       every_tried: bool = False) -> ClassSummary:
        """``done``: the target reached, or (no target) every candidate tried."""
        st = self.state
        target = self.c.target()
        with st.lock:
            failed = Counter(st.failed[name])
            ok, dup, found = st.ok[name], st.dup[name], len(st.urls[name])
        return ClassSummary(
            target=target, found=found, downloaded=ok, duplicates=dup, failed=dict(sorted(failed.items())),
            done=every_tried if target is None else ok >= target, skipped=skipped,
            this_run={"found": counts["found"], "ok": counts["ok"], "duplicate": counts["duplicate"],
                      "error": counts["error"]},
            notes=notes)


# ---------------------------------------------------------------- summary

def _write_summary(cfg: RunConfig, per_class: dict[str, ClassSummary], **extra) -> CrawlSummary:
    """Merge per-class summaries into ``crawl/summary.json`` (locked: flows crawl classes in parallel)."""
    run = RunDir(cfg.run_dir)
    run.crawl.mkdir(parents=True, exist_ok=True)
    slugs = unique_slugs(cfg.resolved_classes()) if (cfg.classes or cfg.classes_file or cfg.teacher) else {}
    for name, s in per_class.items():
        s.slug = slugs.get(name) or unique_slugs([name])[name]
    return update_crawl_summary(run.crawl_summary, per_class, run_dir=str(run.root), sources=list(cfg.crawl.sources),
                                target_per_class=cfg.crawl.target(), **extra)


def print_summary(summary: CrawlSummary, file=None) -> None:
    reasons = sorted({r for s in summary.classes.values() for r in s.failed})
    t = Table(title=f"crawl summary: {summary.run_dir}")
    t.add_column("class")
    for col in ("target", "found", "downloaded", "duplicates"):
        t.add_column(col, justify="right")
    t.add_column("failed by reason")
    for name, s in summary.classes.items():
        fails = ", ".join(f"{r} {s.failed[r]}" for r in reasons if r in s.failed) or "-"
        t.add_row(name, "all" if s.target is None else str(s.target), str(s.found), str(s.downloaded), str(s.duplicates), fails,
                  style=None if s.done else "yellow")
    console = Console(file=file or sys.stderr, width=max(100, shutil.get_terminal_size((120, 20)).columns))
    console.print(t)
    for name, s in summary.classes.items():
        for n in s.notes[:5]:
            console.print(f"[yellow]{name}[/yellow]: {n}", markup=True, highlight=False)
    if summary.deadline_hit:
        console.print("[yellow]the crawl deadline was reached; rerun to continue[/yellow]")


# ---------------------------------------------------------------- public API

def crawl(cfg: RunConfig, classes: list[str] | None = None) -> dict:
    """Crawl every class (or ``classes``); returns the summary (also ``crawl/summary.json``) as a dict."""
    names = list(classes) if classes is not None else cfg.resolved_classes()
    if not names:
        raise ConfigError("no classes to crawl")
    check_sources(cfg)
    save_resolved(cfg)
    crawler = Crawler(cfg)
    per: dict[str, ClassSummary] = {}
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
    summary = _write_summary(cfg, per, deadline_hit=crawler.deadline_hit, elapsed_s=round(time.time() - t0, 2))
    check_found_images(cfg, summary)
    print_summary(summary)
    return summary.to_row()


def check_found_images(cfg: RunConfig, summary: CrawlSummary) -> None:
    """Local sources (a folder) that gave no image at all are the user's to fix: one line, not a table of zeros.
    (Engines or URL lists that gave nothing may be the network's fault: the table says so, exit 1.)"""
    local = sources_of(cfg)
    if not all(s.takes_whole for s in local) or not summary.classes:
        return
    if any(s.downloaded or s.duplicates for s in summary.classes.values()):
        return
    failed: Counter = Counter()
    for s in summary.classes.values():
        failed.update(s.failed)
    where = ", ".join(s.where(cfg) for s in local)
    tried = sum(failed.values())
    why = (f"none of its {tried} files is a usable image ({', '.join(f'{k} {v}' for k, v in failed.most_common(4))})"
           if tried else f"no files for the classes {list(summary.classes)[:5]}")
    raise DataError(f"{where}: {why}; nothing to curate")


def crawl_class(cfg: RunConfig, name: str) -> dict:
    """Crawl one class (resumable; a class at its target is skipped and says so: ``skipped``, ``done``);
    returns its summary and merges it into ``crawl/summary.json``. Flows fan out on it."""
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
    _write_summary(cfg, {name: s}, deadline_hit=crawler.deadline_hit, elapsed_s=None)
    log.info("class %r: %d/%s images (%d found, %d duplicates, %d failed)", name, s.downloaded,
             "all" if s.target is None else s.target, s.found, s.duplicates, sum(s.failed.values()))
    return s.to_row()


def crawl_planned(cfg: RunConfig, name: str, plan: list[PlannedQuery], target: int) -> dict:
    """Crawl one class from planned queries up to ``target`` downloads (the crawl-selection loop; every
    URL is recorded in ``crawl/records.jsonl`` as usual); returns the class summary, merged into
    ``crawl/summary.json``. Resumable: what the records hold counts."""
    check_sources(cfg)
    crawler = Crawler(cfg)
    try:
        s = crawler.crawl_plan(name, plan, target)
    finally:
        crawler.close()
    s.target, s.done = target, s.downloaded >= target
    _write_summary(cfg, {name: s}, deadline_hit=crawler.deadline_hit, elapsed_s=None)
    log.info("class %r: %d/%d images after the planned queries (%s)", name, s.downloaded, target,
             ", ".join(f"{p.query!r} {p.quota}" for p in plan if p.quota))
    return s.to_row()


def class_done(cfg: RunConfig, name: str) -> bool:
    """True when the records hold the class's target of downloaded images (no target: local sources taken
    whole, when every candidate of the class has its outcome recorded)."""
    rows = [r for r in read_records(RunDir(cfg.run_dir).records) if r.cls == name]
    target = cfg.crawl.target()
    if target is not None:
        return sum(1 for r in rows if r.status == "ok") >= target
    tried = {r.url for r in rows if r.error not in RETRYABLE}
    ctx = CrawlContext(classes=[name])
    return all(c.url in tried for src in sources_of(cfg) for c in src(ctx).candidates(name, cfg))
