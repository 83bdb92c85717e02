"""Offline generator of "natural scenes": coloured shapes, some carrying short codes, on a noisy tint.

This is the embedded model's pretraining distribution; the ``shapes`` suite evaluates held-out scenes
of it (the in-distribution control). Answers are balanced, so no question can be answered from its
text alone (the pretraining report measures that baseline). One object per quadrant; a (colour,
shape) pair appears at most once per scene, so every question names exactly one object.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from bench.render import GLYPH_W, draw_shape, draw_text, text_size

SIZE = 64
COLORS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (225, 195, 30),
    "purple": (140, 60, 170),
}
SHAPES = ("circle", "square", "triangle", "diamond")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
GLYPHS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
BACKGROUNDS = ((225, 235, 245), (240, 232, 215), (222, 238, 222), (236, 236, 236))
# Reading codes is the hardest skill and the one documents build on: asked twice as often.
QTYPES = ("color", "shape", "count", "position", "text", "text")


@dataclass(frozen=True)
class Style:
    """How scenes look; the default is the pretraining distribution, other styles shift it."""

    colors: dict = field(default_factory=lambda: COLORS)
    backgrounds: tuple = BACKGROUNDS
    size_range: tuple[int, int] = (SIZE // 2 * 5 // 8, SIZE // 2 - 4)
    noise_sd: float = 6.0


PRETRAINING = Style()


def render_scene(rng: random.Random, n_objects: int, glyph_p: float = 0.5, style: Style = PRETRAINING) -> tuple[Image.Image, list[dict]]:
    """Draw ``n_objects`` shapes (one per quadrant); each carries a 1-2 character code with ``glyph_p``."""
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, style.noise_sd, (SIZE, SIZE, 3))
    bg = np.array(rng.choice(style.backgrounds), dtype=np.float32)
    image = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    half = SIZE // 2
    objects, seen = [], set()
    for quadrant in rng.sample(range(4), n_objects):
        while True:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if (color, shape) not in seen:
                seen.add((color, shape))
                break
        s = rng.randint(*style.size_range)
        x0 = (quadrant % 2) * half + rng.randint(2, half - s - 2)
        y0 = (quadrant // 2) * half + rng.randint(2, half - s - 2)
        draw_shape(draw, shape, (x0, y0, x0 + s, y0 + s), style.colors[color])
        code = None
        if rng.random() < glyph_p:
            # Two characters fit only inside circles and squares.
            length = rng.choice((1, 2)) if shape in ("circle", "square") else 1
            code = "".join(rng.choice(GLYPHS) for _ in range(length))
        objects.append(dict(color=color, shape=shape, quadrant=QUADRANTS[quadrant], code=code, box=(x0, y0, s)))
    for obj in objects:
        if obj["code"]:
            x0, y0, s = obj["box"]
            w, h = text_size(obj["code"])
            # Triangles are wide at the bottom: put the code low enough to sit inside.
            cy = y0 + (2 * s) // 3 if obj["shape"] == "triangle" else y0 + s // 2
            ink = (20, 20, 20) if obj["color"] == "yellow" else (250, 250, 250)
            left, top = x0 + (s - w) // 2, cy - h // 2
            draw_text(image, (left, top), obj["code"], ink)
            # Ink centre of each character, for dense supervision of the vision encoder.
            obj["chars"] = [(ch, left + GLYPH_W * i + GLYPH_W // 2 - 1, top + h // 2) for i, ch in enumerate(obj["code"])]
    return image, objects


def _question(rng: random.Random, qtype: str, objects: list[dict]) -> tuple[str, str] | None:
    target = rng.choice(objects)
    if qtype == "color":
        if sum(o["shape"] == target["shape"] for o in objects) > 1:
            return None
        return f"What color is the {target['shape']}?", target["color"]
    if qtype == "shape":
        if sum(o["color"] == target["color"] for o in objects) > 1:
            return None
        return f"What shape is the {target['color']} object?", target["shape"]
    if qtype == "count":
        return "How many objects are there?", str(len(objects))
    if qtype == "position":
        return f"Where is the {target['color']} {target['shape']}?", target["quadrant"]
    if qtype == "text":
        if not target["code"]:
            return None
        return f"What is written on the {target['color']} {target['shape']}?", target["code"]
    raise ValueError(f"unknown question type {qtype!r}")


def generate(n: int, seed: int, qtypes: tuple[str, ...] = QTYPES, style: Style = PRETRAINING) -> Iterator[dict]:
    """Yield ``n`` items ``{"image": PIL.Image, "question", "answers": [str], "qtype"}``, cycling ``qtypes``."""
    rng = random.Random(seed)
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        while True:
            image, objects = render_scene(rng, rng.randint(1, 4), style=style)
            qa = _question(rng, qtype, objects)
            if qa is not None:
                break
        yield {"image": image, "question": qa[0], "answers": [qa[1]], "qtype": qtype}
