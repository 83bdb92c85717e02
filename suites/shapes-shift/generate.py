"""Offline generator of ``shapes-shift``: the pretraining questions on visually shifted scenes.

Same objects, questions and answers as ``shapes`` (so the language side is unchanged), but drawn
in another style: darker, desaturated shades of the same colour names, smaller objects, a textured
(striped) background and three times the pixel noise. It sits between ``shapes`` (no shift) and
``docvqa`` (a new kind of image) on the visual-shift axis the recommender calibrates on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
from PIL import Image

from suites.shapes.generate import QTYPES, Style
from suites.shapes.generate import generate as generate_scenes

SHIFTED = Style(
    colors={
        "red": (150, 55, 70),
        "green": (70, 120, 60),
        "blue": (60, 70, 150),
        "yellow": (190, 170, 70),
        "purple": (110, 70, 120),
    },
    backgrounds=((200, 200, 185), (185, 195, 205), (205, 190, 190)),
    size_range=(16, 24),
    noise_sd=18.0,
)
STRIPE_PERIOD = 6


def _stripes(image: Image.Image, rng: random.Random) -> Image.Image:
    """Diagonal stripes over the whole scene, at a random phase and direction."""
    pixels = np.asarray(image, dtype=np.float32)
    y, x = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
    lines = (x + rng.choice((1, -1)) * y + rng.randrange(STRIPE_PERIOD)) % STRIPE_PERIOD < 2
    pixels[lines] *= 0.82
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def generate(n: int, seed: int, qtypes: tuple[str, ...] = QTYPES) -> Iterator[dict]:
    """Yield ``n`` items ``{"image", "question", "answers": [str], "qtype"}`` in the shifted style."""
    rng = random.Random(seed ^ 0x5EED)
    for item in generate_scenes(n, seed, qtypes, style=SHIFTED):
        yield {**item, "image": _stripes(item["image"], rng)}
