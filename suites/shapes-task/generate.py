"""Offline generator of ``shapes-task`` and ``shapes-task-50``: pretraining images, new questions.

The scenes are drawn exactly like pretraining (``shapes``), so the vision encoder sees nothing new;
what shifts is the task: questions the model was never trained to answer, built on the skills it
has (colour, shape, position, reading codes) but asked the other way round and answered in new
words (yes/no, "red circle", "nothing", counts of one colour). ``new_fraction`` of the items take a
new question type, the rest a pretraining one: ``shapes-task-50`` (0.5) and ``shapes-task`` (1.0)
grade the task axis the recommender calibrates on, with the visual axis held at zero.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from suites.shapes.generate import COLORS, PRETRAINING, QTYPES, QUADRANTS, SHAPES, _question, render_scene

NEW_QTYPES = ("exists", "lookup", "color_count", "corner")


def _new_question(rng: random.Random, qtype: str, objects: list[dict]) -> tuple[str, str] | None:
    if qtype == "exists":  # half about an object in the scene, half about one that is not
        present = {(o["color"], o["shape"]) for o in objects}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
        else:
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, shape = rng.choice(absent)
        return f"Is there a {color} {shape}?", "yes" if (color, shape) in present else "no"
    if qtype == "lookup":
        coded = [o for o in objects if o["code"]]
        if not coded:
            return None
        target = rng.choice(coded)
        if sum(o["code"] == target["code"] for o in coded) > 1:
            return None
        return f"Which object has the code {target['code']}?", f"{target['color']} {target['shape']}"
    if qtype == "color_count":  # half about a colour in the scene, half about one that is not (answer 0)
        present = sorted({o["color"] for o in objects})
        absent = [c for c in COLORS if c not in present]
        color = rng.choice(present if rng.random() < 0.5 or not absent else absent)
        return f"How many {color} objects are there?", str(sum(o["color"] == color for o in objects))
    if qtype == "corner":
        quadrant = rng.choice(QUADRANTS)
        there = [o for o in objects if o["quadrant"] == quadrant]
        return f"What is in the {quadrant}?", f"{there[0]['color']} {there[0]['shape']}" if there else "nothing"
    raise ValueError(f"unknown question type {qtype!r}")


def generate(n: int, seed: int, new_fraction: float = 1.0) -> Iterator[dict]:
    """Yield ``n`` items ``{"image", "question", "answers": [str], "qtype"}``; ``new_fraction`` of them
    (evenly spread) ask a new question type, cycling through :data:`NEW_QTYPES`, the rest a pretraining one."""
    if not 0 <= new_fraction <= 1:
        raise ValueError(f"new_fraction must be in [0, 1], got {new_fraction}")
    rng = random.Random(seed)
    n_new = n_old = 0
    for i in range(n):
        new = math.floor((i + 1) * new_fraction) > math.floor(i * new_fraction)
        qtype = NEW_QTYPES[n_new % len(NEW_QTYPES)] if new else QTYPES[n_old % len(QTYPES)]
        n_new, n_old = n_new + new, n_old + (not new)
        while True:
            image, objects = render_scene(rng, rng.randint(1, 4), style=PRETRAINING)
            qa = (_new_question if new else _question)(rng, qtype, objects)
            if qa is not None:
                break
        yield {"image": image, "question": qa[0], "answers": [qa[1]], "qtype": qtype}
