"""Offline generator of ``shapes-shift`` and its graded family: the pretraining questions on visually shifted scenes.

Same objects, questions and answers as ``shapes`` (so the language side is unchanged), but drawn
in another style: darker, desaturated shades of the same colour names, smaller objects, a textured
(striped) background and three times the pixel noise. ``strength`` moves every one of those knobs
along a straight line from the pretraining style (0) to the full shift (1, the ``shapes-shift``
suite); ``shapes-shift-25/50/75`` sit in between, so the recommender calibrates on a graded
visual shift with the task held fixed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
from PIL import Image

from suites.shapes.generate import PRETRAINING, QTYPES, Style
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
STRIPE_SHADE = 0.82  # striped pixels are multiplied by this at full strength


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t  # exactly b at t = 1, so the full shift draws what it always drew


def style(strength: float) -> Style:
    """The scene style at ``strength`` between pretraining (0) and the full shift (1)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1], got {strength}")

    def mix(a: tuple, b: tuple) -> tuple:
        return tuple(int(round(_lerp(x, y, strength))) for x, y in zip(a, b))

    return Style(
        colors={name: mix(PRETRAINING.colors[name], rgb) for name, rgb in SHIFTED.colors.items()},
        backgrounds=tuple(mix(a, b) for a, b in zip(PRETRAINING.backgrounds, SHIFTED.backgrounds)),
        size_range=mix(PRETRAINING.size_range, SHIFTED.size_range),
        noise_sd=_lerp(PRETRAINING.noise_sd, SHIFTED.noise_sd, strength),
    )


def _stripes(image: Image.Image, rng: random.Random, shade: float) -> Image.Image:
    """Diagonal stripes over the whole scene, at a random phase and direction."""
    pixels = np.asarray(image, dtype=np.float32)
    y, x = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
    lines = (x + rng.choice((1, -1)) * y + rng.randrange(STRIPE_PERIOD)) % STRIPE_PERIOD < 2
    pixels[lines] *= shade
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def generate(n: int, seed: int, qtypes: tuple[str, ...] = QTYPES, strength: float = 1.0) -> Iterator[dict]:
    """Yield ``n`` items ``{"image", "question", "answers": [str], "qtype"}`` in the style at ``strength``."""
    rng = random.Random(seed ^ 0x5EED)
    shade = _lerp(1.0, STRIPE_SHADE, strength)
    for item in generate_scenes(n, seed, qtypes, style=style(strength)):
        yield {**item, "image": _stripes(item["image"], rng, shade)}
