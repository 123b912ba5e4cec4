"""Decode and check one image (the facts the ``validate`` step, :mod:`.steps.validate`, decides on).

``inspect_image(data, max_pixels)`` returns the *facts* about a file (decodable, size after EXIF
orientation, mode, format) plus the decoded RGB image. Facts are cached per sha256 and the
threshold decisions (min side, aspect, pixel cap) are made later from the facts, so changing a
threshold never needs a re-decode (except raising ``max_pixels`` above a file that was skipped).

The pixel cap is checked on the header, before any pixel is decoded (decompression bombs).
CMYK, palette, alpha (composited on white), 16-bit and float images become 8-bit RGB.

Curate's scan needs the pixels only at a working size (``work_side``: the embedder's input, at least
``MIN_WORK_SIDE`` for the pHash): a JPEG is then decoded at a reduced scale inside libjpeg (DCT scaling
1/2, 1/4 or 1/8, chosen so the shorter side stays >= ``work_side``; every byte of the file is still
entropy-decoded, so a truncated or corrupt file fails as before), and an image still twice that size
(a PNG, or a JPEG beyond 1/8) is box-reduced. The facts (size, mode, pixels) are the file's own.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files must fail, not decode half grey
MIN_WORK_SIDE = 128  # the pHash (32x32) and the 16x16 thumbnail are taken from at least this much
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees


@dataclass
class ImageFacts:
    ok: bool                      # decoded completely (or skipped as a bomb: ok False, bomb True)
    w: int = 0                    # width after EXIF orientation
    h: int = 0
    mode: str = ""
    format: str = ""
    bomb: bool = False            # header pixel count above the cap: never decoded
    pixels: int = 0               # header pixel count
    error: Optional[str] = None   # why it did not decode
    extra: dict = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"ok": self.ok, "w": self.w, "h": self.h, "mode": self.mode, "format": self.format,
                "bomb": self.bomb, "pixels": self.pixels, "error": self.error}


def _set_pillow_cap(max_pixels: int) -> None:
    # Pillow raises DecompressionBombError itself above 2 * MAX_IMAGE_PIXELS; make sure our own
    # (configurable) cap is the one that decides, never a lower library default.
    cur = Image.MAX_IMAGE_PIXELS
    if cur is not None and cur < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited on white; 16-bit/int/float rescaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if mode == "I" and lo >= 0 and hi <= 255:
                pass
            elif mode == "I" and lo >= 0 and hi <= 65535:
                arr = arr / 257.0
            else:
                arr = (arr - lo) / (hi - lo if hi > lo else 1.0) * 255.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
        mode = "RGBA"
    if mode in ("LA", "La", "PA", "RGBa", "RGBA") or (mode == "L" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def reduce_to(rgb: Image.Image, side: int) -> Image.Image:
    """Box-reduce by the largest integer factor that keeps the shorter side >= ``side``."""
    k = min(rgb.size) // side
    return rgb.reduce(k) if k >= 2 else rgb


def inspect_image(data: bytes, max_pixels: int,
                  work_side: Optional[int] = None) -> tuple[ImageFacts, Optional[Image.Image]]:
    """Decode ``data``; return (facts, RGB image or None). With ``work_side`` the image comes back at a
    working size (shorter side in [work_side, 2 work_side) when the file is larger), decoded at reduced
    scale where the format allows; the facts still give the file's full size."""
    _set_pillow_cap(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or ""
            w, h = im.size
            pixels = int(w) * int(h)
            if pixels > max_pixels:
                return ImageFacts(ok=False, w=w, h=h, mode=im.mode, format=fmt, bomb=True, pixels=pixels,
                                  error=f"{w}x{h} = {pixels} pixels > cap {max_pixels}"), None
            if work_side:
                im.draft("RGB", (work_side, work_side))  # JPEG: libjpeg's DCT scaling; other formats: no-op
            im.load()
            mode = im.mode
            drafted = im.size != (w, h)
            turned = drafted and im.getexif().get(ExifTags.Base.Orientation, 1) in _SWAPS_SIDES
            ImageOps.exif_transpose(im, in_place=True)
            rgb = to_rgb(im)
            rgb.load()
            w, h = ((h, w) if turned else (w, h)) if drafted else rgb.size  # the file's size, oriented
            if work_side:
                rgb = reduce_to(rgb, work_side)
    except Image.DecompressionBombError as e:
        return ImageFacts(ok=False, bomb=True, error=str(e).split("\n")[0][:200]), None
    except Exception as e:  # truncated, corrupt, not an image, unsupported
        msg = _ADDRESS.sub(">", f"{type(e).__name__}: {e}".split("\n")[0])[:200]
        return ImageFacts(ok=False, error=msg), None
    return ImageFacts(ok=True, w=w, h=h, mode=mode, format=fmt, pixels=pixels), rgb


_ADDRESS = re.compile(r" object at 0x[0-9a-f]+>")  # Pillow names the buffer by its address: not a fact of the file


def size_reason(w: int, h: int, min_side: int, max_aspect: float) -> tuple[Optional[str], str]:
    """Threshold decisions from the facts: (reason or None, detail)."""
    if min(w, h) < min_side:
        return "too_small", f"{w}x{h}: shorter side < {min_side}"
    aspect = max(w, h) / max(1, min(w, h))
    if aspect > max_aspect:
        return "bad_aspect", f"{w}x{h}: aspect {aspect:.2f} > {max_aspect}"
    return None, ""
