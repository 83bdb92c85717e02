"""Drawing helpers shared by the offline suite generators (pure PIL, deterministic).

Text uses PIL's built-in bitmap font (6 px advance, ~7 px capitals), embedded in Pillow itself, so
renders are identical on every machine with no font files; ``scale`` enlarges it pixel-exactly.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

GLYPH_W, GLYPH_H = 6, 11  # advance and line box of the bitmap font, in pixels
INK_TOP, INK_H = 2, 8  # rows of the line box that capitals and digits occupy


@lru_cache(maxsize=1)
def font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def text_size(text: str, scale: int = 1, tracking: int = 0) -> tuple[int, int]:
    """Ink box of ``text``; ``tracking`` adds pixels between characters (letter-spacing)."""
    return (GLYPH_W + tracking) * len(text) * scale, INK_H * scale


def draw_text(image: Image.Image, xy: tuple[int, int], text: str, fill, scale: int = 1, tracking: int = 0) -> None:
    """Draw ``text`` with its ink box's top-left corner at ``xy``."""
    advance = GLYPH_W + tracking
    mask = Image.new("L", (advance * len(text), INK_H), 0)
    draw = ImageDraw.Draw(mask)
    if tracking:
        for i, ch in enumerate(text):
            draw.text((advance * i, -INK_TOP), ch, font=font(), fill=255)
    else:
        draw.text((0, -INK_TOP), text, font=font(), fill=255)
    w, h = text_size(text, scale, tracking)
    if scale != 1:
        mask = mask.resize((w, h), Image.NEAREST)
    image.paste(Image.new(image.mode, (w, h), fill), xy, mask)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
