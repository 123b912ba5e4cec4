"""Curate's scan decodes each file once at the working size (a large JPEG at reduced scale in libjpeg):
validation keeps every guarantee, the facts keep the file's own size, the pHash and thumbnail barely move
and still match copies, and a cache written by the full-size decode is recomputed, never mixed."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from curate_fixtures import bomb_png, jpeg, make_cfg, png
from curate_groups import hamming
from pipeline.curate.hashing import facts_of, pixel_diff, thumbs_array
from pipeline.curate.validate import inspect_image

CAP = 89_478_485
SIDE = 224


def big(img: Image.Image, side: int = 1600) -> Image.Image:
    w, h = img.size
    return img.resize((side, side * h // w), Image.BICUBIC)


def test_large_jpeg_decoded_at_working_size_keeps_its_facts(images):
    src = big(images["chelsea"])
    data = jpeg(src)
    full, rgb_full = inspect_image(data, CAP)
    f, rgb = inspect_image(data, CAP, SIDE)
    assert f.ok and f.to_row() == full.to_row()  # size, mode, format, pixels: the file's own
    assert (f.w, f.h) == src.size and rgb.mode == "RGB"
    assert SIDE <= min(rgb.size) < 2 * SIDE
    assert abs(rgb.width / rgb.height - src.width / src.height) < 0.01
    # the same picture: the full decode brought to the same size differs by JPEG noise only
    ref = np.asarray(rgb_full.resize(rgb.size, Image.BOX), float)
    assert np.abs(np.asarray(rgb, float) - ref).mean() < 3


@pytest.mark.parametrize("size", [(300, 200), (400, 300), (447, 600)])
def test_small_images_are_decoded_as_before(images, size):
    """Shorter side below work_side, or in [work_side, 2 work_side): no reduction, the very same pixels."""
    data = jpeg(images["chelsea"].resize(size))
    (f0, a), (f1, b) = inspect_image(data, CAP), inspect_image(data, CAP, SIDE)
    assert f0.to_row() == f1.to_row() and np.array_equal(np.asarray(a), np.asarray(b))


def test_reduced_decode_keeps_every_validation_guarantee(images):
    data = jpeg(big(images["coffee"]))
    f, rgb = inspect_image(data[: len(data) // 3], CAP, SIDE)  # truncated: every byte is still entropy-decoded
    assert not f.ok and rgb is None and "truncated" in f.error
    f, rgb = inspect_image(bomb_png(4000, 3000), 1_000_000, SIDE)  # bomb: the header decides, nothing decoded
    assert f.bomb and not f.ok and rgb is None and f.pixels == 12_000_000
    flower = big(images["flower"])
    f, rgb = inspect_image(jpeg(flower.convert("CMYK"), 95), CAP, SIDE)  # CMYK
    assert f.ok and f.mode == "CMYK" and rgb.mode == "RGB" and (f.w, f.h) == flower.size
    ref = flower.resize(rgb.size, Image.BOX)
    assert np.abs(np.asarray(rgb, float) - np.asarray(ref, float)).mean() < 12
    a = np.asarray(big(images["astronaut"]).convert("RGBA")).copy()  # alpha (PNG: decoded, then reduced)
    a[:, :600, 3] = 0
    f, rgb = inspect_image(png(Image.fromarray(a, "RGBA")), CAP, SIDE)
    assert f.ok and f.mode == "RGBA" and (f.w, f.h) == (1600, 1600) and SIDE <= min(rgb.size) < 2 * SIDE
    assert (np.asarray(rgb)[:, : 600 * rgb.width // 1600 - 1] == 255).all()
    gray = np.asarray(big(images["camera"]).convert("L"))  # 16-bit
    f, rgb = inspect_image(png(Image.fromarray(gray.astype(np.uint16) * 257)), CAP, SIDE)
    assert f.ok and f.mode.startswith("I") and rgb.mode == "RGB" and np.asarray(rgb).max() > 200


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_at_reduced_scale(images, orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    src = big(images["rocket"])
    data = jpeg(src, exif=ex.tobytes())
    full, rgb_full = inspect_image(data, CAP)
    f, rgb = inspect_image(data, CAP, SIDE)
    assert (f.w, f.h) == (full.w, full.h) == (src.size if orientation == 3 else src.size[::-1])
    assert abs(rgb.width / rgb.height - f.w / f.h) < 0.01
    ref = np.asarray(rgb_full.resize(rgb.size, Image.BOX), float)
    assert np.abs(np.asarray(rgb, float) - ref).mean() < 3


def test_phash_and_thumbnail_barely_move_and_copies_still_match(images):
    """Facts from the reduced decode vs the full one, and against a quarter-size re-encoded copy."""
    for name in ("chelsea", "coffee", "astronaut", "rocket", "china", "hubble"):
        src = big(images[name])
        data = jpeg(src)
        full = facts_of(inspect_image(data, CAP)[1])
        red = facts_of(inspect_image(data, CAP, SIDE)[1])
        copy = facts_of(inspect_image(jpeg(src.resize((400, 400 * src.height // src.width)), 40), CAP, SIDE)[1])
        th = thumbs_array([full["thumb"], red["thumb"], copy["thumb"]])
        assert hamming(int(full["phash"], 16), int(red["phash"], 16)) <= 2, name
        assert hamming(int(red["phash"], 16), int(copy["phash"], 16)) <= 4, name  # phash_threshold default
        d = pixel_diff(th, np.array([0, 1]), np.array([1, 2]))
        assert d[0] < 1.0 and d[1] < 2.0, (name, d)  # phash_max_pixel_diff is 4.0


def test_a_cache_of_the_full_size_decode_is_recomputed_not_mixed(world):
    """facts.jsonl rows and embedding parts written by a kd3 that decoded every file at full size (no
    decode tag; their embeddings under the model key alone) are computed again, and the result equals a
    fresh run's."""
    import hashlib
    import shutil

    from pipeline.curate import curate

    run = world["run"]
    m1 = curate(make_cfg(run))
    cache = run / "curate" / "cache"
    facts = cache / "facts.jsonl"
    rows = [json.loads(x) for x in facts.read_text().splitlines()]
    assert {r["decode"] for r in rows} == {"v2:side128"}  # kd3-tiny-clip: 64 px input, pHash floor 128
    # what the old code left: facts without the tag, embeddings in the directory of the model key alone
    facts.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "decode"}) + "\n" for r in rows))
    (new_dir,) = cache.glob("emb-*")
    key = json.loads((new_dir / "key.json").read_text())["key"]
    old_dir = cache / ("emb-" + hashlib.sha256(key.split("|")[0].encode()).hexdigest()[:16])
    new_dir.rename(old_dir)
    m2 = curate(make_cfg(run))
    assert m2["stats"]["embed"]["computed"] == len(rows)  # every image decoded and embedded again
    assert m2["stats"]["embed"]["cached"] == 0
    for step in ("validate", "exact_dedup", "phash_dedup", "near_dedup"):
        assert m2["stats"][step] == m1["stats"][step], step
    new = {json.loads(x)["sha"]: json.loads(x) for x in facts.read_text().splitlines()[len(rows):]}
    assert {s: (r["phash"], r.get("thumb")) for s, r in new.items()} == \
        {r["sha"]: (r["phash"], r.get("thumb")) for r in rows}
    shutil.rmtree(old_dir)


def test_batched_preprocess_equals_the_per_image_transform(images):
    """The decode threads run only the PIL steps; ToTensor + Normalize once per batch give the very same
    tensor as the embedder's whole transform per image (open_clip's and a teacher-style Compose)."""
    import torch
    import torchvision.transforms as T

    from pipeline.core.embedding import BatchedPreprocess
    from pipeline.curate.embed import ClipEmbedder

    clip = ClipEmbedder("kd3-tiny-clip", None, None, "cpu")
    teacher_like = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(),
                              T.Normalize([0.4, 0.5, 0.6], [0.2, 0.3, 0.25])])
    imgs = [images[k] for k in ("chelsea", "rocket", "coins", "astronaut")]
    for prep, whole in ((clip, clip.preprocess), (BatchedPreprocess(teacher_like), teacher_like)):
        prepared = [prep.prepare(im) for im in imgs]
        assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 for p in prepared)  # no torch op per image
        assert torch.equal(prep.collate(prepared), torch.stack([whole(im) for im in imgs]))
    odd = BatchedPreprocess(T.Compose([T.ToTensor(), T.Resize(16)]))  # not ToTensor + Normalize at the end
    assert not odd.split and torch.equal(odd.collate([odd.prepare(imgs[0])])[0], T.Resize(16)(T.ToTensor()(imgs[0])))
    # a head that gives something other than RGB pixels: that image runs the whole transform
    hsv_if_wide = T.Lambda(lambda im: im.convert("HSV") if im.width > 500 else im)
    some = T.Compose([hsv_if_wide, T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3)])
    b = BatchedPreprocess(some)
    mixed = [b.prepare(im) for im in imgs]
    assert [isinstance(p, torch.Tensor) for p in mixed] == [im.width > 500 for im in imgs] and any(
        isinstance(p, np.ndarray) for p in mixed)
    assert torch.equal(b.collate(mixed), torch.stack([some(im) for im in imgs]))


def test_curate_finds_re_encoded_copies_of_large_images(tmp_path, images):
    """Web-sized photos (1600 px) decoded at the working size: a re-encoded copy and a downscaled copy are
    still pHash duplicates of their original, distinct photos are kept, and the decisions give the files'
    own sizes."""
    from pipeline.core.io import read_jsonl
    from pipeline.curate import curate

    from curate_fixtures import CrawlWriter

    run = tmp_path / "runs" / "big"
    cw = CrawlWriter(run)
    cat, coffee, rocket = big(images["chelsea"]), big(images["coffee"]), big(images["rocket"], 1200)
    s_cat = cw.add("cat", jpeg(cat, 95), "jpg", "cat")
    s_q60 = cw.add("cat", jpeg(cat, 60), "jpg", "cat-q60")  # the same photo re-encoded
    s_half = cw.add("cat", jpeg(cat.resize((1000, 1000 * cat.height // cat.width), Image.BICUBIC), 75), "jpg")
    s_china = cw.add("cat", jpeg(big(images["china"])), "jpg", "china")
    s_coffee = cw.add("coffee", jpeg(coffee), "jpg", "coffee")
    s_rocket = cw.add("space", jpeg(rocket), "jpg", "rocket")
    cw.write()
    curate(make_cfg(run))
    rows = {r["id"]: r for r in read_jsonl(run / "curate" / "decisions.jsonl")}
    for s in (s_q60, s_half):
        assert rows[s]["reason"] == "phash_dup" and rows[s]["dup_of"] == s_cat, rows[s]
    assert all(rows[s]["kept"] for s in (s_cat, s_china, s_coffee, s_rocket))
    facts = {json.loads(x)["sha"]: json.loads(x) for x in
             (run / "curate" / "cache" / "facts.jsonl").read_text().splitlines()}
    assert (facts[s_cat]["w"], facts[s_cat]["h"]) == cat.size and (facts[s_rocket]["w"], facts[s_rocket]["h"]) == rocket.size
