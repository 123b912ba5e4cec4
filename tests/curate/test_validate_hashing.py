"""Steps 1-2 on real images: decoding, conversions, bombs, pHash duplicates (multi-index hashing)."""
import io
import random

import numpy as np
from PIL import Image

from curate_fixtures import bomb_png, jpeg, png
from curate_groups import hamming, phash_groups
from pipeline.curate.hashing import any_within, near_pairs, phash_hex
from pipeline.curate.validate import inspect_image, size_reason, to_rgb

CAP = 89_478_485


def test_good_jpeg_decodes(images):
    f, rgb = inspect_image(jpeg(images["astronaut"]), CAP)
    assert f.ok and (f.w, f.h) == (512, 512) and rgb.mode == "RGB" and f.format == "JPEG"


def test_truncated_and_garbage_are_invalid(images):
    data = jpeg(images["coffee"])
    f, rgb = inspect_image(data[: len(data) // 3], CAP)
    assert not f.ok and not f.bomb and rgb is None and "truncated" in f.error
    f, _ = inspect_image(b"<html>nope</html>", CAP)
    assert not f.ok and "UnidentifiedImageError" in f.error


def test_bomb_checked_on_header_before_decoding():
    data = bomb_png(4000, 3000)  # 12 Mpx declared, a few bytes of data
    f, rgb = inspect_image(data, max_pixels=1_000_000)
    assert f.bomb and not f.ok and rgb is None and f.pixels == 12_000_000
    # above Pillow's own hard limit it is still reported as a bomb, not a crash
    f, _ = inspect_image(bomb_png(60_000, 60_000), CAP)
    assert f.bomb and not f.ok


def test_cmyk_becomes_rgb_with_the_same_colours(images):
    src = images["flower"]
    f, rgb = inspect_image(jpeg(src.convert("CMYK"), 95), CAP)
    assert f.ok and f.mode == "CMYK" and rgb.mode == "RGB"
    diff = np.abs(np.asarray(rgb, float) - np.asarray(src, float)).mean()
    assert diff < 12, diff


def test_alpha_composited_on_white(images):
    a = np.asarray(images["astronaut"].convert("RGBA")).copy()
    a[:, :200, 3] = 0      # transparent band
    a[:, 200:300, 3] = 128  # half transparent
    logo = Image.fromarray(a, "RGBA")
    f, rgb = inspect_image(png(logo), CAP)
    assert f.ok and f.mode == "RGBA" and rgb.mode == "RGB"
    out = np.asarray(rgb)
    transparent = a[..., 3] == 0
    assert transparent.any()
    assert (out[transparent] == 255).all()
    opaque = a[..., 3] == 255
    assert np.array_equal(out[opaque], a[..., :3][opaque])


def test_palette_and_16bit(images):
    pal = images["colorwheel"].convert("P", palette=Image.ADAPTIVE)
    f, rgb = inspect_image(png(pal), CAP)
    assert f.ok and f.mode == "P" and rgb.mode == "RGB"
    gray = np.asarray(images["camera"].convert("L"))
    a16 = gray.astype(np.uint16) * 257
    f, rgb = inspect_image(png(Image.fromarray(a16)), CAP)
    assert f.ok and f.mode.startswith("I") and rgb.mode == "RGB"
    # 16-bit values are rescaled, not clipped to white
    assert np.abs(np.asarray(rgb)[..., 0].astype(int) - gray).max() <= 1


def test_exif_orientation_applied(images):
    ex = Image.Exif()
    ex[0x0112] = 6
    src = images["rocket"].resize((200, 120))
    f, rgb = inspect_image(jpeg(src, exif=ex.tobytes()), CAP)
    assert f.ok and (f.w, f.h) == (120, 200) and rgb.size == (120, 200)


def test_size_thresholds():
    assert size_reason(16, 400, 32, 4.0)[0] == "too_small"
    assert size_reason(500, 50, 32, 4.0)[0] == "bad_aspect"
    assert size_reason(400, 300, 32, 4.0) == (None, "")


def test_to_rgb_la_and_grayscale():
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(to_rgb(la)).min() == 255  # fully transparent -> white
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_phash_catches_reencoded_and_resized_copies(images):
    base = images["chelsea"]
    h0 = int(phash_hex(base), 16)
    for variant in (jpeg(base, 40), jpeg(base.resize((225, 150)), 80), png(base.resize((900, 600)))):
        h = int(phash_hex(Image.open(io.BytesIO(variant)).convert("RGB")), 16)
        assert hamming(h0, h) <= 4
    for other in ("coffee", "astronaut", "rocket", "china"):
        assert hamming(h0, int(phash_hex(images[other]), 16)) > 10


def test_multi_index_hashing_matches_brute_force():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(400)]
    for k in range(60):  # planted near copies: flip 0..6 bits
        base = hashes[rng.randrange(400)]
        for b in rng.sample(range(64), rng.randint(0, 6)):
            base ^= 1 << b
        hashes.append(base)
    hashes += [0] * 40 + [2**64 - 1] * 5  # flat images share their pHash: every pair of them is a candidate
    for t in (0, 3, 4, 6, 10, 16):  # 16: the all-pairs branch
        brute = sorted((i, j) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                       if (hashes[i] ^ hashes[j]).bit_count() <= t)
        found = near_pairs(hashes, t)
        assert found.dtype == np.int64 and found.shape == (len(brute), 2)
        assert [tuple(p) for p in found.tolist()] == brute
    assert near_pairs([], 4).shape == (0, 2) and near_pairs([7], 4).shape == (0, 2)
    groups = phash_groups([f"{h:016x}" for h in hashes], 6)
    assert len(set(groups)) < len(hashes)


def test_any_within():
    ref = ["ffffffffffffffff", "0000000000000000"]
    assert any_within(["fffffffffffffff0", "00000000000000ff", "0f0f0f0f0f0f0f0f"], ref, 4) == [0, None, None]
    assert any_within(["00000000000000ff"], ref, 8) == [1]


def test_pixel_diff_is_the_mean_absolute_difference_in_chunks_and_nan_without_a_thumbnail():
    """Thumbnails held as uint8 and pairs diffed a chunk at a time give exactly the float32 mean absolute
    difference; a pair with a missing thumbnail is NaN (it never confirms)."""
    import base64

    from pipeline.curate.hashing import pixel_diff, thumbs_array

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (9, 256), dtype=np.uint8)
    enc = [base64.b64encode(r.tobytes()).decode() for r in px]
    enc[4] = None
    th = thumbs_array(enc)
    a, b = rng.integers(0, 9, 50), rng.integers(0, 9, 50)
    want = np.abs(px[a].astype(np.float32) - px[b].astype(np.float32)).mean(1)
    want[(a == 4) | (b == 4)] = np.nan
    for chunk in (3, 50, 16384):
        got = pixel_diff(th, a, b, chunk=chunk)
        assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True)
    assert pixel_diff(th, np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)
