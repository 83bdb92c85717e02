"""Packed runs: K LoRA runs of one LLM-only cell (frozen vision) trained in one pass over a shared base.

Runs that differ only in seed or learning rate share every frozen weight. Packed, the base model's
matmuls run once over all K sub-batches (K x B rows) and each run's low-rank update is two batched
matmuls over its own stacked adapters (rows k*B..(k+1)*B-1 belong to run k). Each run keeps its own
loss mean, gradient clipping and AdamW learning rate (one parameter group per run), so packed runs make
the numbers of the same runs trained one after another, up to float summation order.

peft cannot do this: its mixed-adapter batches (``adapter_names=``) refuse training, and
``torch.func.vmap`` over a transformers LLM fails on the mask code's data-dependent control flow. So the
LoRA layer here is ours, initialised from and exported to peft's own (:func:`pack`, :meth:`Pack.export`),
so each run's adapter is a normal PEFT folder.

Packing removes no arithmetic; it pays where a step is bound by kernel launches and occupancy (small
models on a GPU), and, when the runs share batches (a learning-rate sweep at one seed), by running the
frozen vision encoder once. ``python -m bench.perf --only packing`` measures both on this machine.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.measure import Stopwatch
from bench.space import Cell, TrainSettings
from bench.train import ADAPTER, Diverged, Resolution, attach, batch_order, detach, schedule


class PackedLoRALinear(torch.nn.Module):
    """A frozen linear with K LoRA adapters; the input's leading rows are split evenly among them."""

    def __init__(self, base: torch.nn.Linear, a: list[torch.Tensor], b: list[torch.Tensor], scaling: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.ParameterList([torch.nn.Parameter(t.detach().clone()) for t in a])  # each [r, in]
        self.lora_B = torch.nn.ParameterList([torch.nn.Parameter(t.detach().clone()) for t in b])  # each [out, r]
        self.scaling = scaling
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        k = len(self.lora_A)
        rows = self.dropout(x.reshape(k, -1, x.shape[-1]))
        a = torch.stack(tuple(self.lora_A))
        b = torch.stack(tuple(self.lora_B))
        delta = torch.bmm(torch.bmm(rows.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)) * self.scaling
        return out + delta.reshape(out.shape).to(out.dtype)


@dataclass
class Pack:
    """K runs' adapters in place of the target linears of ``model``; :meth:`unpack` hands the base back."""

    model: torch.nn.Module
    seeds: list[int]
    layers: dict[str, PackedLoRALinear]

    def params(self, k: int) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A[k], layer.lora_B[k])]

    def unpack(self) -> torch.nn.Module:
        for name, layer in self.layers.items():
            _replace(self.model, name, layer.base)
        self.layers = {}
        return self.model


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack(model: torch.nn.Module, resolution: Resolution, cell: Cell, dropout: float, seeds: list[int]) -> Pack:
    """Replace each LoRA target of ``cell`` with a packed layer holding one adapter per seed, each
    initialised exactly as :func:`bench.train.attach` would for that seed."""
    if cell.vision != "frozen" or resolution.full:
        raise BenchError(f"packed runs need a frozen vision encoder and LoRA in the LLM only; cell {cell.name} trains "
                         f"{', '.join(resolution.full) or 'LoRA in the vision encoder'}")
    if cell.variant not in ("lora", "rslora"):  # rslora only changes the scaling, read from peft below
        raise BenchError(f"packed runs implement plain LoRA (and rsLoRA's scaling); cell {cell.name} is {cell.variant}")
    if not seeds:
        raise BenchError("packed runs need at least one run")
    inits: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = []
    for seed in seeds:
        peft_model = attach(model, resolution, cell, dropout, seed)
        weights = lora_weights(peft_model, resolution.lora)
        inner = peft_model.base_model.model
        inits.append({n: (weights[f"{n}.lora_A.weight"], weights[f"{n}.lora_B.weight"], inner.get_submodule(n).scaling[ADAPTER])
                      for n in resolution.lora})
        model = detach(peft_model)
    layers = {}
    for name in resolution.lora:
        base = model.get_submodule(name)
        layer = PackedLoRALinear(base, [i[name][0] for i in inits], [i[name][1] for i in inits], inits[0][name][2], dropout)
        _replace(model, name, layer.to(base.weight.device))
        layers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        for p in [*layer.lora_A, *layer.lora_B]:
            p.requires_grad_(True)
    return Pack(model, list(seeds), layers)


def export_weights(pack_: Pack, k: int) -> dict[str, torch.Tensor]:
    """Run ``k``'s LoRA matrices under peft's parameter names (``<module>.lora_A.weight``...)."""
    return {f"{name}.lora_{part}.weight": getattr(layer, f"lora_{part}")[k].detach().clone()
            for name, layer in pack_.layers.items() for part in ("A", "B")}


def lora_weights(peft_model, modules: list[str]) -> dict[str, torch.Tensor]:
    """A peft model's LoRA matrices on ``modules``, named as :func:`export_weights` names them."""
    inner = peft_model.base_model.model
    return {f"{name}.lora_{part}.weight": getattr(inner.get_submodule(name), f"lora_{part}")[ADAPTER].weight.detach().clone()
            for name in modules for part in ("A", "B")}


def load_into(peft_model, weights: dict[str, torch.Tensor]) -> None:
    """Copy exported weights into a peft model attached with the same cell (for saving or evaluation)."""
    inner = peft_model.base_model.model
    with torch.no_grad():
        for key, value in weights.items():
            module, part = key.rsplit(".lora_", 1)
            getattr(inner.get_submodule(module), f"lora_{part.split('.')[0]}")[ADAPTER].weight.copy_(value)


def run_losses(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each run's mean next-token loss (what ``model(**batch).loss`` is for its sub-batch alone)."""
    shift = labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shift.reshape(-1),
                             ignore_index=-100, reduction="none").view(k, -1)
    counts = (shift != -100).view(k, -1).sum(1)
    return tokens.sum(1) / counts


@contextlib.contextmanager
def shared_encoder(encoder: torch.nn.Module, k: int):
    """While the block runs, ``encoder`` sees only the first of K identical sub-batches and its
    outputs are repeated K times: runs that share batches run the frozen encoder once."""
    original = encoder.forward

    def forward(*args, **kwargs):
        key = "pixel_values" if "pixel_values" in kwargs else None
        pixels = kwargs[key] if key else args[0]
        n = pixels.shape[0] // k
        head = pixels[:n]
        out = original(*args, **{**kwargs, key: head}) if key else original(head, *args[1:], **kwargs)
        grow = lambda t: t.repeat(k, *([1] * (t.dim() - 1))) if torch.is_tensor(t) and t.shape[:1] == (n,) else t  # noqa: E731
        if torch.is_tensor(out):
            return grow(out)
        return type(out)(**{name: grow(out[name]) for name in out.keys()})

    encoder.forward = forward
    try:
        yield
    finally:
        del encoder.forward


@dataclass
class PackedResult:
    losses: list[list[float]]  # per run, per step
    train_s: float
    tokens: int  # all runs together


def train_packed(adapter, pack_: Pack, examples, settings: TrainSettings, lrs: list[float], accelerator) -> PackedResult:
    """:func:`bench.train.train` for K packed runs: the same batches per seed, schedule, clipping and
    AdamW, each run in its own parameter group at its own learning rate."""
    k = len(pack_.seeds)
    if len(lrs) != k:
        raise BenchError(f"packed runs: {k} seeds but {len(lrs)} learning rates; give one rate per run")
    device = accelerator.device
    optimizer = torch.optim.AdamW([{"params": pack_.params(i), "lr": lr} for i, lr in enumerate(lrs)],
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    orders = [batch_order(len(examples), settings.steps, settings.batch_size, s) for s in pack_.seeds]
    shared = len(set(pack_.seeds)) == 1
    encoder = adapter.model.get_submodule(adapter.roles.vision)
    model = pack_.model
    losses: list[list[float]] = [[] for _ in range(k)]
    tokens = 0
    model.train()
    try:
        with Stopwatch(device) as clock, (shared_encoder(encoder, k) if shared and k > 1 else contextlib.nullcontext()):
            for step in range(settings.steps):
                rows = [examples[i] for order in orders for i in order[step]]
                batch = adapter.train_batch(rows, device)
                labels = batch.pop("labels")
                tokens += int(batch["attention_mask"].sum())
                with accelerator.autocast():
                    logits = model(**batch).logits
                per_run = run_losses(logits, labels, k)
                values = per_run.tolist()
                bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
                if bad:
                    raise Diverged(f"loss of packed run {bad[0]} is {values[bad[0]]} at step {step + 1}")
                accelerator.backward(per_run.sum())
                if settings.max_grad_norm:
                    for i in range(k):
                        torch.nn.utils.clip_grad_norm_(pack_.params(i), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                for i, v in enumerate(values):
                    losses[i].append(v)
    finally:
        model.eval()
    return PackedResult(losses=losses, train_s=clock.seconds, tokens=tokens)
