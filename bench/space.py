"""The ablation space: LoRA target sets x ranks x alpha rule x vision policies (x seeds), and presets.

A *cell* is one configuration; a *run* is a cell trained with one seed on one suite. Target sets are
named LLM roles, resolved to module names per model family by its :class:`~bench.models.adapter.RoleMap`.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from bench.errors import BenchError

TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qk": ("q", "k"),
    "qv": ("q", "v"),
    "qkv": ("q", "k", "v"),
    "qkvo": ("q", "k", "v", "o"),
    "all": ("q", "k", "v", "o", "gate", "up", "down"),
}

VISION_POLICIES: dict[str, str] = {
    "frozen": "only the LLM's LoRA trains",
    "resampler": "connector trained fully (MiniCPM-V's LoRA default)",
    "resampler+vpm": "connector and vision encoder trained fully (MiniCPM-V tune_vision)",
    "vpm-lora": "connector trained fully, LoRA inside the vision encoder",
}


@dataclass(frozen=True, order=True)
class Cell:
    targets: str
    rank: int
    alpha: float
    vision: str

    @property
    def name(self) -> str:
        return f"{self.targets}-r{self.rank}-a{self.alpha:g}-{self.vision}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainSettings:
    """Everything besides the cell that decides a run's numbers; equal for every cell of a matrix."""

    steps: int
    batch_size: int
    lr: float
    lora_dropout: float = 0.05
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_items: int | None = None  # None: the suite's default
    test_items: int | None = None
    gradient_checkpointing: bool = False  # same numbers, less activation memory, ~30% more compute

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.gradient_checkpointing:  # records made before the option existed keep their keys
            del out["gradient_checkpointing"]
        return out


@dataclass(frozen=True)
class Preset:
    targets: tuple[str, ...]
    ranks: tuple[int, ...]
    vision: tuple[str, ...]
    seeds: tuple[int, ...]
    train: TrainSettings
    about: str


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        targets=("qv", "all"),
        ranks=(4,),
        vision=("frozen", "resampler"),
        seeds=(0,),
        train=TrainSettings(steps=6, batch_size=8, lr=2e-3, warmup_steps=1, train_items=128, test_items=48),
        about="tests and a first look: 4 cells, a few steps, tiny data (< 60 s on 2 cores)",
    ),
    "default": Preset(
        targets=tuple(TARGET_SETS),
        ranks=(8,),
        vision=tuple(VISION_POLICIES),
        seeds=(0,),
        # 200 steps: measured ~45 s of training per cell on 2 CPU cores (20 cells + eval < 20 min) and
        # enough for the best docvqa cell to pass ANLS 0.5 (300 steps gave 0.92, see suites/docvqa).
        train=TrainSettings(steps=200, batch_size=32, lr=1e-3, warmup_steps=20),
        about="every target set x every vision policy at rank 8, one seed (CPU: <= 20 min on 2 cores)",
    ),
    "full": Preset(
        targets=tuple(TARGET_SETS),
        ranks=(4, 16, 64),
        vision=tuple(VISION_POLICIES),
        seeds=(0, 1, 2),
        train=TrainSettings(steps=2000, batch_size=32, lr=1e-3, warmup_steps=100),
        about="GPU-sized: 3 ranks x 3 seeds over the whole space",
    ),
}


def alpha_for(rank: int, rule: str) -> float:
    """``2r`` (default) -> alpha = 2*rank; ``r`` -> alpha = rank; a plain number -> that alpha."""
    rule = rule.strip()
    try:
        if rule.endswith("r"):
            factor = float(rule[:-1]) if rule[:-1] else 1.0
            value = factor * rank
        else:
            value = float(rule)
    except ValueError:
        raise BenchError(f"alpha rule {rule!r} is not understood; use e.g. 2r (alpha = 2*rank), r, or 16") from None
    if value <= 0:
        raise BenchError(f"alpha rule {rule!r} gives alpha {value:g}; alpha must be positive")
    return value


def build_cells(targets, ranks, vision, alpha_rule: str = "2r") -> list[Cell]:
    for name, values in (("targets", targets), ("ranks", ranks), ("vision", vision)):
        if not values:
            raise BenchError(f"--{name} is empty; give at least one value")
    for t in targets:
        if t not in TARGET_SETS:
            raise BenchError(f"unknown target set {t!r}; choose from {', '.join(TARGET_SETS)}")
    for v in vision:
        if v not in VISION_POLICIES:
            raise BenchError(f"unknown vision policy {v!r}; choose from {', '.join(VISION_POLICIES)}")
    for r in ranks:
        if r <= 0:
            raise BenchError(f"rank {r} is not positive; LoRA ranks must be >= 1")
    cells = [
        Cell(t, r, alpha_for(r, alpha_rule), v)
        for t, r, v in itertools.product(dict.fromkeys(targets), dict.fromkeys(ranks), dict.fromkeys(vision))
    ]
    return cells
