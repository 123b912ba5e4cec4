"""Class names are user input: make them safe path components, keep them readable."""
from __future__ import annotations

import hashlib
import re
import unicodedata

from .errors import ConfigError

MAX_CLASS_NAME = 200
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")


def validate_class_name(name: str) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"class name {name!r} is not a string")
    if "\x00" in name:
        raise ConfigError(f"class name {name!r} contains a NUL byte")
    stripped = name.strip()
    if not stripped:
        raise ConfigError("a class name is empty")
    if len(stripped) > MAX_CLASS_NAME:
        raise ConfigError(f"class name {stripped[:40]!r}... is longer than {MAX_CLASS_NAME} characters")
    return stripped


def slugify(name: str, max_len: int = 80) -> str:
    """A filesystem-safe, human-readable slug; unicode letters are kept.

    ``"Golden retriever"`` -> ``"golden_retriever"``; ``"猫"`` -> ``"猫"``;
    ``"../etc/passwd"`` -> ``"etc_passwd-<hash>"``. Whenever sanitising or truncation changed
    the name, a short hash of the original is appended, so two names never share a slug.
    """
    plain = re.sub(r"\s+", "_", unicodedata.normalize("NFKC", name).strip().lower())
    s = _UNSAFE.sub("_", plain)
    s = re.sub(r"\.{2,}", "_", s)
    s = re.sub(r"_+", "_", s).strip("._")[:max_len]
    if s != plain or not s:
        s = (s or "class") + "-" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:6]
    return s


def unique_slugs(names: list[str]) -> dict[str, str]:
    """Map each class name to a slug, disambiguating collisions deterministically."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for n in names:
        s = slugify(n)
        if s in seen and seen[s] != n:
            s = f"{s}-{hashlib.sha1(n.encode('utf-8')).hexdigest()[:6]}"
        seen[s] = n
        out[n] = s
    return out
