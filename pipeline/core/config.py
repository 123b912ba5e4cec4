"""The run config: one pydantic model with ``crawl``, ``curate``, ``distill`` and ``flow`` sections.

Loaded from YAML, every field overridable from the CLI (``--crawl.per_class 50`` or
``--set crawl.per_class=50``), saved resolved as ``runs/<name>/config.yaml`` (secrets
excluded). Defaults serve a real user with internet and a GPU. Unknown keys are errors.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from . import plugins
from .plugin_settings import PluginFields, PluginSections, PluginSettingsError, error_message, validate_settings
from .checkpoint import check_classes, read_teacher_classes
from .errors import ConfigError, Kd3Error
from .io import atomic_write_text
from .slug import slugify, validate_class_name

# the plugin kinds whose settings the config holds
METHODS, SOURCES, MODELS, EMBEDDERS = "kd3.methods", "kd3.sources", "kd3.models", "kd3.embedders"


def _installed(group: str, what: str, name: str) -> str:
    """``name`` when it is an installed plugin of ``group``, else the one-line error listing those."""
    if name not in plugins.names(group):
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(plugins.names(group))}")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEFAULT_PER_CLASS = 200
# training augmentations of distill and `kd3 teacher train` (distill.data.build_transforms)
Augment = Literal["rrc_flip", "crop", "flip", "none"]
AUGMENTS: tuple[str, ...] = get_args(Augment)


class CrawlConfig(PluginFields):
    """The crawl; each source's own settings (``crawl.folder``, ``crawl.url_list``, ``crawl.engine_urls``, ...)
    are keys of this section too, declared by the source (:mod:`.plugin_settings`)."""

    plugin_group: ClassVar[str] = SOURCES
    sources: list[str] = Field(
        default_factory=lambda: ["bing", "baidu"],
        description=f"image sources in fallback order: {', '.join(plugins.names(SOURCES))} (plugins: entry points "
                    f"{SOURCES}; each source's settings are keys of this section)",
    )
    per_class: Optional[int] = Field(
        None, gt=0, description=f"target number of downloaded images per class (unset: {DEFAULT_PER_CLASS} from "
                                f"engines and URL lists; every image when the only source is a folder)")
    query_templates: list[str] = Field(
        default_factory=lambda: ["{c}", "{c} photo", "a photo of a {c}"],
        description="query templates; {c} is the class name or a synonym",
    )
    synonyms: dict[str, list[str]] = Field(default_factory=dict, description="extra query terms per class")
    threads: int = Field(8, gt=0, description="download threads")
    rate_limit_per_domain: float = Field(2.0, gt=0, description="max requests per second to one domain")
    retries: int = Field(3, ge=0, description="retries per URL on network errors and 429/5xx")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    connect_timeout_s: float = Field(5.0, gt=0, description="connect timeout per request")
    read_timeout_s: float = Field(20.0, gt=0, description="read timeout per request")
    max_bytes: int = Field(20_000_000, gt=0, description="largest image accepted; larger bodies are cut off")
    deadline_s: float = Field(3600.0, gt=0, description="global wall-clock deadline for the crawl")
    allow_private_hosts: bool = Field(False, description="allow URLs on private/loopback/link-local addresses")
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs allowed even when private, e.g. 127.0.0.1/32 for a local mirror",
    )
    respect_x_robots_tag: bool = Field(True, description="skip images served with X-Robots-Tag noai/noimageai")
    user_agent: str = Field("kd3/0.1 (+https://github.com/kd3-project/kd3)", description="HTTP User-Agent")
    proxy: Optional[SecretStr] = Field(None, description="HTTP(S) proxy URL (may carry credentials)")

    @field_validator("query_templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one query template is needed")
        for t in v:
            if "{c}" not in t:
                raise ValueError(f"query template {t!r} has no {{c}} placeholder")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one source is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"sources listed twice: {v}")
        for name in v:
            _installed(SOURCES, "source", name)
        return v

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for n in v:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError:
                raise ValueError(f"{n!r} is not an IP network (e.g. 127.0.0.1/32)") from None
        return v

    def target(self) -> Optional[int]:
        """Images wanted per class: ``per_class``; unset, every image when every source is a local collection
        taken whole (a folder: ``takes_whole`` on the source) unless capped explicitly, else DEFAULT_PER_CLASS."""
        if self.per_class is not None:
            return self.per_class
        whole = all(getattr(plugins.implementation(SOURCES, s), "takes_whole", False) for s in self.sources)
        return None if whole else DEFAULT_PER_CLASS


class CurateConfig(PluginFields):
    """Curation; each embedding backend's own settings (``curate.clip_model``, ...) are keys of this section."""

    plugin_group: ClassVar[str] = EMBEDDERS
    min_side: int = Field(32, gt=0, description="drop images whose shorter side is below this")
    max_aspect: float = Field(4.0, ge=1.0, description="drop images with long/short side ratio above this")
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb cap (width*height)")
    phash_threshold: int = Field(4, ge=0, le=64, description="pHash Hamming distance for perceptual duplicates")
    phash_max_pixel_diff: float = Field(
        4.0, ge=0, le=255, description="a pHash match is a duplicate only when the 16x16 greyscale thumbnails "
                                      "differ by at most this (mean absolute difference, 0-255)")
    embed_backend: str = Field("clip", description=f"image embeddings from: {', '.join(plugins.names(EMBEDDERS))} "
                                                   f"(plugins: entry points {EMBEDDERS}; each backend's settings "
                                                   f"are keys of this section)")
    batch_size: int = Field(256, gt=0, description="embedding batch size")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    workers: int = Field(4, ge=0, description="decode/hash worker threads")
    scan_chunk: int = Field(4096, gt=0, description="images per chunk of the decode/hash/embed scan (one task "
                                                    "each on flow.task_runner dask; a killed chunk resumes)")
    near_dup: bool = Field(True, description="remove near-duplicates by embedding cosine (after pHash)")
    near_dup_threshold: Union[Literal["auto"], float] = Field(
        "auto", description="cosine similarity for near-duplicates; auto: calibrated on the pool (planted "
                            "re-encodes must be caught, unrelated neighbours stay below)")
    max_dup_share: float = Field(0.3, gt=0, le=1.0, description="stop with an error when a dedup step would drop "
                                                                "more than this share of its input")
    prompt_templates: list[str] = Field(default_factory=lambda: ["a photo of a {c}."], description="CLIP prompts")
    negative_prompts: list[str] = Field(default_factory=list, description="extra zero-shot labels, e.g. 'text'")
    relevance_filter: bool = Field(False, description="drop images CLIP assigns to another class")
    relevance_margin: float = Field(0.1, ge=0, description="off-class drop when argmax score - query score > this")
    decontaminate: Optional[Path] = Field(None, description="folder of evaluation images to remove from the web data")
    decontam_threshold: float = Field(0.95, gt=0, le=1.0, description="cosine similarity for decontamination")
    image_format: Literal["jpg", "original"] = Field("jpg", description="store re-encoded JPEG or original bytes")
    max_side: int = Field(512, gt=0, description="resize the longer side to at most this before sharding")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality for re-encoded images")
    shard_max_samples: int = Field(10_000, gt=0, description="samples per shard")
    shard_max_bytes: int = Field(1_000_000_000, gt=0, description="bytes per shard")


    @field_validator("embed_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _installed(EMBEDDERS, "embedding backend", v)

    @field_validator("near_dup_threshold", mode="before")
    @classmethod
    def _near_dup_threshold(cls, v):
        if v == "auto":
            return v
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = None
        if isinstance(v, bool) or x is None or not 0 < x <= 1:
            raise ValueError(f"{v!r}: expected auto or a cosine in (0, 1]")
        return x


def moved_distill_keys() -> dict[str, str]:
    """Keys of the flat distill section of old -> where they went: each method's settings name theirs
    (``moved_keys``)."""
    out: dict[str, str] = {}
    for s in DistillConfig.plugin_settings().values():
        out.update(getattr(s, "moved_keys", {}))
    return out


class DistillConfig(PluginSections):
    """Trainer settings; each method's own settings are its section (``distill.kd3``, ``distill.kd``, ...),
    validated by the method's settings class (:mod:`.plugin_settings`)."""

    plugin_group: ClassVar[str] = METHODS

    method: str = Field("kd3", description="distillation method: kd3, kd or dfnd (plugins: entry points kd3.methods)")
    student: str = Field("resnet18", description="student architecture (registry name, timm:<name>, torchvision:<name>)")
    student_settings: dict[str, Any] = Field(
        default_factory=dict, description="the student architecture's own settings (a model plugin's Settings; "
                                          "the built-in architectures take none)")
    epochs: int = Field(240, gt=0, description="training epochs")
    batch_size: int = Field(256, gt=0, description="training batch size")
    lr: float = Field(0.05, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    lr_schedule: Literal["step", "cosine"] = Field(
        "step", description="step: lr x0.1 at lr_milestones (the release); cosine: cosine decay to 0 over the epochs")
    lr_milestones: list[float] = Field(
        default_factory=lambda: [150 / 240, 180 / 240, 210 / 240],
        description="lr x0.1 at these fractions of the epochs (lr_schedule step)",
    )
    img_size: Optional[int] = Field(None, description="input size (default: the teacher's)")
    augment: Augment = Field(
        "rrc_flip", description="training augmentation: rrc_flip (release), crop (pad+crop, no flip), flip, none")
    eval_dir: Optional[Path] = Field(None, description="labelled ImageFolder of original-domain images")
    anchor_dir: Optional[Path] = Field(None, description="a few original images per class (<class>/*, e.g. 5-20, "
                                                          "never the eval set): the reference of selection_rule "
                                                          "anchors, for a teacher of any architecture")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="held-out slice of the web pool for validation")
    device: str = Field("auto", description="auto, cpu, cuda, ...")
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="bf16 autocast (auto = on GPU)")
    channels_last: bool = Field(True, description="channels_last memory format (faster convolutions on GPU and CPU)")
    workers: int = Field(4, ge=0, description="data loader workers (at most the CPU cores kd3 may use)")
    log_every: int = Field(50, gt=0, description="without a terminal: a progress line every N batches")
    seed: int = Field(0, description="random seed")
    keys_file: Optional[Path] = Field(None, description="train only on the pool images whose keys this file "
                                                         "lists, one per line (e.g. a hand-vetted subset)")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in moved_distill_keys().items():
                if old in data:
                    raise ValueError(f"distill.{old} is now distill.{new}")
        return data

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _installed(METHODS, "distillation method", v)

    @field_validator("student")
    @classmethod
    def _student(cls, v: str) -> str:
        if v.split(":", 1)[0] in ("timm", "torchvision") and v.split(":", 1)[1:] != [""]:
            return v  # resolved by timm / torchvision when the model is built
        if v not in plugins.names(MODELS):
            raise ValueError(f"unknown student architecture {v!r}; choose one of "
                             f"{', '.join(plugins.names(MODELS))}, timm:<name> or torchvision:<name>")
        return v

    @model_validator(mode="after")
    def _student_settings(self) -> "DistillConfig":
        """Set student settings are the architecture's to validate (loading it: a model plugin may import torch)."""
        if self.student_settings:
            settings = plugins.settings(MODELS, self.student) if self.student in plugins.names(MODELS) else None
            if settings is None:
                raise PluginSettingsError([(("student_settings",), f"student {self.student!r} takes no settings")])
            validate_settings(settings, self.student_settings, ("student_settings",))
        return self

    @model_validator(mode="after")
    def _anchors_need_a_folder(self) -> "DistillConfig":
        sec = self.method_config()
        if getattr(sec, "selection_rule", None) == "anchors" and self.anchor_dir is None:
            raise ValueError(f"distill.{self.method}.selection_rule anchors needs distill.anchor_dir (a few original "
                             f"images per class, <class>/*)")
        return self

    def method_config(self) -> Optional[BaseModel]:
        """The section of the chosen method (None for a plugin method without one)."""
        return getattr(self, self.method, None)


class FlowConfig(_Section):
    task_runner: Literal["thread", "dask"] = Field("thread", description="Prefect task runner")
    dask_address: Optional[str] = Field(None, description="Dask scheduler address (default: a LocalCluster)")
    dask_workers: int = Field(2, gt=0, description="LocalCluster workers")
    dask_processes: bool = Field(True, description="LocalCluster workers are processes (False: threads)")
    crawl_concurrency: int = Field(4, gt=0, description="classes crawled at once")
    crawl_retries: int = Field(2, ge=0, description="retries of a failed per-class crawl task")
    crawl_retry_delay_s: float = Field(30.0, ge=0, description="delay before a per-class crawl task is retried")
    cache: bool = Field(True, description="reuse stage results across runs when inputs and code are unchanged")
    result_store: Optional[Path] = Field(None, description="Prefect result/cache store (default: runs/<name>/.prefect)")
    gpus: int = Field(1, ge=0, description="GPUs for distill (per node); >1 launches torchrun")
    nodes: int = Field(1, ge=1, description="machines for distill; >1 runs torchrun's multi-node rendezvous at "
                                            "`rdzv` (start the same distill on every node; run dir on shared storage)")
    rdzv: Optional[str] = Field(None, description="HOST:PORT of the rendezvous (a c10d store on one of the nodes)")
    rank_timeout_s: float = Field(60.0, gt=0, description="a distill rank whose heartbeat stops this long is "
                                                          "declared dead and the others stop")

    @field_validator("rdzv")
    @classmethod
    def _rdzv(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{v!r} is not HOST:PORT")
        return v

    @model_validator(mode="after")
    def _nodes_need_rdzv(self) -> "FlowConfig":
        if self.nodes > 1 and not self.rdzv:
            raise ValueError("nodes > 1 needs rdzv: HOST:PORT (the rendezvous every node reaches)")
        return self


class LoopConfig(_Section):
    """The crawl-selection loop (``kd3 run --loop N``): what distillation selected tells the crawl what to
    fetch next. Each round: per-class yield of the last distill run -> more downloads for the starved
    classes from their most productive queries and new ones -> curate -> distill on the grown pool."""

    rounds: int = Field(3, ge=0, description="rounds after the first pipeline run (kd3 run --loop N sets it)")
    budget_per_round: int = Field(200, gt=0, description="images to download per round, shared by the starved classes")
    min_selected: Optional[float] = Field(None, ge=0, description="a class with fewer selected images is starved "
                                                                  "(default: starved_fraction x the median class)")
    starved_fraction: float = Field(0.5, gt=0, le=1, description="default min_selected as a fraction of the median")
    last_epochs: int = Field(3, gt=0, description="a class's selected count: mean over the run's last N epochs")
    query_templates: list[str] = Field(
        default_factory=lambda: ["{c} close-up", "{c} isolated on white", "a single {c}", "{c} in the wild"],
        description="new query templates tried for starved classes ({c}: class name or synonym)")
    explore: int = Field(2, ge=0, description="untried queries a starved class tries per round")
    explore_share: float = Field(0.5, ge=0, le=1, description="share of a class's round budget for untried queries")
    distill: Literal["continue", "restart"] = Field(
        "continue", description="each round's student starts from the last round's (continue) or from scratch")
    epochs_per_round: Optional[int] = Field(None, gt=0, description="epochs of each round's distill "
                                                                    "(default: distill.epochs)")
    min_new: int = Field(1, ge=0, description="stop when a round adds fewer curated (kept) images than this")

    @field_validator("query_templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        return CrawlConfig._templates(v) if v else v  # none: only synonyms and the next source


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("default", description="run name: the folder runs/<name>")
    runs_root: Path = Field(Path("runs"), description="folder that holds the runs")
    classes: list[str] = Field(default_factory=list, description="class names")
    classes_file: Optional[Path] = Field(None, description="text file with one class name per line")
    teacher: Optional[Path] = Field(None, description="teacher checkpoint (its class list is used if none given)")
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or slugify(v) != v:
            raise ValueError(f"run name {v!r} must be a plain folder name (letters, digits, -, _)")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str]) -> list[str]:
        try:
            v = [validate_class_name(c) for c in v]
        except ConfigError as e:
            raise ValueError(str(e)) from None
        dups = sorted({c for c in v if v.count(c) > 1})
        if dups:
            raise ValueError(f"class names listed twice: {dups}")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name

    def resolved_classes(self) -> list[str]:
        """Class names from ``classes``, else ``classes_file``, else the teacher checkpoint."""
        if self.classes:
            return list(self.classes)
        if self.classes_file is not None:
            p = Path(self.classes_file)
            if not p.is_file():
                raise ConfigError(f"classes_file {p} does not exist")
            names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
            return _check_class_list(names, str(p))
        if self.teacher is not None:
            return _check_class_list(teacher_classes(self.teacher), str(self.teacher))
        raise ConfigError("no classes: set `classes`, `classes_file` or `teacher` in the config")

    def check_teacher_classes(self, where: str = "config") -> None:
        """``classes`` (or ``classes_file``) and an existing teacher must list the same names in the same
        order: the student's outputs mean the teacher's classes, in its order. kd3 refuses a reordered list
        instead of reordering it, because a list in another order is as likely another teacher's."""
        if self.teacher is None or not Path(self.teacher).is_file() or not (self.classes or self.classes_file):
            return
        given, theirs = self.resolved_classes(), teacher_classes(self.teacher)
        if given == theirs:
            return
        name = Path(self.teacher).name
        if sorted(given) == sorted(theirs):
            i = next(i for i, (a, b) in enumerate(zip(given, theirs)) if a != b)
            raise ConfigError(f"{where}: `classes` lists the {len(given)} classes of teacher {name} in another order "
                              f"(position {i}: {given[i]!r}, the teacher has {theirs[i]!r}); list them in the "
                              f"teacher's order or leave `classes` out to take the teacher's")
        try:
            check_classes(given, theirs, "`classes`", f"teacher {name}")
        except Kd3Error as e:
            raise ConfigError(f"{where}: {e}") from None

    def public_dict(self) -> dict[str, Any]:
        """JSON-able dict with secrets removed (for config.yaml snapshots, manifests, logs)."""
        d = json.loads(self.model_dump_json())
        for keys in _secret_paths(self):
            cur = d
            for k in keys[:-1]:
                cur = cur[k]
            cur[keys[-1]] = None
        return d

    def config_hash(self) -> str:
        d = self.public_dict()
        d.pop("name", None)
        d.pop("runs_root", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _teacher_classes(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    return tuple(read_teacher_classes(path))


def teacher_classes(path: str | os.PathLike) -> list[str]:
    """A teacher checkpoint's class names, read once per file version (a config asks many times)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return read_teacher_classes(p)  # names the missing file
    return list(_teacher_classes(str(p.resolve()), st.st_mtime_ns, st.st_size))


def _check_class_list(names: list[str], where: str) -> list[str]:
    if not names:
        raise ConfigError(f"{where} lists no class names")
    try:
        return RunConfig._classes(names)  # type: ignore[call-arg]
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _secret_paths(model: BaseModel, prefix: tuple = ()) -> list[tuple]:
    """Where a config holds a secret (a set ``SecretStr``, whichever section or plugin declared it)."""
    out = []
    for key, value in {**dict(model), **(model.__pydantic_extra__ or {})}.items():
        if isinstance(value, SecretStr):
            out.append(prefix + (key,))
        elif isinstance(value, BaseModel):
            out += _secret_paths(value, prefix + (key,))
    return out


def _format_validation_error(e: ValidationError, where: str, flags: dict[str, str] | None = None) -> str:
    """One line; a value that came from a command-line flag is blamed on the flag (``flags``: dotted key ->
    how it was given, e.g. ``--distill.student`` or ``--set distill.epochs``), any other on ``where``."""
    parts, blamed = [], set()
    for err in e.errors():
        inner = err.get("ctx", {}).get("error")
        found = inner.errors if isinstance(inner, PluginSettingsError) else [((), error_message(err))]
        for loc, msg in found:  # a plugin's own errors, at their place inside the section
            dotted = ".".join(str(x) for x in (*err["loc"], *loc)) or "<root>"
            flag = (flags or {}).get(dotted)
            blamed.add(flag or where)
            parts.append(f"{flag}: {msg}" if flag else f"{dotted}: {msg}")
    return (f"{where}: " if where in blamed else "") + "; ".join(parts)


def set_by_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = {}
            cur[k] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_override_value(text: str) -> Any:
    """``--set a.b=VALUE``: VALUE is read as YAML (numbers, bools, lists), else kept as a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                flags: dict[str, str] | None = None) -> RunConfig:
    """Load a YAML config (or defaults), apply dotted ``overrides``, validate. ``flags`` names the command-line
    flag each override came from, so an error in one names the flag, not the file."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for k, v in (overrides or {}).items():
        set_by_path(data, k, v)
    moved = moved_distill_keys()
    old = [k for k in moved if isinstance(data.get("distill"), dict) and k in data["distill"]]
    if old:
        raise ConfigError(f"{where}: distill.{old[0]} is now distill.{moved[old[0]]}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where, flags)) from None
    cfg.check_teacher_classes(where)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False, allow_unicode=True)


def save_resolved(cfg: RunConfig) -> Path:
    """Write ``runs/<name>/config.yaml`` (atomically, secrets removed), once: every stage and per-class task
    of a run calls this, and a file that already says the same is left alone."""
    out = cfg.run_dir / "config.yaml"
    text = dump_config(cfg)
    try:
        if out.read_text(encoding="utf-8") == text:
            return out
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_text(out, text)
    return out


def _is_path(ann: Any) -> bool:
    args = [a for a in (get_args(ann) or (ann,)) if a is not type(None)]
    return len(args) == 1 and (args[0] is Path or (get_origin(args[0]) is list and get_args(args[0]) == (Path,)))


def _absolute(p: Any) -> Any:
    """A local path made absolute; a URL (``file://...``, ``https://...``) stays as it is."""
    return p if "://" in str(p) else type(p)(Path(p).expanduser().resolve())


def absolute_config(cfg: RunConfig) -> RunConfig:
    """The same config with every path made absolute (a served flow or a torchrun rank may run elsewhere):
    every field typed as a path (or a list of paths), or marked ``json_schema_extra={"paths": True}`` (text
    that names local files, such as brace patterns), the plugins' fields included."""
    d = cfg.model_dump()
    for dotted, ann, info in iter_fields(RunConfig):
        if not (_is_path(ann) or (isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("paths"))):
            continue
        *keys, last = dotted.split(".")
        cur = d
        for k in keys:
            cur = cur[k]
        v = cur.get(last)
        if isinstance(v, list):
            cur[last] = [_absolute(p) for p in v]
        elif v is not None:
            cur[last] = _absolute(v)
    return RunConfig.model_validate(d)


def iter_fields(model: type[BaseModel] = RunConfig, prefix: str = ""):
    """Yield (dotted_name, annotation, FieldInfo) for every leaf field (for CLI flags)."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from iter_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ann, info
    if issubclass(model, (PluginFields, PluginSections)):  # the installed plugins' settings (a shared field once)
        seen = {f"{prefix}{name}" for name in model.model_fields}
        for sub, settings in model.plugin_fields():
            for dotted, ann, info in iter_fields(settings, f"{prefix}{sub}"):
                if dotted not in seen:
                    seen.add(dotted)
                    yield dotted, ann, info
