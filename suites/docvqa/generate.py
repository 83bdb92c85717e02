"""Offline generator of DocVQA-like pages: small forms and receipts with ``KEY value`` fields.

Each page holds a title and a field (``max_fields`` allows more) drawn from a fixed set of keys, in a
random layout (receipt: value right-aligned; form: ``KEY:value``), printed in a letter-spaced
monospace (8 px per character, like a receipt printer's cells). A question asks for a key's value, a
random 2-3 digit number, so it can only be answered by reading the page. Dark ink on paper is a
different visual distribution from the embedded model's pretraining scenes (light codes on coloured
shapes), which is what makes the vision-policy ablation meaningful offline.

Difficulty, measured on the embedded model (all-r8, 300 steps, batch 32, lr 1e-3, 2 CPU cores):
one field: frozen vision 0.07 ANLS, resampler+vpm 0.92; one or two fields: 0.05 and 0.54 (0.23 at
200 steps). The default budget fits one field; richer pages need a GPU-sized budget (``max_fields``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from bench.render import GLYPH_W, draw_text

TRACKING = 2  # letter-spacing: 6 px glyphs on an 8 px pitch
PITCH = GLYPH_W + TRACKING

SIZE = 64
KEYS = ("NO", "ID", "QTY", "TAX", "SUM", "PIN", "REF", "DAY", "LOT", "BOX")
TITLES = ("FORM", "BILL", "NOTE", "SLIP", "MEMO")
VALUE_CHARS = "23456789"  # the digits the base model learned to read in pretraining (no 0/1)
PAPERS = ((246, 244, 236), (238, 238, 238), (250, 248, 240), (236, 240, 246))
INKS = ((20, 20, 20), (30, 30, 90), (60, 30, 30))


def render_page(rng: random.Random, fields: list[tuple[str, str]], title: str, layout: str) -> Image.Image:
    paper = rng.choice(PAPERS)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 4, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(np.array(paper, np.float32) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    ink = rng.choice(INKS)
    x0 = rng.randint(2, 4)
    draw_text(image, (x0, 2), title, ink, tracking=TRACKING)
    draw.line((x0, 12, SIZE - 3, 12), fill=ink)
    line = 12
    y = rng.randint(15, 17) if len(fields) == 4 else rng.randint(16, 62 - line * len(fields))
    for key, value in fields:
        if layout == "receipt":
            draw_text(image, (x0, y), key, ink, tracking=TRACKING)
            draw_text(image, (SIZE - 3 - PITCH * len(value) + TRACKING, y), value, ink, tracking=TRACKING)
        else:
            draw_text(image, (x0, y), f"{key}:{value}", ink, tracking=TRACKING)
        y += line
    return image


def generate(n: int, seed: int, min_fields: int = 1, max_fields: int = 1, value_len: tuple[int, int] = (2, 3)) -> Iterator[dict]:
    """Yield ``n`` items: ``{"image", "question", "answers": [str], "qtype", "key"}``.

    ``key`` identifies the document's content; the data preparation uses it to keep train and test
    documents disjoint.
    """
    rng = random.Random(seed)
    for _ in range(n):
        keys = rng.sample(KEYS, rng.randint(min_fields, max_fields))
        fields = [(k, "".join(rng.choice(VALUE_CHARS) for _ in range(rng.randint(*value_len)))) for k in keys]
        title, layout = rng.choice(TITLES), rng.choice(("receipt", "form"))
        image = render_page(rng, fields, title, layout)
        asked, answer = rng.choice(fields)
        yield {
            "image": image,
            "question": f"What is the {asked}?",
            "answers": [answer],
            "qtype": layout,
            "key": f"{title}|{layout}|" + ";".join(f"{k}={v}" for k, v in fields),
        }
