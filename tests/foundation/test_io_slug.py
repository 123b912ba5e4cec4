import json
import os
import subprocess
import sys

import pytest

from pipeline.core.io import JsonlAppender, atomic_path, atomic_write_json, read_jsonl, sha256_file
from pipeline.core.slug import slugify, unique_slugs


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask-022", "umask-077", "umask-002"])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    """Atomic writes go through a temp file (mkstemp: 0600); the file left must have the mode any
    new file gets under the umask, so another user, a web server or a trainer can read it."""
    from pipeline.core.io import atomic_write_bytes, current_umask, write_jsonl_atomic

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        written = [atomic_write_json(tmp_path / "m.json", {"v": 1}), atomic_write_bytes(tmp_path / "b", b"x"),
                   atomic_write_bytes(tmp_path / "c", b"y", overwrite=False),
                   write_jsonl_atomic(tmp_path / "r.jsonl", [{"a": 1}])]
        with atomic_path(tmp_path / "t.tar") as tmp:
            with open(tmp, "wb") as fh:  # writers that open the temp path themselves (tar, torch, faiss)
                fh.write(b"tar")
            written.append(tmp_path / "t.tar")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


def test_atomic_no_overwrite_keeps_first(tmp_path):
    target = tmp_path / "blob"
    with atomic_path(target, overwrite=False) as tmp:
        tmp.write_bytes(b"first")
    with atomic_path(target, overwrite=False) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"first"


def test_write_in_a_thread_cut_off_by_exit_leaves_no_temp_file(tmp_path):
    """A Ctrl-C ends kd3 while a worker thread is inside an atomic write: the interpreter exits, the
    thread dies mid-write, and its temporary file must not stay behind (nor the target appear)."""
    code = f"""
import threading, time
from pipeline.core.io import atomic_path
inside = threading.Event()
def writer():
    with atomic_path({str(tmp_path / 'metrics.json')!r}) as tmp:
        tmp.write_text('{{"half": ')
        inside.set()
        time.sleep(60)
threading.Thread(target=writer, daemon=True).start()
inside.wait(10)
raise SystemExit(130)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_jsonl_torn_tail_is_repaired(tmp_path):
    p = tmp_path / "r.jsonl"
    with JsonlAppender(p) as w:
        w.write({"i": 1})
        w.write({"i": 2})
    with open(p, "a") as fh:
        fh.write('{"i": 3, "trunc')  # a crash mid-line
    assert [r["i"] for r in read_jsonl(p)] == [1, 2]
    with JsonlAppender(p) as w:
        w.write({"i": 4})
    assert [r["i"] for r in read_jsonl(p)] == [1, 2, 4]


def test_jsonl_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"i": 1}\nnot json\n{"i": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def test_kill9_during_appends_never_corrupts(tmp_path):
    p = tmp_path / "r.jsonl"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from pipeline.core.io import JsonlAppender\n"
        "w = JsonlAppender(%r)\n"
        "i = 0\n"
        "while True:\n"
        "    w.write({'i': i, 'pad': 'x' * 1000}); i += 1\n"
    ) % (os.getcwd(), str(p))
    proc = subprocess.Popen([sys.executable, "-c", code])
    import time

    deadline = time.time() + 20
    while time.time() < deadline and (not p.exists() or p.stat().st_size < 200_000):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rows = read_jsonl(p)
    assert len(rows) > 50
    assert [r["i"] for r in rows] == list(range(len(rows)))


def test_sha256_file(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", "x\\y", "  spaced  name ", "c:\\win", "." * 5])
def test_slug_is_a_safe_single_component(name):
    s = slugify(name)
    assert s and "/" not in s and "\\" not in s and s not in (".", "..") and not s.startswith(".")


def test_slug_readable_and_unique():
    assert slugify("Golden Retriever") == "golden_retriever"
    assert slugify("猫") == "猫"
    assert slugify("a/b") != slugify("a_b")
    m = unique_slugs(["a/b", "a_b", "A B"])
    assert len(set(m.values())) == 3
