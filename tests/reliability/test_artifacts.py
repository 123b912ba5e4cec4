"""Corrupt or hostile artifacts given to `kd3 distill` / `kd3 teacher info` / `kd3 crawl --teacher`:
one line naming the file, exit 2, no traceback, nothing executed, no output folder half made."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.core.io import atomic_write_json, sha256_file

from reliability_helpers import assert_one_line_error, kd3

CLASSES = ["zero", "one"]


def _png(i: int) -> bytes:
    im = Image.new("RGB", (16, 16), (i * 20 % 256, 90, 200 - i * 10 % 200))
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _write_run(run: Path, n: int = 8, evil_member=None, classes=CLASSES) -> Path:
    """A curated-looking run: one webdataset shard + manifest with its true sha256 and size."""
    (run / "shards").mkdir(parents=True, exist_ok=True)
    tar = run / "shards" / "r-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for i in range(n):
            key = hashlib.sha256(str(i).encode()).hexdigest()[:16]
            _member(tf, f"{key}.png", _png(i))
            _member(tf, f"{key}.json", json.dumps({"class": classes[i % 2], "label": i % 2}).encode())
            _member(tf, f"{key}.cls", str(i % 2).encode())
        if evil_member is not None:
            evil_member(tf)
    man = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": run.name,
           "shardlist": [{"url": "shards/r-000000.tar", "nsamples": n, "filesize": tar.stat().st_size,
                          "sha256": sha256_file(tar)}],
           "classes": list(classes), "class_counts": {}, "nsamples": n}
    atomic_write_json(run / "manifest.json", man)
    return tar


def _restamp(run: Path) -> None:
    """Make the manifest agree with the (tampered) shard, so only the tar check can catch it."""
    man = json.loads((run / "manifest.json").read_text())
    tar = run / "shards" / "r-000000.tar"
    man["shardlist"][0].update(filesize=tar.stat().st_size, sha256=sha256_file(tar))
    atomic_write_json(run / "manifest.json", man)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import torch

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("t") / "teacher.pt"
    save_checkpoint(p, "cnn_tiny", CLASSES, 16, [0.5] * 3, [0.5] * 3, create_model("cnn_tiny", 2).state_dict())
    return p


def _distill(run: Path, teacher: Path):
    return kd3("distill", "--run", run, "--classes", ",".join(CLASSES), "--teacher", teacher, "--method", "kd",
               "--student", "cnn_tiny", "--epochs", "1", "--distill.device", "cpu", "--distill.workers", "0",
               "--distill.batch_size", "4", "--distill.val_fraction", "0")


def _no_output(run: Path) -> None:
    out = run / "distill"
    assert not out.exists() or not any(p.name == "student.pt" for p in out.rglob("*")), list(out.rglob("*"))


def _corrupt_byte(run):
    tar = run / "shards" / "r-000000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    tar.write_bytes(bytes(data))


def _delete(run):
    (run / "shards" / "r-000000.tar").unlink()


def _truncate(run):
    tar = run / "shards" / "r-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: 512 * 5 + 100])  # cut inside the third member
    _restamp(run)


CASES = {
    "sha_mismatch": (_corrupt_byte, ["r-000000.tar", "sha256"]),
    "missing_shard": (_delete, ["r-000000.tar", "missing"]),
    "truncated_tar": (_truncate, ["r-000000.tar"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_shards_refused(tmp_path, teacher, case):
    run = tmp_path / "runs" / "r"
    _write_run(run)
    tamper, needles = CASES[case]
    tamper(run)
    line = assert_one_line_error(_distill(run, teacher), *needles)
    if case == "truncated_tar":
        assert "tar" in line or "truncated" in line or "corrupt" in line, line
    _no_output(run)


def _dotdot(tf):
    _member(tf, "../../evil.png", _png(99))


def _symlink(tf):
    ti = tarfile.TarInfo("aaaaaaaaaaaaaaaa.png")
    ti.type = tarfile.SYMTYPE
    ti.linkname = "/etc/passwd"
    tf.addfile(ti)


def _absolute(tf):
    _member(tf, "/tmp/kd3-evil.png", _png(98))


@pytest.mark.parametrize("evil, needle", [(_dotdot, "../../evil.png"), (_symlink, "link"),
                                          (_absolute, "/tmp/kd3-evil.png")])
def test_hostile_tar_members_refused(tmp_path, teacher, evil, needle):
    run = tmp_path / "runs" / "r"
    _write_run(run, evil_member=evil)  # the manifest's sha256 matches: only the member check can refuse it
    assert_one_line_error(_distill(run, teacher), "r-000000.tar", "refused member", needle)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "runs" / "evil.png").exists()
    _no_output(run)


class _Payload:
    """Unpickling this runs a shell command that creates ``marker`` (a real code-execution payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    import torch

    marker = tmp_path / "PWNED"
    p = tmp_path / "evil-teacher.pt"
    torch.save({"format": "kd3-checkpoint-v1", "arch": "cnn_tiny", "arch_kwargs": {}, "classes": CLASSES,
                "input_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "state_dict": {}, "x": _Payload(marker)}, p)
    return p, marker


def test_pickle_payload_teacher_never_executes(tmp_path):
    import torch

    evil, marker = _evil_checkpoint(tmp_path)
    run = tmp_path / "runs" / "r"
    _write_run(run)
    for r in (kd3("teacher", "info", evil), _distill(run, evil),
              kd3("crawl", "--teacher", evil, "--set", f"runs_root={tmp_path / 'runs'}")):
        assert_one_line_error(r, str(evil), "refused")
        assert not marker.exists()
    _no_output(run)
    # control: the payload is real; full unpickling (what kd3 never does) runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_teacher_classes_must_match_the_manifest(tmp_path, teacher):
    run = tmp_path / "runs" / "r"
    _write_run(run, classes=["zero", "seven"])
    r = kd3("distill", "--run", run, "--teacher", teacher, "--method", "kd", "--student", "cnn_tiny",
            "--epochs", "1", "--distill.device", "cpu", "--distill.workers", "0")
    line = assert_one_line_error(r, "teacher.pt", "seven")
    assert "one" in line
    _no_output(run)


@pytest.mark.parametrize("content, needle", [
    (b"name: pets\nclasses: [cat, dog]\n", "holds text"),
    (b'{"arch": "resnet18"}', "holds text"),
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "starts with bytes 89 50 4e 47"),
])
def test_non_checkpoint_teacher_is_named_for_what_it_is(tmp_path, content, needle):
    """A text, YAML or image file given as the teacher is not "a file holding pickled Python objects"."""
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(content)
    line = assert_one_line_error(kd3("teacher", "info", bad), str(bad), "not a PyTorch checkpoint", needle)
    assert "pickled" not in line
