"""The flows' cache keys come from what each stage declares it reads (``distill.stage.reads``, each crawl
source's ``inputs``): a file's bytes or a folder's tree changing changes the key, and a path setting a stage
gains cannot be left out of its key."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, get_args

from pipeline.core.config import DistillConfig, load_config


def _teacher(path: Path, seed: int) -> Path:
    import torch

    from distill.models import create_model
    from pipeline.core.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(path, "cnn_tiny", ["a", "b"], 32, [0.5] * 3, [0.5] * 3, create_model("cnn_tiny", 2).state_dict())
    return path


def _cfg(tmp_path, **distill):
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        _teacher(teacher, 0)
    return load_config(None, {"name": "keys", "runs_root": str(tmp_path / "runs"), "classes": ["a", "b"],
                              "teacher": str(teacher), "distill": distill})


def test_every_path_setting_of_distill_is_a_declared_read(tmp_path):
    from distill.stage import reads

    path_fields = {name for name, f in DistillConfig.model_fields.items()
                   if f.annotation in (Path, Optional[Path]) or Path in get_args(f.annotation)}
    assert path_fields == {"eval_dir", "anchor_dir", "keys_file"}
    assert path_fields <= set(reads(_cfg(tmp_path)))


def test_distill_key_changes_with_what_it_reads(tmp_path):
    from flows.stages import _distill_key_parts

    keys = tmp_path / "keys.txt"
    keys.write_text("aaaa\n")
    anchors = tmp_path / "anchors" / "a"
    anchors.mkdir(parents=True)
    (anchors / "1.png").write_bytes(b"x")
    cfg = _cfg(tmp_path, keys_file=str(keys), anchor_dir=str(tmp_path / "anchors"))
    k0 = _distill_key_parts({"config": cfg})
    assert _distill_key_parts({"config": cfg}) == k0
    keys.write_text("bbbb\n")  # same path, other content
    k1 = _distill_key_parts({"config": cfg})
    assert k1["keys_file"] != k0["keys_file"] and k1["anchor_dir"] == k0["anchor_dir"]
    (anchors / "2.png").write_bytes(b"y")
    assert _distill_key_parts({"config": cfg})["anchor_dir"] != k1["anchor_dir"]
    _teacher(Path(cfg.teacher), 1)  # another teacher under the same name
    assert _distill_key_parts({"config": cfg})["teacher"] != k0["teacher"]


def test_curate_key_comes_from_its_declared_reads(tmp_path):
    """With crawl records, curate reads them (their images are content-addressed), not the crawl's sources;
    without, the crawl.folder tree; plus the teacher, CLIP weights and decontamination folder it may use."""
    from flows.stages import _curate_key_parts
    from pipeline.curate.sources import reads

    folder = tmp_path / "tree" / "a"
    folder.mkdir(parents=True)
    (folder / "1.png").write_bytes(b"x")
    base = _cfg(tmp_path)
    cfg = base.model_copy(update={"crawl": base.crawl.model_copy(update={"folder": tmp_path / "tree"})})
    assert set(reads(cfg)) == {"records", "folder", "teacher", "clip_weights", "decontaminate"}
    k0 = _curate_key_parts({"config": cfg})
    (folder / "2.png").write_bytes(b"y")
    k1 = _curate_key_parts({"config": cfg})
    assert k1["folder"] != k0["folder"]  # no crawl output: the folder is what curate reads
    records = Path(cfg.run_dir) / "crawl" / "records.jsonl"
    records.parent.mkdir(parents=True)
    records.write_text('{"class": "a"}\\n')
    k2 = _curate_key_parts({"config": cfg})
    assert k2["folder"] is None and k2["records"] not in (None, "missing")
    (folder / "3.png").write_bytes(b"z")  # the records decide now: the folder changing changes nothing
    assert _curate_key_parts({"config": cfg}) == k2
