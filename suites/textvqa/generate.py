"""Offline generator of TextVQA-like scenes: street views with short words and numbers on signs,
shop fronts and buses.

A scene (sky, buildings, road) holds a text-bearing object (``max_objects=2`` adds a distractor); the
question names it ("What does the red sign say?", "What number is on the bus?", "What is the name of
the shop?") and the answer is the word or number painted on it, so it can only be answered by reading. Words are short and common on signs; they use only the letters the embedded model learned
in pretraining (no I, O, Q, 0 or 1), but as words in scenes, not 1-2 letter codes on shapes, they are
a new reading task on a new kind of image.

Difficulty, measured on the embedded model (default preset: 200 steps, batch 32, 2 CPU cores): with
one or two objects, 3-4 letter words and lower-case answers (as TextVQA's annotators write them), the
best cell reached only 0.06 VQA accuracy, and 0.08 with one object and 3 letters: the model had to
learn a new upper-to-lower-case mapping for every letter. Answers now spell what is painted: best
cell 0.587 (all + resampler+vpm), base 0.000 (results/textvqa).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from bench.render import draw_text, text_size

SIZE = 64
TRACKING = 2  # letter-spacing, as on printed signs: 6 px glyphs on an 8 px pitch
WORDS = ("BAR", "BUS", "GAS", "PUB", "WAY", "TEA", "SPA", "HAT", "BED", "TAX", "CAB", "VAN", "ART", "GYM", "PET",
         "SKY", "JET", "SUN", "BAY", "ZEN", "CAFE", "SALE", "BANK", "PARK", "HELP", "MENU", "FREE", "BEER",
         "JAZZ", "NEWS", "RENT", "CLUB", "FUEL", "MEAT", "DRUG")  # fmt: skip
DIGITS = "23456789"
# Board colour -> paint colour for its text (light on dark, dark on light).
SIGN_COLORS = {
    "red": ((200, 40, 40), (250, 250, 250)),
    "blue": ((40, 70, 190), (250, 250, 250)),
    "green": ((30, 130, 60), (250, 250, 250)),
    "yellow": ((230, 200, 40), (20, 20, 20)),
    "white": ((240, 240, 240), (20, 20, 20)),
}
TEXT_COLORS = ((250, 250, 250), (20, 20, 20))
SKIES = ((150, 190, 230), (175, 200, 220), (200, 205, 215))
WALLS = ((170, 150, 130), (150, 150, 160), (190, 170, 150), (130, 120, 120))
ROAD = (90, 90, 95)
KINDS = ("sign", "shop", "bus")


def _board(draw: ImageDraw.ImageDraw, image: Image.Image, text: str, x: int, y: int, fill, ink, pad: int = 3) -> tuple[int, int]:
    """A filled board with ``text`` centred on it; returns its size."""
    w, h = text_size(text, tracking=TRACKING)
    w -= TRACKING  # no letter-space after the last character
    bw, bh = w + 2 * pad, h + 2 * pad
    draw.rectangle((x, y, x + bw - 1, y + bh - 1), fill=fill)
    draw_text(image, (x + pad, y + pad), text, ink, tracking=TRACKING)
    return bw, bh


def _width(text: str, pad: int = 3) -> int:
    return text_size(text, tracking=TRACKING)[0] - TRACKING + 2 * pad


def render_scene(rng: random.Random, objects: list[dict]) -> Image.Image:
    """Background (sky, walls, road) with noise, then each object in its own horizontal band."""
    sky = np.array(rng.choice(SKIES), np.float32)
    wall = np.array(rng.choice(WALLS), np.float32)
    pixels = np.empty((SIZE, SIZE, 3), np.float32)
    horizon = rng.randint(10, 18)
    pixels[:horizon] = sky
    pixels[horizon:52] = wall
    pixels[52:] = ROAD
    pixels += np.random.default_rng(rng.getrandbits(32)).normal(0, 5, pixels.shape)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    # Windows on the wall: clutter with straight edges, like real facades.
    for _ in range(rng.randint(2, 5)):
        wx, wy = rng.randint(0, SIZE - 8), rng.randint(horizon + 2, 44)
        draw.rectangle((wx, wy, wx + 5, wy + 6), fill=(70, 80, 100))
    bands = [(2, 26), (30, 54)] if len(objects) == 2 else [(rng.randint(4, 22), None)]
    rng.shuffle(bands)
    for obj, (top, _) in zip(objects, bands):
        text = obj["text"]
        if obj["kind"] == "sign":
            fill, ink = SIGN_COLORS[obj["color"]]
            x = rng.randint(1, SIZE - 1 - _width(text))
            bw, bh = _board(draw, image, text, x, top, fill, ink)
            draw.rectangle((x + bw // 2 - 1, top + bh, x + bw // 2, min(SIZE - 1, top + bh + 8)), fill=(60, 60, 60))
        elif obj["kind"] == "shop":
            bw = _width(text, pad=4)
            x = rng.randint(0, SIZE - bw)
            awning = rng.choice(((200, 40, 40), (40, 120, 60), (40, 70, 190)))
            for i in range(bw):  # striped awning above the name board
                draw.line((x + i, top, x + i, top + 3), fill=awning if i % 4 < 2 else (240, 240, 240))
            _board(draw, image, text, x, top + 4, (30, 30, 30), (250, 250, 250), pad=4)
        else:  # bus: a long body with a route number in a dark display
            body = rng.choice(((230, 190, 40), (200, 50, 50), (60, 100, 200)))
            x = rng.randint(0, SIZE - 44)
            draw.rectangle((x, top, x + 43, top + 17), fill=body)
            for i in range(4):
                draw.rectangle((x + 3 + 7 * i, top + 3, x + 7 + 7 * i, top + 8), fill=(150, 190, 220))
            draw.ellipse((x + 4, top + 15, x + 10, top + 21), fill=(20, 20, 20))
            draw.ellipse((x + 32, top + 15, x + 38, top + 21), fill=(20, 20, 20))
            dx = x + 43 - _width(text, pad=2)
            _board(draw, image, text, dx, top + 1, (30, 30, 30), (250, 250, 250), pad=2)
    return image


def _pick_objects(rng: random.Random, max_objects: int, max_len: int) -> list[dict]:
    n = rng.randint(1, max_objects)
    words = [w for w in WORDS if len(w) <= max_len]
    objects = []
    for kind in rng.sample(("sign", "sign", "shop", "bus"), n):
        if kind == "bus":
            text = "".join(rng.choice(DIGITS) for _ in range(rng.randint(2, min(3, max_len))))
        else:
            text = rng.choice(words)
        color = rng.choice([c for c in SIGN_COLORS if all(o.get("color") != c for o in objects)]) if kind == "sign" else None
        objects.append({"kind": kind, "text": text, "color": color})
    return objects


def _question(obj: dict) -> str:
    if obj["kind"] == "bus":
        return "What number is on the bus?"
    if obj["kind"] == "shop":
        return "What is the name of the shop?"
    return f"What does the {obj['color']} sign say?"


def generate(n: int, seed: int, max_objects: int = 1, max_len: int = 3) -> Iterator[dict]:
    """Yield ``n`` items ``{"image", "question", "answers": [str], "qtype"}``. Answers keep the case
    they are painted in (VQA accuracy ignores case), so the target spells the glyphs the model sees.
    ``max_objects=2`` adds a second text-bearing object
    (a distractor) and ``max_len=4`` four-letter words: harder than the CPU budget can learn."""
    rng = random.Random(seed)
    for _ in range(n):
        objects = _pick_objects(rng, max_objects, max_len)
        image = render_scene(rng, objects)
        asked = rng.choice(objects)
        yield {
            "image": image,
            "question": _question(asked),
            "answers": [asked["text"]],
            "qtype": asked["kind"],
        }
