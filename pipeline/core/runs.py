"""The run directory: the contract between stages (see DESIGN.md).

```
runs/<name>/
  config.yaml                 resolved config (secrets removed)
  crawl/records.jsonl         one row per URL tried, append-only
  crawl/images/<sha[:2]>/<sha256>.<ext>   content-addressed raw files, never overwritten
  crawl/summary.json          per-class counts of the last crawl
  curate/decisions.jsonl      one row per raw image: kept or the reason dropped, + scores
  curate/embeddings.npy       float32 [N, D], L2-normalised; curate/ids.json the row -> image id
  curate/index.faiss          FAISS index of kept embeddings; curate/index_ids.json its id map
  shards/<name>-000000.tar    webdataset shards
  manifest.json               wids-compatible shard list + everything needed to trust the shards
  distill/<method>-<id>/      student, metrics.json, selection log, training log
  report/                     index.html + contact sheets
  loop/round-NNN.json         the crawl-selection loop: one state file per round
```
The format of each file is owned by :mod:`pipeline.core.records`; this module only knows where they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def name(self) -> str:
        return self.root.name

    # top level
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    # crawl
    @property
    def crawl(self) -> Path:
        return self.root / "crawl"

    @property
    def records(self) -> Path:
        return self.crawl / "records.jsonl"

    @property
    def images(self) -> Path:
        return self.crawl / "images"

    @property
    def crawl_summary(self) -> Path:
        return self.crawl / "summary.json"

    def image_path(self, sha256: str, ext: str) -> Path:
        return self.images / sha256[:2] / f"{sha256}.{ext.lstrip('.')}"

    # curate
    @property
    def curate(self) -> Path:
        return self.root / "curate"

    @property
    def decisions(self) -> Path:
        return self.curate / "decisions.jsonl"

    @property
    def embeddings(self) -> Path:
        return self.curate / "embeddings.npy"

    @property
    def embedding_ids(self) -> Path:
        return self.curate / "ids.json"

    @property
    def index(self) -> Path:
        return self.curate / "index.faiss"

    @property
    def index_ids(self) -> Path:
        return self.curate / "index_ids.json"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    # distill / report / loop
    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @property
    def loop(self) -> Path:
        return self.root / "loop"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def require(self, what: Path, stage: str) -> Path:
        """Raise a one-line DataError when a stage's input is missing."""
        if not self.root.is_dir():
            raise DataError(f"run directory {self.root} does not exist")
        if not what.exists():
            raise DataError(f"{what} is missing: run `kd3 {stage}` on {self.root} first")
        return what


def run_dir_of(path: str | Path) -> RunDir:
    """Accept a run directory or a file inside it (manifest.json, config.yaml)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    return RunDir(p)
