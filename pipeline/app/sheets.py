"""Contact sheets and thumbnails (Pillow): a grid of captioned thumbnails, saved as a PNG.

Used by ``kd3 inspect --class C --sheet out.png``, by ``--similar``/``--text`` (the neighbours as a
sheet) and by the HTML report (thumbnail files). Unreadable images become a grey tile that says so,
never an exception: a contact sheet is for looking at what the web gave you, broken files included.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.core.io import atomic_path

log = logging.getLogger("kd3.inspect")

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
BG = (250, 250, 251)
TILE_BG = (235, 237, 240)
INK = (31, 41, 55)
MUTED = (107, 114, 128)
ACCENTS = {
    "kept": (22, 163, 74),
    "dropped": (220, 38, 38),
    "query": (37, 99, 235),
}


@lru_cache(maxsize=16)
def font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    """DejaVu Sans (the Debian font) at ``size`` px; Pillow's built-in font if it is missing."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = FONT_DIR / name
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


@dataclass
class Tile:
    """One cell of a contact sheet: an image (path, bytes or PIL image) and up to two caption lines."""

    image: object  # Path | str | bytes | PIL.Image.Image | None
    caption: str = ""
    subcaption: str = ""
    accent: Optional[tuple[int, int, int]] = None  # coloured bar under the image


def open_image(src: object) -> Optional[Image.Image]:
    """Open ``src`` as an RGB image, or None when it cannot be decoded."""
    if src is None:
        return None
    try:
        if isinstance(src, Image.Image):
            im = src
        elif isinstance(src, (bytes, bytearray)):
            im = Image.open(io.BytesIO(src))
        else:
            im = Image.open(str(src))
        im.draft("RGB", (512, 512))  # JPEG: decode at reduced size, much faster for thumbnails
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decode failure is "unreadable" here
        log.debug("cannot open %s: %s", src if not isinstance(src, (bytes, bytearray)) else "<bytes>", e)
        return None


def placeholder(size: int, text: str = "unreadable") -> Image.Image:
    im = Image.new("RGB", (size, size), TILE_BG)
    d = ImageDraw.Draw(im)
    d.line((0, 0, size, size), fill=(210, 212, 216), width=2)
    d.line((0, size, size, 0), fill=(210, 212, 216), width=2)
    f = font(max(10, size // 10))
    w = d.textlength(text, font=f)
    d.rectangle(((size - w) / 2 - 4, size / 2 - size // 10, (size + w) / 2 + 4, size / 2 + size // 10),
                fill=TILE_BG)
    d.text(((size - w) / 2, size / 2 - size // 20 - 2), text, fill=MUTED, font=f)
    return im


def thumbnail(src: object, size: int = 160, *, square: bool = True) -> Image.Image:
    """A ``size`` x ``size`` thumbnail (center-cropped when ``square``) or a placeholder tile."""
    im = open_image(src)
    if im is None:
        return placeholder(size)
    if square:
        return ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)
    im = im.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    return im


def _ellipsize(d: ImageDraw.ImageDraw, text: str, f, width: int) -> str:
    if d.textlength(text, font=f) <= width:
        return text
    while text and d.textlength(text + "…", font=f) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(tiles: Sequence[Tile], *, title: str = "", subtitle: str = "", cols: int = 8,
                  thumb: int = 160, pad: int = 10) -> Image.Image:
    """Draw ``tiles`` as a grid with a title bar. An empty list gives a sheet that says so."""
    cols = max(1, min(cols, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // cols))
    f_cap, f_sub = font(max(10, thumb // 12)), font(max(9, thumb // 14))
    cap_h = (thumb // 12 + 4) + (thumb // 14 + 4) + 4
    title_h = 0
    if title:
        title_h = 44 + (22 if subtitle else 0)
    W = pad + cols * (thumb + pad)
    H = title_h + pad + rows * (thumb + 4 + cap_h + pad)
    sheet = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(sheet)
    if title:
        d.text((pad + 2, 12), _ellipsize(d, title, font(22, bold=True), W - 2 * pad), fill=INK,
               font=font(22, bold=True))
        if subtitle:
            d.text((pad + 2, 42), _ellipsize(d, subtitle, font(14), W - 2 * pad), fill=MUTED, font=font(14))
    if not tiles:
        d.text((pad + 2, title_h + pad), "(no images)", fill=MUTED, font=font(16))
        return sheet
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        x = pad + c * (thumb + pad)
        y = title_h + pad + r * (thumb + 4 + cap_h + pad)
        th = thumbnail(t.image, thumb)
        sheet.paste(th, (x, y))
        if t.accent is not None:
            d.rectangle((x, y + thumb, x + thumb - 1, y + thumb + 3), fill=t.accent)
        ty = y + thumb + 6
        if t.caption:
            d.text((x, ty), _ellipsize(d, t.caption, f_cap, thumb), fill=INK, font=f_cap)
        if t.subcaption:
            d.text((x, ty + thumb // 12 + 4), _ellipsize(d, t.subcaption, f_sub, thumb), fill=MUTED, font=f_sub)
    return sheet


def save_png(im: Image.Image, path: str | Path) -> Path:
    """Write ``im`` as a PNG atomically (creating the folder)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", optimize=True)
    return path


def save_jpeg(im: Image.Image, path: str | Path, quality: int = 85) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        im.convert("RGB").save(tmp, format="JPEG", quality=quality)
    return path


def write_sheet(tiles: Iterable[Tile], out: str | Path, **kw) -> Path:
    """Draw a contact sheet and save it as PNG at ``out``."""
    return save_png(contact_sheet(list(tiles), **kw), out)
