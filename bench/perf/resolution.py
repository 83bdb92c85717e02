"""Image resolution as a measured factor: one tiny random Qwen2-VL trained at three ``max_pixels`` settings.

    python -m bench.perf --only resolution

The checkpoint is the tests' offline builder (tests/hf_families.py: hidden 64, two layers, patch 8, 2x2
merge). docvqa pages are enlarged to 448x336 so that the knob, not the page, bounds the resolution. Per
resolution and cell: a few training steps through the harness's own loop, the measured memory (the figure
runs are compared on, bench/memory_figures.py), training samples/s, the visual tokens per image as the
processor makes them, and the memory model's estimate at that resolution (bench.memory_model.estimate_for).
On CPU the activation term is not calibrated (it models what a GPU keeps for the backward pass): read the
estimate's growth with resolution, not its level. The GPU check (bench/perf/gpu_check.py) runs :func:`measure`
on CUDA, where the measured figure is peak allocated memory.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESOLUTIONS = (16384, 50176, 102400)  # max_pixels: 128^2, 224^2, 320^2 px
CELLS = (("qv", 8, 16.0, "frozen"), ("qv", 8, 16.0, "resampler+vpm"))
PAGE = (448, 336)  # larger than the largest setting: every setting resizes it down
STEPS, BATCH, ITEMS = 3, 4, 12


def _examples(adapter, n: int = ITEMS):
    from PIL import Image

    from bench import suites
    from suites.docvqa.generate import generate

    suite = suites.get("docvqa")
    items = list(generate(n, seed=99))
    pages = [it["image"].convert("RGB").resize(PAGE, Image.Resampling.BICUBIC) for it in items]
    return [adapter.example(suite.prompt(it["question"]), page, it["answers"][0]) for it, page in zip(items, pages)], pages


def measure(folder: Path, device: torch.device, resolutions=RESOLUTIONS, steps: int = STEPS, batch: int = BATCH) -> list[dict]:
    """Each resolution x cell trained for ``steps`` steps on the Qwen2-VL checkpoint in ``folder``."""
    from accelerate import Accelerator

    from bench.memory_figures import compared
    from bench.memory_model import estimate_for, image_load, train_state
    from bench.models import get_adapter
    from bench.runner import memory_fields
    from bench.space import Cell, TrainSettings
    from bench.train import attach, detach, resolve, train

    torch.manual_seed(0)
    adapter = get_adapter(str(folder))
    adapter.load(device)
    examples, pages = _examples(adapter)
    accelerator = Accelerator(cpu=device.type == "cpu")
    settings = TrainSettings(steps=steps, batch_size=batch, lr=1e-3, lr_connector=3e-4, lr_vision=1e-4, warmup_steps=1)
    size = adapter.weight_dtype(device.type).itemsize
    rows = []

    def run(cell: Cell, settings: TrainSettings = settings):
        res = resolve(adapter.model, adapter.roles, cell)
        state = {k: v for k, v in train_state(adapter.model, res, cell).items() if k.endswith("_bytes")}
        peft_model = attach(adapter.model, res, cell, settings.lora_dropout, 0)
        try:
            result = train(adapter, peft_model, examples, settings, 0, accelerator)
        finally:
            adapter.model = detach(peft_model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return result, state

    adapter.set_resolution(resolutions[0])
    run(Cell(*CELLS[-1]), replace(settings, steps=1))  # warm-up: first-call costs belong to no resolution
    for value in resolutions:
        adapter.set_resolution(value)
        load = image_load(adapter, pages[0])
        for spec in CELLS:
            cell = Cell(*spec)
            result, state = run(cell)
            record = {"kind": "cell", **memory_fields(result, state)}
            seq = result.tokens / result.samples  # measured tokens per training sequence, visual tokens included
            estimate = estimate_for(adapter, cell, batch, round(seq) - load.visual_tokens, pages[0], size)
            rows.append({"max_pixels": value, "cell": cell.name, "visual_tokens": load.visual_tokens,
                         "vision_patches": load.vision_patches, "seq_tokens": seq, "record": record,
                         "samples_per_s": result.samples_per_s, "train_s": result.train_s,
                         "estimate_mib": estimate.total_bytes / 2**20, "activation_mib": estimate.activation_bytes / 2**20})
    adapter.set_resolution(None)
    figure = compared([r["record"] for r in rows])
    for r in rows:
        r["measured_mib"] = figure.mib(r["record"])
        r["figure"] = figure.short
    return rows


def section() -> str:
    from bench.perf.overheads import machine_line

    sys.path.insert(0, str(ROOT / "tests"))
    import hf_families

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen2_vl"
        hf_families.save("qwen2_vl", folder)
        rows = measure(folder, torch.device("cpu"))
    minutes = (time.perf_counter() - t0) / 60
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    figure = rows[0]["figure"]
    lines = ["## Image resolution", "",
             f"Command: `python -m bench.perf --only resolution` ({minutes:.1f} min)", "",
             machine_line() + (f"; load average {load:.1f} at the end (samples/s are this machine's under that load)"
                               if load is not None else ""), "",
             f"A tiny random Qwen2-VL (tests/hf_families.py: hidden 64, 2 layers, patch 8, 2x2 merge), {STEPS} steps x batch "
             f"{BATCH} of docvqa pages enlarged to {PAGE[0]}x{PAGE[1]}, at three `max_pixels` settings (the family's knob, "
             f"`--resolutions`), through the harness's training loop after a warm-up run. Measured memory: {figure}. "
             "Estimate: bench.memory_model.estimate_for at that resolution (sequence = text tokens + the image's visual "
             "tokens; the vision encoder's term, counted when it trains, scales with its patch count).", "",
             f"| max_pixels | cell | visual tokens / image | vision patches / image | tokens / sequence | measured MiB ({figure}) "
             "| estimate MiB (activations) | samples/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = "-" if r["measured_mib"] is None else f"{r['measured_mib']:.1f}"
        lines.append(f"| {r['max_pixels']} | `{r['cell']}` | {r['visual_tokens']} | {r['vision_patches']} | {r['seq_tokens']:.0f} "
                     f"| {measured} | {r['estimate_mib']:.1f} ({r['activation_mib']:.1f}) | {r['samples_per_s']:.1f} |")
    first, last = rows[0], rows[-1]
    speeds = {cell: [r["samples_per_s"] for r in rows if r["cell"] == cell] for cell in dict.fromkeys(r["cell"] for r in rows)}
    ordered = all(all(a >= b for a, b in zip(v, v[1:])) for v in speeds.values())
    timing = "" if ordered else (
        " Samples/s do not fall monotonically with resolution in this run: "
        f"{STEPS} steps per setting on a shared machine{'' if load is None else f' (load average {load:.1f})'} are too few to time; "
        "the token and memory columns do not depend on the load.")
    lines += ["", f"From {first['max_pixels']} to {last['max_pixels']} max_pixels the image's visual tokens grow "
              f"{last['visual_tokens'] / first['visual_tokens']:.1f}x.{timing} On CPU the measured figure holds the model's exact "
              "weights plus the run's growth over its baseline; the memory model's activation term is a GPU model "
              "(tensors kept for the backward pass), so on CPU only its growth with resolution is meaningful. "
              "The GPU check (`python -m bench.perf.gpu_check`) runs the same measurement on CUDA, where the two compare on "
              "peak allocated memory; no GPU has run it yet.", ""]
    return "\n".join(lines)
