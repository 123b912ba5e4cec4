"""The demo world generator: deterministic, the promised composition, honest labels."""
import io

import numpy as np
import pytest
from PIL import Image

from kd3demo import world as dw
from pipeline.core.errors import ConfigError, DataError

SPEC = dw.WorldSpec(seed=3, n_per_class=10, junk_fraction=0.5, dup_fraction=0.4, n_broken=2, train_per_class=6)


@pytest.fixture(scope="module")
def pool():
    return dw.make_web_pool(SPEC)


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


def test_pool_is_deterministic_and_seed_dependent(pool):
    again = dw.make_web_pool(SPEC)
    assert [(p.name, p.sha256, p.kind) for p in again] == [(p.name, p.sha256, p.kind) for p in pool]
    other = dw.make_web_pool(dw.WorldSpec(seed=4, n_per_class=10, junk_fraction=0.5, dup_fraction=0.4,
                                          n_broken=2, train_per_class=6))
    assert {p.sha256 for p in other}.isdisjoint({p.sha256 for p in pool if p.kind == "digit"})


def test_composition_per_query(pool):
    comp = dw.composition(pool)
    assert sorted(comp) == sorted(dw.DIGIT_NAMES)
    for q, kinds in comp.items():
        assert kinds["digit"] == SPEC.n_per_class
        assert sum(kinds.get(k, 0) for k in dw.JUNK_KINDS) == SPEC.n_junk == 5
        # junk of every kind under every query (n_junk = 5 = number of junk kinds)
        for k in dw.JUNK_KINDS:
            assert kinds.get(k) == 1, (q, k, kinds)
        assert kinds["duplicate"] + kinds["reencoded"] == SPEC.n_dup == 4
        assert kinds["broken_truncated"] == kinds["broken_html"] == 1


def test_labels_are_by_query_only_and_truth_is_right(pool):
    by_name = {p.name: p for p in pool}
    for p in pool:
        assert p.query in dw.DIGIT_NAMES
        assert p.name.startswith("img/") and p.query not in p.name and p.kind not in p.name
        if p.kind == "digit":
            assert p.truth == p.query and p.params["text"] == str(dw.DIGIT_NAMES.index(p.query))
        elif p.kind == "other_digit":
            assert p.truth != p.query and p.params["text"] == str(dw.DIGIT_NAMES.index(p.truth))
        elif p.kind in ("letter", "shape", "photo", "noise") or p.kind.startswith("broken"):
            assert p.truth is None
        if p.kind == "letter":
            assert not p.params["text"].isdigit()
    names = [p.name for p in pool]
    assert len(names) == len(set(names))
    for p in pool:
        if p.kind == "duplicate":
            assert p.data == by_name[p.dup_of].data and p.name != p.dup_of
        if p.kind == "reencoded":
            src = by_name[p.dup_of]
            assert p.data != src.data and p.truth == src.truth and _decodes(p.data)


def test_images_decode_except_the_broken_ones(pool):
    for p in pool:
        ok = _decodes(p.data)
        assert ok == (not p.kind.startswith("broken")), (p.kind, p.name)
        if ok:
            with Image.open(io.BytesIO(p.data)) as im:
                assert min(im.size) >= SPEC.min_side
    html = [p for p in pool if p.kind == "broken_html"]
    assert html and all(p.data.startswith(b"<!DOCTYPE html>") and p.content_type == "image/jpeg" for p in html)


def test_original_split(tmp_path):
    counts = dw.write_original(tmp_path, SPEC)
    for split in ("train", "test"):
        for c in dw.DIGIT_NAMES:
            files = sorted((tmp_path / split / c).glob("*.png"))
            assert len(files) == counts[split][c] > 0
    assert all(n == SPEC.train_per_class for n in counts["train"].values())
    train_ids = {p.name for p in tmp_path.glob("train/*/*.png")}
    test_ids = {p.name for p in tmp_path.glob("test/*/*.png")}
    assert train_ids.isdisjoint(test_ids)
    assert 0.25 < len(test_ids) / 1797 < 0.35  # test_fraction 0.3 of all of load_digits
    im = Image.open(next((tmp_path / "test" / "seven").glob("*.png")))
    assert im.size == (32, 32) and im.mode == "RGB"
    # the stored image is the real scan: white ink on black, like load_digits
    a = np.asarray(im.convert("L"))
    assert a.max() > 200 and a[0, 0] < 30


def test_generate_world_writes_truth_and_is_idempotent(tmp_path):
    w = dw.generate_world(tmp_path / "w", SPEC)
    rows = dw.read_jsonl(w.truth_path)
    pool = dw.make_web_pool(SPEC)
    assert [r["sha256"] for r in rows] == [p.sha256 for p in pool]
    assert all((w.web_dir / "files" / r["name"]).is_file() for r in rows)
    assert w.counts["web"] == dw.composition(rows)
    again = dw.generate_world(tmp_path / "w", SPEC)  # reused, not regenerated
    assert again.counts == w.counts
    assert [p.sha256 for p in dw.load_world(tmp_path / "w").pool()] == [p.sha256 for p in pool]
    with pytest.raises(DataError, match="another spec"):
        dw.generate_world(tmp_path / "w", dw.WorldSpec(seed=99, n_per_class=10))


def test_bad_specs_name_the_culprit():
    with pytest.raises(ConfigError, match="n_per_class"):
        dw.WorldSpec(n_per_class=0)
    with pytest.raises(ConfigError, match="dup_fraction"):
        dw.WorldSpec(dup_fraction=2)
    with pytest.raises(ConfigError, match="size 'huge'"):
        dw.spec_for("huge")
