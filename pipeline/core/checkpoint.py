"""The teacher / student checkpoint contract (docs/INTERFACES.md).

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so a file carrying a pickled object (code) is refused::

    {"format": "kd3-checkpoint-v1", "arch": "resnet34" | "timm:<name>" | "torchvision:<name>",
     "arch_kwargs": {...}, "classes": [...], "input_size": 32,
     "mean": [3 floats], "std": [3 floats], "state_dict": {...}}

TorchScript files are accepted too: their metadata (everything above but the weights) lives in
the ``kd3.json`` extra file (``torch.jit.save(m, path, _extra_files={"kd3.json": ...})``).
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

from .errors import DataError, one_line
from .io import atomic_path

FORMAT = "kd3-checkpoint-v1"
META_KEYS = ("format", "arch", "arch_kwargs", "classes", "input_size", "mean", "std")
TS_EXTRA = "kd3.json"


def _validate_meta(meta: dict, where: str) -> dict:
    missing = [k for k in ("arch", "classes", "input_size", "mean", "std") if k not in meta]
    if missing:
        raise DataError(f"{where}: checkpoint lacks {', '.join(missing)}")
    classes = meta["classes"]
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{where}: 'classes' must be a non-empty list of names")
    for key in ("mean", "std"):
        v = meta[key]
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            raise DataError(f"{where}: '{key}' must be 3 floats, got {v!r}")
        if key == "std" and any(float(s) <= 0 for s in v):
            raise DataError(f"{where}: 'std' must be positive, got {v!r}")
    if not isinstance(meta["input_size"], int) or meta["input_size"] <= 0:
        raise DataError(f"{where}: 'input_size' must be a positive int, got {meta['input_size']!r}")
    out = {k: meta.get(k) for k in META_KEYS}
    out["format"] = meta.get("format", FORMAT)
    out["arch_kwargs"] = dict(meta.get("arch_kwargs") or {})
    out["classes"] = list(classes)
    out["mean"] = [float(x) for x in meta["mean"]]
    out["std"] = [float(x) for x in meta["std"]]
    return out


def make_meta(arch: str, classes, input_size: int, mean, std, arch_kwargs: dict | None = None) -> dict:
    return _validate_meta(
        {"format": FORMAT, "arch": str(arch), "arch_kwargs": dict(arch_kwargs or {}), "classes": list(classes),
         "input_size": int(input_size), "mean": list(mean), "std": list(std)},
        "checkpoint",
    )


def save_checkpoint(path, arch: str, classes, input_size: int, mean, std, state_dict: dict,
                    arch_kwargs: dict | None = None) -> Path:
    """Write the contract atomically (temp file + rename). Tensors are moved to CPU."""
    import torch  # heavy: the kernel loads torch only when a checkpoint is read or written

    meta = make_meta(arch, classes, input_size, mean, std, arch_kwargs)
    sd = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state_dict.items()}
    obj = dict(meta, state_dict=sd)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def is_torchscript(path) -> bool:
    """TorchScript archives are zip files holding ``<name>/code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _read_ts_meta(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        cand = [n for n in z.namelist() if n.endswith("/extra/" + TS_EXTRA)]
        if not cand:
            raise DataError(f"{path}: TorchScript file has no {TS_EXTRA} extra file (class names, mean/std)")
        try:
            meta = json.loads(z.read(cand[0]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: {TS_EXTRA} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: {TS_EXTRA} must hold a JSON object")
    meta.setdefault("arch", "torchscript")
    return _validate_meta(meta, str(path))


def _check_torch_file(p: Path) -> None:
    """``torch.save`` writes a zip archive (legacy files: a pickle, first byte 0x80); anything else (a
    text, YAML or image file given as the teacher) is named for what it is, not read as a pickle."""
    with open(p, "rb") as fh:
        head = fh.read(64)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return
    if not head:
        what = "it is empty"
    else:
        try:
            text = head.decode("utf-8")
            what = f"it holds text ({one_line(text, 40)!r}...)"
        except UnicodeDecodeError:
            what = f"it starts with bytes {head[:8].hex(' ')}"
    raise DataError(f"{p}: not a PyTorch checkpoint: {what}; a teacher is a file written by torch.save "
                    f"(pipeline.core.checkpoint.save_checkpoint) or torch.jit.save")


def load_checkpoint(path, map_location: str = "cpu") -> dict:
    """Load a contract file: metadata + ``state_dict``. Pickled objects are refused."""
    import torch  # heavy: the kernel loads torch only when a checkpoint is read or written

    p = Path(path)
    if not p.is_file():
        raise DataError(f"checkpoint {p} does not exist")
    if is_torchscript(p):
        raise DataError(f"{p} is a TorchScript file: load it with distill.teacher.load_teacher")
    _check_torch_file(p)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError and friends: never fall back to full unpickling
        msg = one_line(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "Unpickl" in type(e).__name__:
            raise DataError(f"{p}: refused: the file holds pickled Python objects, not only tensors and "
                            f"plain data; kd3 loads checkpoints with weights_only=True and never runs pickled "
                            f"code (re-save it with pipeline.core.checkpoint.save_checkpoint)") from None
        raise DataError(f"{p}: not a readable checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise DataError(f"{p}: not a kd3 checkpoint (expected a dict with 'state_dict' and metadata)")
    if obj.get("format", FORMAT) != FORMAT:
        raise DataError(f"{p}: unknown checkpoint format {obj.get('format')!r} (expected {FORMAT})")
    meta = _validate_meta(obj, str(p))
    sd = obj["state_dict"]
    if not isinstance(sd, dict):
        raise DataError(f"{p}: 'state_dict' is not a dict")
    return dict(meta, state_dict=sd)


def read_checkpoint_meta(path) -> dict:
    """Everything but the weights, for contract files and TorchScript files alike."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"checkpoint {p} does not exist")
    if is_torchscript(p):
        return _read_ts_meta(p)
    meta = load_checkpoint(p)
    meta.pop("state_dict")
    return meta


def read_teacher_classes(path) -> list[str]:
    return list(read_checkpoint_meta(path)["classes"])


def save_torchscript(path, scripted_module, meta: dict) -> Path:
    """Save a TorchScript module with the contract metadata in its ``kd3.json`` extra file."""
    import torch  # heavy: the kernel loads torch only when a checkpoint is read or written

    meta = _validate_meta(dict(meta), str(path))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        torch.jit.save(scripted_module, str(tmp), _extra_files={TS_EXTRA: json.dumps(meta)})
    return Path(path)


def check_classes(have, want, where_have: str, where_want: str) -> None:
    """Raise a one-line DataError listing the differences between two class lists."""
    have, want = list(have), list(want)
    if have == want:
        return
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    parts = []
    if missing:
        parts.append(f"missing in {where_have}: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        parts.append(f"not in {where_want}: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    if not parts:
        parts.append("same names in a different order")
    raise DataError(f"class names of {where_have} do not match {where_want}: " + "; ".join(parts))


__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "read_teacher_classes",
           "save_torchscript", "is_torchscript", "check_classes", "make_meta"]
