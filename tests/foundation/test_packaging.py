"""A production install carries kd3 and nothing of the demo: the wheel built from the repository holds the
four packages and no `kd3demo` (the demo world and the fake web are the second distribution in `demo/`)."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_kd3_wheel_leaves_the_demo_out(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    wheel, = tmp_path.glob("kd3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.startswith("kd3-")}
    assert tops == {"pipeline", "crawlers", "distill", "flows"}, tops
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kd3demo" not in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_demo_distribution_adds_kd3_demo():
    from importlib.metadata import distribution

    import kd3demo

    assert Path(kd3demo.__file__).resolve().parent == REPO / "demo" / "kd3demo"
    eps = [e for e in distribution("kd3-demo").entry_points if e.group == "kd3.commands"]
    assert [e.value for e in eps] == ["kd3demo.demo:register"]
