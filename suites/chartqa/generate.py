"""Offline generator of ChartQA-like charts: bar and line charts with value labels and category letters.

Each chart plots 2-4 categories (single letters under the x axis) with two-digit values printed above
the bars or points, like the "data-labelled" charts that make up much of ChartQA. Questions either
read a value ("What is the value of C?", numeric answer scored with 5% relaxed accuracy) or compare
the plotted heights ("Which category has the highest value?", answered with a letter), so a model
must both read the labels and look at the geometry. Flat, axis-aligned synthetic graphics are far
from the embedded model's pretraining scenes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from bench.render import draw_text, text_size

SIZE = 64
TRACKING = 0  # labels as in the pretraining codes; 12 px for two digits leaves a gap between 4 bars
CATEGORIES = "ABCDEFGHJKLMNPRSTUVWXYZ"
DIGITS = "23456789"  # the digits the embedded model can read (no 0/1)
BAR_COLORS = ((60, 110, 190), (220, 120, 40), (70, 150, 80), (150, 80, 160))
INK = (20, 20, 20)
AXIS_X, AXIS_Y = 3, 53  # the axes' corner: plot area is right of AXIS_X and above AXIS_Y
TOP = 12  # highest point a bar reaches (room for its label above)
QTYPES = ("value", "value", "highest", "lowest")


def _value(rng: random.Random) -> int:
    return int(rng.choice(DIGITS) + rng.choice(DIGITS))


def _height(value: int) -> int:
    return round(value / 100 * (AXIS_Y - TOP))


def _label(image: Image.Image, text: str, cx: int, bottom: int) -> None:
    w, h = text_size(text, tracking=TRACKING)
    w -= TRACKING
    draw_text(image, (max(0, min(SIZE - w, cx - w // 2)), bottom - h), text, INK, tracking=TRACKING)


def render_chart(rng: random.Random, kind: str, categories: list[str], values: list[int]) -> Image.Image:
    paper = np.array(rng.choice(((250, 250, 250), (245, 245, 238), (238, 242, 248))), np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 3, (SIZE, SIZE, 3))
    image = Image.fromarray((paper + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for y in range(AXIS_Y - 10, TOP - 1, -10):  # light grid lines
        draw.line((AXIS_X + 1, y, SIZE - 2, y), fill=(215, 215, 215))
    draw.line((AXIS_X, TOP - 4, AXIS_X, AXIS_Y), fill=INK)
    draw.line((AXIS_X, AXIS_Y, SIZE - 2, AXIS_Y), fill=INK)
    slot = (SIZE - 2 - AXIS_X) // len(values)
    centres = [AXIS_X + slot * i + slot // 2 + 1 for i in range(len(values))]
    tops = [AXIS_Y - _height(v) for v in values]
    if kind == "bar":
        color = rng.choice(BAR_COLORS)
        half = min(5, slot // 2 - 2)
        for cx, top in zip(centres, tops):
            draw.rectangle((cx - half, top, cx + half, AXIS_Y - 1), fill=color)
    else:
        color = rng.choice(BAR_COLORS)
        draw.line(list(zip(centres, tops)), fill=color, width=2)
        for cx, top in zip(centres, tops):
            draw.rectangle((cx - 1, top - 1, cx + 1, top + 1), fill=INK)
    for cx, top, value, category in zip(centres, tops, values, categories):
        _label(image, str(value), cx, top - 2)
        _label(image, category, cx, SIZE - 1)
    return image


def generate(n: int, seed: int, qtypes: tuple[str, ...] = QTYPES) -> Iterator[dict]:
    """Yield ``n`` items ``{"image", "question", "answers": [str], "qtype", "key"}``."""
    rng = random.Random(seed)
    for i in range(n):
        qtype = qtypes[i % len(qtypes)]
        k = rng.randint(2, 4)
        categories = sorted(rng.sample(CATEGORIES, k))
        while True:  # distinct values, so "highest" and "lowest" have one answer
            values = [_value(rng) for _ in range(k)]
            if len(set(values)) == k:
                break
        kind = rng.choice(("bar", "bar", "line"))
        image = render_chart(rng, kind, categories, values)
        if qtype == "value":
            j = rng.randrange(k)
            question, answer = f"What is the value of {categories[j]}?", str(values[j])
        elif qtype == "highest":
            question, answer = "Which category has the highest value?", categories[values.index(max(values))]
        else:
            question, answer = "Which category has the lowest value?", categories[values.index(min(values))]
        yield {
            "image": image,
            "question": question,
            "answers": [answer],
            "qtype": qtype,
            # the chart's content: a chart in test never reappears in train with another question
            "key": f"{kind}|" + ";".join(f"{c}={v}" for c, v in zip(categories, values)),
        }
