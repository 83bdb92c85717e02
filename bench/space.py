"""The ablation space: LoRA target sets x ranks x alpha rule x vision policies x LoRA variants (x seeds), and presets.

A *cell* is one configuration; a *run* is a cell trained with one seed on one suite. Target sets are
named LLM roles, resolved to module names per model family by its :class:`~bench.models.adapter.RoleMap`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

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
    "minicpmv-recipe": "MiniCPM-V's own LoRA recipe (finetune.py, tune_vision): token embeddings, connector and vision encoder "
                       "trained fully; with --targets qkvo it is finetune_lora.sh (MiniCPM-V families only)",
}
# Policies every family has; a preset's matrix uses these (a family's own recipe is asked for by name).
GENERIC_POLICIES: tuple[str, ...] = ("frozen", "resampler", "resampler+vpm", "vpm-lora")

# LoRA variants, each through peft (bench.train.attach / bench.train.make_optimizer); "lora" is plain LoRA.
VARIANTS: dict[str, str] = {
    "lora": "plain LoRA (the default)",
    "dora": "DoRA: weight-decomposed LoRA, a trained magnitude per output feature of each targeted layer (peft use_dora)",
    "rslora": "rank-stabilised LoRA: scaling alpha/sqrt(r) instead of alpha/r (peft use_rslora)",
    "pissa": "PiSSA: A and B start from each targeted weight's top-r singular vectors, the base keeps the residual "
             "(peft init_lora_weights='pissa', full SVD)",
    "loraplus": "LoRA+: the B matrices at 16 x the A matrices' learning rate (peft create_loraplus_optimizer)",
}
DEFAULT_VARIANT = "lora"
LORAPLUS_LR_RATIO = 16.0  # LoRA+: B's rate over A's (the LoRA+ paper's recommended ratio; peft's loraplus_lr_ratio)


@dataclass(frozen=True, order=True)
class Cell:
    targets: str
    rank: int
    alpha: float
    vision: str
    variant: str = DEFAULT_VARIANT

    @property
    def name(self) -> str:
        suffix = "" if self.variant == DEFAULT_VARIANT else f"-{self.variant}"
        return f"{self.targets}-r{self.rank}-a{self.alpha:g}-{self.vision}{suffix}"

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.variant == DEFAULT_VARIANT:  # plain LoRA's records keep the keys they had before variants existed
            del out["variant"]
        return out

    @classmethod
    def from_dict(cls, c: dict) -> "Cell":
        """The cell of a record's ``cell`` dict (records of plain LoRA carry no variant)."""
        return cls(c["targets"], int(c["rank"]), float(c["alpha"]), c["vision"], c.get("variant", DEFAULT_VARIANT))


@dataclass(frozen=True)
class TrainSettings:
    """Everything besides the cell that decides a run's numbers; equal for every cell of a matrix,
    except the learning rates, which each cell sweeps over a declared grid (:meth:`at`).

    Three learning rates, one per kind of trainable part: LoRA matrices (``lr``), the connector and
    the vision encoder when a vision policy trains them fully. LoRA's best rate is about ten times
    full fine-tuning's (LoRA paper; "LoRA Without Regret"), and ms-swift/LLaMA-Factory give the vision
    side its own rates (``vit_lr``, ``aligner_lr``), so one rate for all would favour some policies.
    """

    steps: int
    batch_size: int
    lr: float  # LoRA matrices (in the LLM, and in the vision encoder under vpm-lora)
    lr_connector: float  # the connector when trained fully
    lr_vision: float  # the vision encoder when trained fully
    lora_dropout: float = 0.05
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_items: int | None = None  # None: the suite's default
    test_items: int | None = None
    val_items: int | None = None
    gradient_checkpointing: bool = False  # same numbers, less activation memory, ~30% more compute
    # validation-based stopping: validation at 10, 20, 30, 50 and 75% of training, and the best checkpoint's weights
    # are the ones scored on test (a run cannot be blamed for over-fitting it could have stopped before)
    early_stopping: bool = False
    resolution: int | None = None  # the family's image-resolution knob (adapter.resolution_knob); None: the checkpoint's

    def at(self, lr: float) -> "TrainSettings":
        """The same settings at LoRA rate ``lr``, the fully trained parts' rates scaled alike (one
        grid point of a cell's learning-rate sweep keeps the declared ratios between parts)."""
        scale = lr / self.lr
        tidy = lambda x: float(f"{x:.10g}")  # noqa: E731  (3e-3 * 0.1 is 0.00030000000000000003)
        return replace(self, lr=lr, lr_connector=tidy(self.lr_connector * scale), lr_vision=tidy(self.lr_vision * scale))

    def to_dict(self) -> dict:
        out = asdict(self)
        for flag in ("gradient_checkpointing", "early_stopping"):
            if not out[flag]:  # records made before the option existed keep their keys
                del out[flag]
        if self.resolution is None:  # likewise: the checkpoint's own resolution is what every older run used
            del out["resolution"]
        return out


# Fully trained parts' rates as a fraction of LoRA's, by default. The vision encoder at a tenth follows
# the anchors (LoRA's best rate ~10x full fine-tuning's). The connector at 0.3 was measured: on docvqa
# validation (qkvo, seed 0, 200 steps) `resampler` scored 0.603 with the connector at 0.1x (LoRA 1e-2),
# 0.755 at 1x (LoRA 3e-3) and 0.793 at 0.3x (LoRA 1e-2); `resampler+vpm` 0.902 with both parts at 0.1x,
# 0.805 at 1x (the encoder collapses above ~1e-3), 0.918 at (0.3x, 0.1x).
CONNECTOR_LR_RATIO = 0.3
VISION_LR_RATIO = 0.1


def rates(lr: float) -> dict:
    return {"lr": lr, "lr_connector": float(f"{lr * CONNECTOR_LR_RATIO:.10g}"),
            "lr_vision": float(f"{lr * VISION_LR_RATIO:.10g}")}


@dataclass(frozen=True)
class Preset:
    targets: tuple[str, ...]
    ranks: tuple[int, ...]
    vision: tuple[str, ...]
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # the LoRA learning rates every cell is run at (its best on validation is reported)
    train: TrainSettings
    about: str
    variants: tuple[str, ...] = (DEFAULT_VARIANT,)


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        targets=("qv", "all"),
        ranks=(4,),
        vision=("frozen", "resampler"),
        seeds=(0,),
        lrs=(2e-3,),
        train=TrainSettings(steps=6, batch_size=8, **rates(2e-3), warmup_steps=1, train_items=128, test_items=48, val_items=48),
        about="tests and a first look: 4 cells, one seed, one learning rate, a few steps, tiny data (< 60 s on 2 cores)",
    ),
    "default": Preset(
        targets=tuple(TARGET_SETS),
        ranks=(8,),
        vision=GENERIC_POLICIES,
        seeds=(0, 1, 2),
        # LoRA rates: on docvqa validation (qkvo, seed 0) 1e-3 was the worst rate of every policy and 3e-2
        # collapsed every policy; the optima lie near 1e-2 (frozen, resampler, resampler+vpm) and 3e-3-1e-2
        # (vpm-lora), inside this grid.
        lrs=(3e-3, 1e-2, 3e-2),
        # 400 steps (12,800 samples, 1.6 epochs): on docvqa validation (qkvo, seed 0, each policy at its best
        # rate) 200 steps left every vision policy rising (last quarter +0.03-0.04) and under-ranked them
        # (resampler 0.79, resampler+vpm 0.92, vpm-lora 0.89); at 400 the best cells had converged
        # (vpm-lora 0.979, last quarter +0.005; resampler+vpm 0.969, 0.959 at 600 steps), resampler 0.935
        # (0.963 at 600).
        train=TrainSettings(steps=400, batch_size=32, **rates(1e-2), warmup_steps=40),
        about="every target set x every vision policy at rank 8, each at 3 learning rates x 3 seeds (the sound protocol)",
    ),
    "full": Preset(
        targets=tuple(TARGET_SETS),
        ranks=(4, 16, 64),
        vision=GENERIC_POLICIES,
        seeds=(0, 1, 2),
        lrs=(3e-3, 1e-2, 3e-2),
        train=TrainSettings(steps=2000, batch_size=32, **rates(1e-2), warmup_steps=100),
        about="GPU-sized: 3 ranks x 3 learning rates x 3 seeds over the whole space",
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
    if not (math.isfinite(value) and value > 0):
        raise BenchError(f"alpha rule {rule!r} gives alpha {value:g}; alpha must be a finite positive number, e.g. 2r (alpha = 2*rank) or 16")
    return value


def build_cells(targets, ranks, vision, alpha_rule: str = "2r", variants=(DEFAULT_VARIANT,)) -> list[Cell]:
    """The matrix: target sets x ranks x vision policies x LoRA variants, duplicates dropped, in that order."""
    for name, values in (("targets", targets), ("ranks", ranks), ("vision", vision), ("variants", variants)):
        if not values:
            raise BenchError(f"--{name} is empty; give at least one value")
    for t in targets:
        if t not in TARGET_SETS:
            raise BenchError(f"unknown target set {t!r}; choose from {', '.join(TARGET_SETS)}")
    for v in vision:
        if v not in VISION_POLICIES:
            raise BenchError(f"unknown vision policy {v!r}; choose from {', '.join(VISION_POLICIES)}")
    for v in variants:
        if v not in VARIANTS:
            raise BenchError(f"unknown LoRA variant {v!r}; choose from {', '.join(VARIANTS)}")
    for r in ranks:
        if r <= 0:
            raise BenchError(f"rank {r} is not positive; LoRA ranks must be >= 1")
    cells = [
        Cell(t, r, alpha_for(r, alpha_rule), v, variant)
        for t, r, v, variant in itertools.product(dict.fromkeys(targets), dict.fromkeys(ranks), dict.fromkeys(vision),
                                                  dict.fromkeys(variants))
    ]
    return cells
