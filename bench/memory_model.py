"""Peak training memory of a cell, estimated before (or instead of) running it.

The parameter-side terms are exact arithmetic on the base model: LoRA adds ``r * (in + out)``
weights per targeted linear layer; a fully trained module (``modules_to_save``) adds a trainable copy
of itself; trainable weights get a gradient and AdamW keeps two fp32 moments each. The activation
term is a model (checked against CUDA ``max_memory_allocated`` only on a GPU): per LLM decoder
layer, ``ACTIVATION_FACTOR`` hidden-sized tensors per token are kept for the backward pass, plus
the vision encoder's when any of it trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bench.space import Cell
from bench.train import Resolution

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
    modules = dict(model.named_modules())
    lora = 0
    for name in resolution.lora:
        layer = modules[name]
        lora += cell.rank * (layer.in_features + layer.out_features)
    copies = sum(p.numel() for name in resolution.full for p in modules[name].parameters())
    base = sum(p.numel() for p in model.parameters())
    trainable = lora + copies
    size = weight_bytes_per_param or _element_size(model)
    # trainable weights (LoRA, copies), their gradients and AdamW's two moments all take the
    # parameters' dtype (torch keeps optimizer state in the parameter's dtype)
    weight = (base + trainable) * size
    grads = trainable * size
    optimizer = 2 * trainable * size
    per_layer = ACTIVATION_FACTOR * batch_size * seq_len * hidden_size * size
    layers = 1 if gradient_checkpointing else llm_layers
    activations = per_layer * layers
    if cell.vision in ("resampler+vpm", "vpm-lora") and vision_layers:
        vision_layers_kept = 1 if gradient_checkpointing else vision_layers
        activations += ACTIVATION_FACTOR * batch_size * vision_tokens * vision_hidden * size * vision_layers_kept
    return MemoryEstimate(frozen_params=base, trainable_params=trainable, weight_bytes=weight, grad_bytes=grads,
                          optimizer_bytes=optimizer, activation_bytes=activations)


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
