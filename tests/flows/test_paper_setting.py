"""README "The paper's setting": its run config, read from the README, run by ``kd3 run`` on a small array file
in the downsampled-ImageNet batch layout, with a teacher from ``kd3 teacher train`` (the distill tests' digits
teacher): crawl (read + assign by the teacher), curate, distill."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import yaml
from testlib import TESTS, load_module

_pools = load_module(TESTS / "pools" / "conftest.py", "kd3_pools_conftest")  # one Prefect harness: this folder's
digits_world, digit_pixels = _pools.digits_world, _pools.digit_pixels
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_config() -> dict:
    """The YAML block of README's "The paper's setting" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The paper's setting"):]
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))


def test_the_readme_paper_config_runs_end_to_end_on_a_small_batch_file(prefect_env, digits_world, digit_pixels,
                                                                       tmp_path, capsys):
    from pipeline.app.cli import main
    from pipeline.core.io import read_json

    imgs = digit_pixels[0].repeat(2, axis=1).repeat(2, axis=2)  # 32 x 32, as Imagenet32
    batch = tmp_path / "train_data_batch_1"  # N x 3072 uint8, channel-major, as downsampled ImageNet ships it
    batch.write_bytes(pickle.dumps({"data": imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1),
                                    "labels": [0] * len(imgs)}))
    cfg = readme_config()
    assert cfg["crawl"]["sources"] == ["arrays"] and cfg["crawl"]["assign"] == "teacher"
    cfg.update(name="paper", runs_root=str(tmp_path / "runs"), teacher=str(digits_world["teacher"]))
    cfg["crawl"]["arrays"] = [str(batch)]  # the same keys, a small file and CPU-sized training
    cfg["curate"].update(device="cpu", workers=0, batch_size=32)
    cfg["distill"].update(student="cnn_tiny", epochs=1, batch_size=16, workers=0, device="cpu",
                          eval_dir=str(digits_world["eval_dir"]))
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "paper"
    man = read_json(run / "manifest.json")
    assert man["classes"] == ["digit0", "digit1", "digit2", "digit3"] and man["nsamples"] > 40
    metrics = next((run / "distill").glob("kd3-*/metrics.json"))
    assert read_json(metrics)["final"]["done"]
    assert main(["inspect", str(run), "--json"]) == 0  # inspect reads the assigned classes like query classes
    summary = json.loads(capsys.readouterr().out)
    per = summary["per_class"]
    assert set(per) == set(man["classes"]) and sum(row["downloaded"] for row in per.values()) == 80
    assert sum(row["kept"] for row in per.values()) == man["nsamples"]
    assert main(["inspect", str(run), "--html"]) == 0 and (run / "report" / "index.html").is_file()
