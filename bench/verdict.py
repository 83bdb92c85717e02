"""The verdict of a benchmark: what was chosen on validation, and what test then says about it.

Pure functions of records, shared by the report and the recommender, so both apply one protocol:

1. each cell is taken at its best learning rate on **validation** (mean over seeds); a best rate at
   the edge of the grid is flagged (the grid may not contain the cell's real optimum);
2. the best cell is the best on validation, and the 95% confidence set of the best
   (:func:`bench.stats.best_set`) is computed on validation, seeds and items resampled;
3. **test** is only reported: each cell's score with an interval over seeds and items, each cell
   against the validation-chosen best on test items (never on the items it was chosen on), and the
   findings (:data:`CLAIMS`): contrasts between levels of one factor, matched on every other factor.

A caveat the report states: validation scores at each cell's chosen rate are optimistic (the best of
the grid), roughly alike for every cell; test scores are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bench import stats

CELL = ("targets", "rank", "alpha", "vision", "variant")


def cell_key(record: dict) -> tuple:
    """(suite, targets, rank, alpha, vision, variant); records of plain LoRA carry no variant."""
    c = record["cell"]
    return (record["suite"], c["targets"], int(c["rank"]), float(c["alpha"]), c["vision"], c.get("variant", "lora"))


def setting_key(record: dict) -> tuple:
    """What besides the cell a run was trained with that differs between runs of one study: the
    learning rates (a grid point, or a search trial's rate and dropout)."""
    t = record["train"]
    return (float(t["lr"]), float(t.get("lr_connector", t["lr"])), float(t.get("lr_vision", t["lr"])),
            float(t.get("lora_dropout", 0.0)))


def cell_name(key: tuple) -> str:
    _, targets, rank, alpha, vision, variant = key
    return f"{targets}-r{rank}-a{alpha:g}-{vision}" + ("" if variant == "lora" else f"-{variant}")


@dataclass
class CellResult:
    key: tuple  # (suite, targets, rank, alpha, vision, variant)
    setting: tuple  # the chosen (lr, lr_connector, lr_vision, dropout)
    runs: list[dict]  # the chosen setting's runs, one per seed
    by_rate: dict[float, tuple[float, int]]  # LoRA rate -> (mean validation score, seeds), over the grid
    edge: bool  # best rate at the low or high end of a grid of >= 2 rates

    @property
    def lr(self) -> float:
        return self.setting[0]

    @property
    def val(self) -> float:
        return float(np.mean([r["val_score"] for r in self.runs]))

    @property
    def test(self) -> float:
        return float(np.mean([r["score"] for r in self.runs]))

    @property
    def seeds(self) -> int:
        return len(self.runs)

    @property
    def plateaued(self) -> tuple[int, int]:
        """(runs whose validation score had plateaued, runs with a curve)."""
        flags = [r.get("plateaued") for r in self.runs if r.get("plateaued") is not None]
        return sum(flags), len(flags)

    def mean(self, field_: str) -> float:
        values = [r.get(field_) for r in self.runs if r.get(field_) is not None]
        return float(np.mean(values)) if values else math.nan


def _ok_cells(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "cell" and r.get("status") == "ok" and r.get("val_score") is not None]


def choose_rates(records: list[dict]) -> dict[tuple, CellResult]:
    """Each cell at its best setting on validation (mean over that setting's seeds). A setting whose
    loss diverged on any seed is not chosen (its surviving seeds would flatter it), unless every
    setting of the cell diverged somewhere; nor is one run with fewer seeds than another setting of
    the cell (under racing it lost the rate race, and one seed's score would flatter it too)."""
    grouped: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in _ok_cells(records):
        grouped.setdefault(cell_key(r), {}).setdefault(setting_key(r), []).append(r)
    diverged = {(cell_key(r), setting_key(r)) for r in records if r.get("kind") == "cell" and r.get("status") == "diverged"}
    grids: dict[tuple, set] = {}  # every rate a cell tried, those a race stopped at its rung included
    for r in records:
        if r.get("kind") == "cell" and r.get("cell") and r.get("status") in ("ok", "raced", "diverged"):
            grids.setdefault(cell_key(r), set()).add(float(r["train"]["lr"]))
    out = {}
    for key, settings in grouped.items():
        means = {s: float(np.mean([r["val_score"] for r in runs])) for s, runs in settings.items()}
        eligible = [s for s in sorted(means) if (key, s) not in diverged] or sorted(means)
        most = max(len(settings[s]) for s in eligible)  # a rate run with fewer seeds lost a race (bench/race.py)
        eligible = [s for s in eligible if len(settings[s]) == most]
        chosen = max(eligible, key=lambda s: means[s])  # ties: the lower rate (sorted first)
        rates = sorted(grids.get(key, set()) | {s[0] for s in settings})
        by_rate = {}
        for s, runs in settings.items():
            by_rate.setdefault(s[0], []).extend(runs)
        by_rate = {lr: (float(np.mean([r["val_score"] for r in rs])), len(rs)) for lr, rs in sorted(by_rate.items())}
        by_rate.update({lr: (math.nan, 0) for lr in rates if lr not in by_rate})  # stopped at a racing rung
        edge = len(rates) >= 2 and chosen[0] in (rates[0], rates[-1])
        out[key] = CellResult(key, chosen, sorted(settings[chosen], key=lambda r: r.get("seed") or 0), by_rate, edge)
    return out


# ------------------------------------------------------------------------------------------ claims


@dataclass(frozen=True)
class Claim:
    """A piece of folklore as a contrast: level ``a`` minus level ``b`` of ``factor`` (a CELL field),
    over cells that match on every other factor."""

    name: str
    source: str
    factor: str
    a: str
    b: str


CLAIMS = (
    Claim("q,v vs q,k", "LoRA paper: q,v beats q,k at a fixed budget; MiniCPM-V's scripts default to q,k(,v)", "targets", "qv", "qk"),
    Claim("q,k,v vs q,k", "MiniCPM-V: adding v to its q,k default", "targets", "qkv", "qk"),
    Claim("all linear vs attention", "QLoRA: LoRA on every linear layer (attention + MLP) is needed", "targets", "all", "qkvo"),
    Claim("resampler vs frozen", "MiniCPM-V's LoRA recipe trains the resampler by default", "vision", "resampler", "frozen"),
    Claim("vision encoder vs resampler", "tune the vision encoder only when images differ from pretraining", "vision",
          "resampler+vpm", "resampler"),
    Claim("vision LoRA vs full vision", "LoRA inside the vision encoder as a cheaper middle ground", "vision", "vpm-lora",
          "resampler+vpm"),
)

# Each LoRA variant against plain LoRA; a finding only where the benchmark ran that variant.
VARIANT_CLAIMS = (
    Claim("DoRA vs LoRA", "DoRA: a trained magnitude per output feature beats LoRA at the same rank", "variant", "dora", "lora"),
    Claim("rsLoRA vs LoRA", "rsLoRA: alpha/sqrt(r) scaling learns better than alpha/r, the more so at higher ranks", "variant",
          "rslora", "lora"),
    Claim("PiSSA vs LoRA", "PiSSA: starting from the weights' principal singular vectors converges faster and better", "variant",
          "pissa", "lora"),
    Claim("LoRA+ vs LoRA", "LoRA+: B matrices at a higher learning rate than A train faster and better", "variant", "loraplus", "lora"),
)

_FIELD = {"targets": 1, "rank": 2, "alpha": 3, "vision": 4, "variant": 5}


@dataclass
class Finding:
    claim: Claim
    pairs: int  # matched cell pairs the contrast averages over
    comparison: stats.Comparison | None  # None: no matched pair in this benchmark
    spread: tuple[float, float] | None = None  # smallest and largest pair difference (point values)


def contrast(draws: stats.Draws, cells: list[tuple], claim: Claim, margin: float) -> Finding:
    """Mean over matched pairs of (level a - level b) on ``draws`` (test), with its bootstrap verdict."""
    i = _FIELD[claim.factor]
    rest = lambda k: k[:i] + k[i + 1:]  # noqa: E731
    a_cells = {rest(k): k for k in cells if k[i] == claim.a}
    pairs = [(a_cells[rest(k)], k) for k in cells if k[i] == claim.b and rest(k) in a_cells]
    if claim.factor == "targets":  # a fixed-budget run pairs target sets whose ranks differ
        pairs = pairs or _pairs_ignoring_rank(cells, claim)
    if not pairs:
        return Finding(claim, 0, None)
    weights: dict = {}
    for a, b in pairs:
        weights[a] = weights.get(a, 0.0) + 1 / len(pairs)
        weights[b] = weights.get(b, 0.0) - 1 / len(pairs)
    diff, reps = draws.contrast(weights)
    points = [draws.point[draws.index(a)] - draws.point[draws.index(b)] for a, b in pairs]
    seeds = draws.min_seeds([k for pair in pairs for k in pair])
    return Finding(claim, len(pairs), stats.verdict(diff, reps, margin, seeds), (min(points), max(points)))


def _pairs_ignoring_rank(cells: list[tuple], claim: Claim) -> list[tuple]:
    """Target sets at different ranks but the same vision policy and variant: the --param-budget view."""
    a = {(k[0], k[4], k[5]): k for k in cells if k[1] == claim.a}
    return [(a[(k[0], k[4], k[5])], k) for k in cells if k[1] == claim.b and (k[0], k[4], k[5]) in a]


# ------------------------------------------------------------------------------------------ suite


@dataclass
class SuiteVerdict:
    suite: str
    cells: list[CellResult]  # best validation score first
    best: CellResult | None
    best_set: set  # cell keys in the 95% confidence set of the best (validation)
    val: stats.Draws | None
    test: stats.Draws | None
    vs_best: dict[tuple, stats.Comparison] = field(default_factory=dict)  # on test: cell - best
    findings: list[Finding] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        """Fewest seeds behind any cell (1: seed noise is not measured)."""
        return min((c.seeds for c in self.cells), default=0)

    @property
    def grid(self) -> list[float]:
        return sorted({lr for c in self.cells for lr in c.by_rate})


def judge(records: list[dict], margin: float = stats.MARGIN, n_boot: int = stats.N_BOOT) -> dict[str, SuiteVerdict]:
    """Every suite's verdict from its records (module docstring)."""
    chosen = choose_rates(records)
    out = {}
    for suite in sorted({k[0] for k in chosen}):
        cells = sorted((c for k, c in chosen.items() if k[0] == suite), key=lambda c: (-c.val, cell_name(c.key)))
        groups = {c.key: c.runs for c in cells}
        val_scores, test_scores = stats.matrices(groups, "val_items"), stats.matrices(groups, "items")
        val = stats.bootstrap(val_scores, n_boot) if val_scores else None
        test = stats.bootstrap(test_scores, n_boot) if test_scores else None
        best = cells[0] if cells else None
        best_set = stats.best_set(val) if val is not None else ({best.key} if best else set())
        verdict = SuiteVerdict(suite, cells, best, best_set, val, test)
        if test is not None and best is not None and best.key in test_scores:
            verdict.vs_best = {c.key: stats.compare(test, c.key, best.key, margin) for c in cells
                               if c.key != best.key and c.key in test_scores}
            keys = [c.key for c in cells if c.key in test_scores]
            claims = CLAIMS + tuple(c for c in VARIANT_CLAIMS if any(k[5] == c.a for k in keys))
            verdict.findings = [contrast(test, keys, claim, margin) for claim in claims]
        out[suite] = verdict
    return out


def base_scores(records: list[dict]) -> dict[str, tuple[float | None, float | None]]:
    """Suite -> (validation, test) score of the untuned base model."""
    return {r["suite"]: (r.get("val_score"), r.get("score")) for r in records if r.get("kind") == "base" and r.get("status") == "ok"}
