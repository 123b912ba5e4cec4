"""Checkpoint contract, model interface, teacher loading and shard verification."""
import io
import json
import os
import tarfile

import pytest
import torch

from distill.data import open_web_data, verify_shards
from pipeline.core.records import read_manifest as load_manifest
from distill.models import create_model
from distill.teacher import load_teacher
from pipeline.core.checkpoint import (load_checkpoint, read_checkpoint_meta, read_teacher_classes, save_checkpoint,
                                 save_torchscript)
from pipeline.core.errors import DataError, Kd3Error

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["resnet18", "resnet8x4", "wrn_16_2", "mobilenetv2", "cnn_small",
                                  "torchvision:resnet18", "timm:resnet18"])
def test_uniform_model_interface(arch):
    m = create_model(arch, 7).eval()
    x = torch.randn(2, 3, 32, 32)
    f = m.forward_features(x)
    assert f.dim() == 4 and f.shape[1] == m.feature_dim
    assert isinstance(m.classifier, torch.nn.Linear) and m.classifier.out_features == 7
    assert torch.allclose(m(x), m.classifier(m.pool(f)), atol=1e-5)


def test_cifar_resnet_has_no_maxpool_stem():
    m = create_model("resnet18", 10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    assert m.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4
    assert 250_000 < sum(p.numel() for p in create_model("cnn_small", 10).parameters()) < 400_000


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(Kd3Error, match="unknown architecture 'nope'"):
        create_model("nope", 3)


def test_checkpoint_round_trip(tmp_path):
    m = create_model("cnn_small", 3).eval()
    p = save_checkpoint(tmp_path / "t.pt", "cnn_small", ["a", "b", "c"], 16, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5],
                        m.state_dict())
    meta = read_checkpoint_meta(p)
    assert meta["classes"] == ["a", "b", "c"] and meta["input_size"] == 16 and meta["mean"] == [0.1, 0.2, 0.3]
    assert "state_dict" not in meta and read_teacher_classes(p) == ["a", "b", "c"]
    t, tmeta = load_teacher(p, classes=["a", "b", "c"])
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(t(x), m(x), atol=1e-6)
    assert not any(q.requires_grad for q in t.parameters())
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "evil.pt"
    torch.save({"format": "kd3-checkpoint-v1", "arch": "cnn_small", "classes": ["a", "b"], "input_size": 16,
                "mean": [0, 0, 0], "std": [1, 1, 1], "state_dict": {}, "payload": Evil()}, p)
    with pytest.raises(DataError, match="refused: the file holds pickled Python objects"):
        load_checkpoint(p)
    with pytest.raises(DataError, match="refused"):
        load_teacher(p)
    assert not marker.exists()


def test_class_mismatch_lists_the_difference(tmp_path):
    m = create_model("cnn_tiny", 3)
    p = save_checkpoint(tmp_path / "t.pt", "cnn_tiny", ["cat", "dog", "fox"], 16, [0] * 3, [1] * 3, m.state_dict())
    with pytest.raises(DataError, match=r"missing in teacher t.pt: \['owl'\]; not in the manifest: \['fox'\]"):
        load_teacher(p, classes=["cat", "dog", "owl"])
    with pytest.raises(DataError, match="different order"):
        load_teacher(p, classes=["dog", "cat", "fox"])


def test_bad_metadata_and_wrong_weights(tmp_path):
    with pytest.raises(DataError, match="'std' must be positive"):
        save_checkpoint(tmp_path / "x.pt", "cnn_tiny", ["a", "b"], 16, [0] * 3, [0, 1, 1], {})
    assert not (tmp_path / "x.pt").exists()
    p = save_checkpoint(tmp_path / "y.pt", "cnn_small", ["a", "b"], 16, [0] * 3, [1] * 3,
                        create_model("cnn_tiny", 2).state_dict())
    with pytest.raises(DataError, match="weights do not fit architecture 'cnn_small'"):
        load_teacher(p)


def test_torchscript_teacher_with_extra_file(tmp_path):
    m = create_model("cnn_tiny", 2).eval()
    x = torch.randn(2, 3, 16, 16)
    traced = torch.jit.trace_module(m, {"forward": x, "forward_features": x})
    meta = {"arch": "cnn_tiny", "classes": ["a", "b"], "input_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    p = save_torchscript(tmp_path / "t.ts", traced, meta)
    assert read_teacher_classes(p) == ["a", "b"]
    t, tmeta = load_teacher(p, classes=["a", "b"])
    assert torch.allclose(t(x), m(x), atol=1e-5)
    assert torch.allclose(t.classifier(t.pool(t.forward_features(x))), m(x), atol=1e-5)
    plain = tmp_path / "plain.ts"
    torch.jit.save(traced, str(plain))
    with pytest.raises(DataError, match="no kd3.json"):
        load_teacher(plain)


# ---------------------------------------------------------------- shards
def test_shard_sha_mismatch_refused(digits_world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_world["run"], run)
    man = run / "manifest.json"
    assert len(verify_shards(man)) >= 2
    shard = run / load_manifest(man)["shardlist"][1]["url"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard shards/{shard.name} is corrupt: sha256"):
        open_web_data(man, 16, [0] * 3, [1] * 3)
    # two ranks share the hashing: the rank that hashes shard 1 refuses it, the other checks only its size
    with pytest.raises(DataError, match=rf"shard shards/{shard.name} is corrupt: sha256"):
        verify_shards(man, part=(1, 2))
    assert len(verify_shards(man, part=(0, 2))) == len(load_manifest(man)["shardlist"])
    shard.unlink()
    with pytest.raises(DataError, match=rf"shard shards/{shard.name} listed in .* is missing"):
        verify_shards(man)


def _manifest_for(tmp_path, members):
    from pipeline.core.io import atomic_write_json, sha256_file

    p = tmp_path / "shards" / "bad-000000.tar"
    p.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(p, "w") as tf:
        for ti, payload in members:
            tf.addfile(ti, io.BytesIO(payload) if payload is not None else None)
    atomic_write_json(tmp_path / "manifest.json", {"shardlist": [{"url": "shards/bad-000000.tar", "nsamples": 1,
                                                                   "filesize": p.stat().st_size,
                                                                   "sha256": sha256_file(p)}],
                                                    "classes": ["a", "b"]})
    return tmp_path / "manifest.json"


def test_tar_traversal_and_links_refused(tmp_path):
    ti = tarfile.TarInfo("../evil.png")
    ti.size = 3
    man = _manifest_for(tmp_path / "a", [(ti, b"abc")])
    with pytest.raises(DataError, match=r"refused member '../evil.png' \(path escapes"):
        open_web_data(man, 16, [0] * 3, [1] * 3)
    link = tarfile.TarInfo("k1.png")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    man = _manifest_for(tmp_path / "b", [(link, None)])
    with pytest.raises(DataError, match=r"refused member 'k1.png' \(link\)"):
        open_web_data(man, 16, [0] * 3, [1] * 3)


def test_pool_has_stable_keys_and_disjoint_holdout(digits_world):
    a = open_web_data(digits_world["manifest"], 16, [0] * 3, [1] * 3, val_fraction=0.2)
    b = open_web_data(digits_world["manifest"], 16, [0] * 3, [1] * 3, val_fraction=0.2)
    assert a.pool.keys == b.pool.keys and len(a.pool) + len(a.holdout) == digits_world["n_web"]
    assert not set(a.pool.keys) & set(a.holdout.keys)
    x, i = a.pool[5]
    assert x.shape == (3, 16, 16) and i == 5
    assert len(a.pool.keys[0]) == 16
