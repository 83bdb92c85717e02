"""LoRA dropout on CPU: peft's ``nn.Dropout`` against an equivalent mask drawn from random integer bits.

    python -m bench.perf --only dropout

peft applies dropout to each LoRA layer's input before the A matrix. ``F.dropout`` draws a float
uniform per element and compares it with p; drawing int32 words and comparing them with p * 2**31
gives the same Bernoulli(1 - p) mask (p resolved to 2**-31) with less work per element. Both keep the output's distribution: x * mask / (1 - p). Measured twice: one call on an
activation of the default training shape, and whole training runs of a default cell with each.
Adopting it would change every run's random stream, hence every published number, so it is measured
here and not switched on.
"""

from __future__ import annotations

import statistics
import time

import torch


class BitsDropout(torch.nn.Module):
    """Inverted dropout whose keep mask is ``int32 bits >= p * 2**31`` (same distribution as F.dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = int(p * 2**31)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # uniform over [0, 2**31)
        return x * (bits >= self.threshold) * (1.0 / (1.0 - self.p))


def _per_call(shape, p: float, rounds: int = 9, calls: int = 50) -> dict:
    """Mean time of a call within a round of ``calls``; median over rounds, the two alternating."""
    x = torch.randn(*shape)
    ours = BitsDropout(p).train()

    def round_ms(fn) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e3

    ref = lambda: torch.nn.functional.dropout(x, p, True)  # noqa: E731
    round_ms(ref), round_ms(lambda: ours(x))  # warm-up
    a, b = [], []
    for _ in range(rounds):
        a.append(round_ms(ref))
        b.append(round_ms(lambda: ours(x)))
    kept = float((ours(torch.ones(1_000_000)) != 0).float().mean())
    return {"f_dropout_ms": statistics.median(a), "bits_ms": statistics.median(b), "kept_share": kept}


def _swap(peft_model, p: float) -> int:
    n = 0
    for module in peft_model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, torch.nn.ModuleDict) and "default" in drop:
            drop["default"] = BitsDropout(p)
            n += 1
    return n


def training(adapter, examples, reps: int, steps: int = 30) -> dict:
    from accelerate import Accelerator

    from bench.space import Cell, TrainSettings
    from bench.train import attach, detach, resolve, train

    cell = Cell("all", 8, 16.0, "resampler+vpm")
    settings = TrainSettings(steps=steps, batch_size=32, lr=1e-3, lr_connector=1e-4, lr_vision=1e-4, warmup_steps=3)
    res = resolve(adapter.model, adapter.roles, cell)

    def run(bits: bool) -> float:
        peft_model = attach(adapter.model, res, cell, settings.lora_dropout, 0)
        try:
            if bits:
                _swap(peft_model, settings.lora_dropout)
            return train(adapter, peft_model, examples, settings, 0, Accelerator(cpu=True)).train_s
        finally:
            adapter.model = detach(peft_model)

    def without() -> float:
        peft_model = attach(adapter.model, res, cell, 0.0, 0)
        try:
            return train(adapter, peft_model, examples, settings, 0, Accelerator(cpu=True)).train_s
        finally:
            adapter.model = detach(peft_model)

    run(False), run(True), without()  # warm-up
    peft_s, bits_s, none_s = [], [], []
    for _ in range(reps):
        peft_s.append(run(False))
        bits_s.append(run(True))
        none_s.append(without())
    return {"peft_s": statistics.median(peft_s), "bits_s": statistics.median(bits_s), "none_s": statistics.median(none_s),
            "steps": steps}


def section(reps: int) -> str:
    from bench.perf.overheads import embedded_docvqa, machine_line

    adapter, _, examples = embedded_docvqa()
    t0 = time.perf_counter()
    shape = (32, 160, 128)  # batch x tokens x hidden of a default docvqa step
    call = _per_call(shape, 0.05)
    tr = training(adapter, examples, reps)
    minutes = (time.perf_counter() - t0) / 60
    share = (tr["peft_s"] - tr["none_s"]) / tr["peft_s"]
    return "\n".join([
        "## LoRA dropout", "",
        f"Command: `python -m bench.perf --only dropout --reps {reps}` ({minutes:.1f} min)", "", machine_line(), "",
        "| measurement | peft's nn.Dropout (F.dropout) | int32-bits mask | ratio |", "|---|---|---|---|",
        f"| one call, p = 0.05, activation {'x'.join(map(str, shape))} (share kept by the bits mask over 1M draws: {call['kept_share']:.4f}) "
        f"| {call['f_dropout_ms']:.2f} ms | {call['bits_ms']:.2f} ms | {call['bits_ms'] / call['f_dropout_ms']:.3f} |",
        f"| training, all-r8 + resampler+vpm, {tr['steps']} steps x batch 32 (median of {reps}; without dropout {tr['none_s']:.2f} s, "
        f"so dropout is {share:.0%} of the step) | {tr['peft_s']:.2f} s | {tr['bits_s']:.2f} s | {tr['bits_s'] / tr['peft_s']:.3f} |", "",
        "The bits mask keeps the output's distribution but draws different random numbers, so every run's numbers would change "
        "and the published records would have to be regenerated; it is not switched on.", ""])
