"""Packed runs (bench/packing.py) against the same runs trained one after another, side by side.

    python -m bench.perf --only packing

K = 4 runs of one LLM-only cell (qv r8, frozen vision encoder) on the embedded model, two ways:
*seeds* (four seeds at one rate: different batches) and *learning rates* (four rates at one seed: the
same batches, so the frozen encoder runs once for all four). The sequential side is the harness's own
loop as the runner uses it, the encoder's outputs served from the vision cache when batches repeat.
Equivalence first (no dropout, so both sides draw no random masks): every run's loss curve and final
LoRA weights, packed against sequential. Then time with the default dropout, medians after a warm-up,
A and B alternating. bench/perf/gpu_check.py runs :func:`compare` on a GPU and :func:`synthetic_step`
on a ~1B model.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

K = 4
CELL = ("qv", 8, 16.0, "frozen")
KINDS = {"seeds": ([0, 1, 2, 3], [1e-3] * K), "learning rates": ([0] * K, [3e-4, 1e-3, 3e-3, 1e-2])}


def _sequential(adapter, examples, settings, seeds, lrs, accelerator):
    """Each run through bench.train.train, as the runner trains them; losses, LoRA weights, seconds."""
    from bench.packing import lora_weights
    from bench.space import Cell
    from bench.train import attach, detach, resolve, train
    from bench.vision_cache import VisionCache

    cell = Cell(*CELL)
    res = resolve(adapter.model, adapter.roles, cell)
    cache = VisionCache() if len(set(seeds)) == 1 else None
    losses, weights, seconds = [], [], 0.0
    try:
        for seed, lr in zip(seeds, lrs):
            peft_model = attach(adapter.model, res, cell, settings.lora_dropout, seed)
            try:
                result = train(adapter, peft_model, examples, settings.at(lr), seed, accelerator, vision_cache=cache)
                weights.append({n: t.cpu() for n, t in lora_weights(peft_model, res.lora).items()})
            finally:
                adapter.model = detach(peft_model)
            losses.append(result.losses)
            seconds += result.train_s
    finally:
        if cache is not None:
            cache.clear()
    return losses, weights, seconds


def _packed(adapter, examples, settings, seeds, lrs, accelerator):
    from bench.packing import export_weights, pack, train_packed
    from bench.space import Cell
    from bench.train import resolve

    cell = Cell(*CELL)
    p = pack(adapter.model, resolve(adapter.model, adapter.roles, cell), cell, settings.lora_dropout, seeds)
    try:
        result = train_packed(adapter, p, examples, settings, lrs, accelerator)
        weights = [{n: t.cpu() for n, t in export_weights(p, k).items()} for k in range(len(seeds))]
    finally:
        adapter.model = p.unpack()
    return result.losses, weights, result.train_s


def compare(adapter, examples, device: torch.device, reps: int, steps: int, batch_size: int = 32) -> dict:
    from accelerate import Accelerator

    from bench.space import TrainSettings

    accelerator = Accelerator(cpu=device.type == "cpu")
    base = TrainSettings(steps=steps, batch_size=batch_size, lr=1e-3, lr_connector=1e-3, lr_vision=1e-3, warmup_steps=2)
    exact = replace(base, lora_dropout=0.0, steps=min(steps, 10))  # no random masks on either side
    out = {}
    for kind, (seeds, lrs) in KINDS.items():
        sl, sw, _ = _sequential(adapter, examples, exact, seeds, lrs, accelerator)
        pl, pw, _ = _packed(adapter, examples, exact, seeds, lrs, accelerator)
        loss_gap = max(abs(a - b) for k in range(K) for a, b in zip(sl[k], pl[k]))
        weight_gap = max(float((sw[k][n] - pw[k][n]).abs().max()) for k in range(K) for n in sw[k])
        seq_s, packed_s = [], []
        _sequential(adapter, examples, base, seeds, lrs, accelerator)  # warm-up
        _packed(adapter, examples, base, seeds, lrs, accelerator)
        for _ in range(reps):
            seq_s.append(_sequential(adapter, examples, base, seeds, lrs, accelerator)[2])
            packed_s.append(_packed(adapter, examples, base, seeds, lrs, accelerator)[2])
        a, b = statistics.median(seq_s), statistics.median(packed_s)
        out[kind] = {"sequential_s": a, "packed_s": b, "ratio": b / a, "loss_gap": loss_gap, "weight_gap": weight_gap,
                     "equivalence_steps": exact.steps}
    return out


def synthetic_step(model, inputs: dict, target_regex: str, k: int, steps: int, device: torch.device, dtype) -> dict:
    """One LoRA step (r16) of K runs on a big random model: K sequential peft steps on a batch each against
    one packed step on the K batches stacked. Median step times."""
    import re

    from bench.packing import pack, run_losses
    from bench.space import Cell
    from bench.train import Resolution, attach, detach

    def timed(step_fn) -> float:
        times = []
        for i in range(steps + 2):  # two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step_fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")  # noqa: E731
    cell = Cell("all", 16, 32.0, "frozen")
    names = [n for n, m in model.named_modules() if re.fullmatch(target_regex, n) and isinstance(m, torch.nn.Linear)]
    resolution = Resolution(lora=names, full=[], target_regex=target_regex)
    peft_model = attach(model, resolution, cell, 0.0, 0)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()

    def sequential():
        for _ in range(k):
            with autocast():
                loss = peft_model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    sequential_s = timed(sequential)
    model = detach(peft_model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    packed_runs = pack(model, resolution, cell, 0.0, list(range(k)))
    opt = torch.optim.AdamW([{"params": packed_runs.params(i), "lr": 1e-4} for i in range(k)])
    labels = inputs["labels"].repeat(k, 1)
    # repeated along the first dimension: Qwen2-VL's patch rows (all images together) repeat as a block, like the ids
    stacked = {n: (t.repeat(k, *([1] * (t.dim() - 1))) if torch.is_tensor(t) else t) for n, t in inputs.items() if n != "labels"}
    model.train()

    def packed():
        with autocast():
            logits = model(**stacked).logits
        run_losses(logits, labels, k).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        packed_s = timed(packed)
    finally:
        packed_runs.unpack()
    return {"k": k, "sequential_s": sequential_s, "packed_s": packed_s, "ratio": packed_s / sequential_s}


def section(reps: int, steps: int = 20) -> str:
    from bench.perf.overheads import embedded_docvqa, machine_line
    from bench.space import Cell

    adapter, _, examples = embedded_docvqa()
    t0 = time.perf_counter()
    r = compare(adapter, examples, torch.device("cpu"), reps, steps)
    minutes = (time.perf_counter() - t0) / 60
    lines = ["## Packed runs", "",
             f"Command: `python -m bench.perf --only packing --reps {reps}` ({minutes:.1f} min)", "", machine_line(), "",
             f"K = {K} runs of `{Cell(*CELL).name}` on the embedded model, {steps} steps x batch 32 of docvqa each, trained "
             f"one after another through the harness's loop (the vision cache serving repeated batches, as the runner does) "
             f"against one packed pass (bench/packing.py). Medians of {reps} repetitions after a warm-up, alternating. "
             f"Equivalence without dropout over {r['seeds']['equivalence_steps']} steps.", "",
             "| K runs differ in | sequential | packed | packed / sequential | largest loss gap | largest weight gap |",
             "|---|---|---|---|---|---|"]
    for kind, x in r.items():
        lines.append(f"| {kind} | {x['sequential_s']:.2f} s | {x['packed_s']:.2f} s | {x['ratio']:.3f} | {x['loss_gap']:.1e} | {x['weight_gap']:.1e} |")
    lines += ["", "Packing removes no arithmetic: on CPU the time per row barely falls with batch size, so it pays only "
              "as far as the fixed per-step costs (Python, optimizer, kernel dispatch) are shared. The runner trains runs one "
              "at a time on CPU; the GPU check (`python -m bench.perf.gpu_check`) measures the same comparison on a GPU, where "
              "a small model's step is bound by kernel launches, and on a ~1B model.", ""]
    return "\n".join(lines)
