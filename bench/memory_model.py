"""Peak training memory of a cell, estimated before (or instead of) running it.

The parameter-side terms are exact arithmetic on the base model: LoRA adds ``r * (in + out)``
weights per targeted linear layer (DoRA also a magnitude vector of ``out`` weights; the other LoRA
variants none); a fully trained module (``modules_to_save``) adds a trainable copy
of itself; trainable weights get a gradient and AdamW keeps two fp32 moments each. The activation
term is a model (checked against CUDA ``max_memory_allocated`` only on a GPU): per LLM decoder
layer, ``ACTIVATION_FACTOR`` hidden-sized tensors per token are kept for the backward pass, plus
the vision encoder's per patch when any of it trains. Both token counts depend on the image
resolution: :func:`estimate_for` reads them off the adapter at its current setting (the LLM sequence
is the text plus the image's visual tokens; the encoder runs over every tile's or slice's patches). The LoRA variants are not told apart there (DoRA also
keeps each targeted layer's base output, and builds its weight norm from a full-size matrix per step).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from bench.models.adapter import RoleMap
from bench.space import Cell
from bench.train import Resolution, resolve

ACTIVATION_FACTOR = 34  # tensors of hidden size kept per token and layer (attention + MLP, no checkpointing)


@dataclass(frozen=True)
class MemoryEstimate:
    frozen_params: int
    trainable_params: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _element_size(model: torch.nn.Module) -> int:
    return next(model.parameters()).element_size()


def estimate(model: torch.nn.Module, resolution: Resolution, cell: Cell, batch_size: int, seq_len: int,
             hidden_size: int, llm_layers: int, vision_tokens: int = 0, vision_hidden: int = 0, vision_layers: int = 0,
             weight_bytes_per_param: int | None = None, gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Bytes at the peak of a training step for ``cell`` on ``model`` (the untouched base model)."""
    state = train_state(model, resolution, cell, weight_bytes_per_param)
    size = weight_bytes_per_param or _element_size(model)
    per_layer = ACTIVATION_FACTOR * batch_size * seq_len * hidden_size * size
    layers = 1 if gradient_checkpointing else llm_layers
    activations = per_layer * layers
    if cell.vision in ("resampler+vpm", "vpm-lora", "minicpmv-recipe") and vision_layers:
        vision_layers_kept = 1 if gradient_checkpointing else vision_layers
        activations += ACTIVATION_FACTOR * batch_size * vision_tokens * vision_hidden * size * vision_layers_kept
    return MemoryEstimate(**state, activation_bytes=activations)


def train_state(model: torch.nn.Module, resolution: Resolution, cell: Cell, weight_bytes_per_param: int | None = None) -> dict:
    """The exact parameter-side bytes of training ``cell`` on ``model`` (the untouched base model): weights
    (the base, its LoRA matrices and the trainable copies of fully trained modules), their gradients and
    AdamW's two moments. Recorded with every run (``state_bytes``), so runs compare on a figure that does
    not depend on what else the process did."""
    modules = dict(model.named_modules())
    lora = 0
    for name in resolution.lora:
        layer = modules[name]
        lora += cell.rank * (layer.in_features + layer.out_features)
        if cell.variant == "dora":  # peft's lora_magnitude_vector: one trained magnitude per output feature
            lora += layer.out_features
    copies = sum(p.numel() for name in resolution.full for p in modules[name].parameters())
    base = sum(p.numel() for p in model.parameters())
    size = weight_bytes_per_param or _element_size(model)
    # peft keeps LoRA weights (DoRA's magnitudes too) in fp32 over a 16-bit base (autocast_adapter_dtype); copies keep the
    # base's dtype. Gradients and AdamW's two moments take their parameter's dtype.
    lora_size = max(size, 4)
    grads = lora * lora_size + copies * size
    return {"frozen_params": base, "trainable_params": lora + copies,
            "weight_bytes": base * size + lora * lora_size + copies * size, "grad_bytes": grads, "optimizer_bytes": 2 * grads}


def measured_state_bytes(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What a wrapped model and its optimizer actually hold after a step (for checking the estimate)."""
    params = list(peft_model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return {"frozen_params": sum(p.numel() for p in params if not p.requires_grad),
            "trainable_params": sum(p.numel() for p in trainable),
            "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
            "optimizer_bytes": state}


@dataclass(frozen=True)
class Shape:
    """The sizes the activation term needs, read off the module tree (no config conventions)."""

    hidden_size: int
    llm_layers: int
    vision_hidden: int
    vision_layers: int

    @classmethod
    def of(cls, model: torch.nn.Module, roles: RoleMap) -> "Shape":
        q = re.compile(roles.llm_pattern(("q",)))
        vision = re.compile(roles.vision_linear)
        queries, vision_layers = [], {}
        for name, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            if q.fullmatch(name):
                queries.append(m)
            elif vision.fullmatch(name):
                layer = re.match(r"(.*?\.\d+)\.", name)  # keyed by path, not index: Mllama has two stacks of layers
                vision_layers.setdefault(layer.group(1) if layer else name, m.in_features)
        if not queries:
            raise ValueError("no query projection in the language model (check the family's role map)")
        return cls(queries[0].in_features, len(queries), max(vision_layers.values(), default=0), len(vision_layers))


def estimate_on(model: torch.nn.Module, roles: RoleMap, cell: Cell, batch_size: int, seq_len: int,
                vision_tokens: int, bytes_per_param: int | None, gradient_checkpointing: bool = False) -> MemoryEstimate:
    """:func:`estimate` with the shape taken from ``model`` itself (which may live on the meta device)."""
    shape = Shape.of(model, roles)
    return estimate(model, resolve(model, roles, cell), cell, batch_size, seq_len, shape.hidden_size, shape.llm_layers,
                    vision_tokens, shape.vision_hidden, shape.vision_layers, bytes_per_param, gradient_checkpointing)


@dataclass(frozen=True)
class ImageLoad:
    """What one image costs at the adapter's current resolution: the LLM sequence positions it fills
    (``visual_tokens``) and the positions the vision encoder runs over (``vision_patches``, every tile
    or slice, before any merger)."""

    visual_tokens: int
    vision_patches: int


def image_load(adapter, image) -> ImageLoad:
    """Both counts of ``image`` from the adapter's own processor, at its current resolution."""
    return ImageLoad(adapter.visual_tokens(image), adapter.vision_patches(image))


def estimate_for(adapter, cell: Cell, batch_size: int, text_tokens: int, image, bytes_per_param: int | None = None,
                 gradient_checkpointing: bool = False) -> MemoryEstimate:
    """:func:`estimate_on` for one image per sample at the adapter's current resolution
    (``adapter.set_resolution``): the LLM sequence is ``text_tokens`` plus the image's visual tokens, and
    the vision encoder's activations scale with its own patch count."""
    load = image_load(adapter, image)
    return estimate_on(adapter.skeleton(), adapter.roles, cell, batch_size, text_tokens + load.visual_tokens,
                       load.vision_patches, bytes_per_param, gradient_checkpointing)
