"""Is one configuration really better than another, and which could be the best? Seeds and items.

A score has two sources of noise: the seed (LoRA initialisation, dropout, data order) and the finite
set of evaluation items. Every interval here resamples both, in one two-level bootstrap:

* items are drawn with replacement once per replicate and shared by every cell of a suite, so
  comparisons between cells stay paired on items;
* each cell's seeds are drawn with replacement independently (seed s of one cell shares its data
  order with seed s of another, nothing else). With k seeds the seed level is rescaled by
  sqrt(k / (k - 1)): resampling k values underestimates their variance by (k - 1) / k, a third at
  k = 3 (Davison & Hinkley's correction). With one seed, seed noise is not measured at all, and the
  callers say so.

On top of the bootstrap draws:

* :func:`best_set`: a 95% confidence set for the best cell, Hsu's multiple comparison with the best
  done by a studentised max-t bootstrap over all ordered pairs: a cell leaves the set only when some
  other cell is shown better with the family-wise error held at 5% over every comparison, so picking
  the best among many cells cannot manufacture a winner.
* :func:`verdict`: "better"/"worse" when the 95% interval of a difference excludes zero; "equivalent"
  only when its 90% interval lies inside +-margin (two one-sided tests at 5%, TOST) and seed noise
  was measured; otherwise "not shown different", which is not a claim of equivalence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
N_BOOT = 2000
MARGIN = 0.01  # one point: the default equivalence margin


@dataclass(frozen=True)
class Scores:
    """One cell's per-item scores on one split: a (seeds x items) matrix, items in a common order."""

    seeds: tuple
    matrix: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.matrix.mean()) if self.matrix.size else math.nan

    @property
    def per_seed(self) -> np.ndarray:
        return self.matrix.mean(axis=1)


def matrices(groups: dict, field: str = "items") -> dict:
    """``groups``: key -> records of that cell (one per seed). Returns key -> :class:`Scores` over the
    items every group was scored on (``field``: ``items`` for test, ``val_items`` for validation);
    groups whose records lack per-item scores are left out."""
    usable = {k: rs for k, rs in groups.items() if rs and all(r.get(field) for r in rs)}
    if not usable:
        return {}
    common = None
    for rs in usable.values():
        for r in rs:
            ids = {i["id"] for i in r[field]}
            common = ids if common is None else common & ids
    order = sorted(common)
    out = {}
    for key, rs in usable.items():
        rows = []
        for r in sorted(rs, key=lambda r: r.get("seed") or 0):
            by_id = {i["id"]: float(i["score"]) for i in r[field]}
            rows.append([by_id[i] for i in order])
        out[key] = Scores(tuple(r.get("seed") for r in sorted(rs, key=lambda r: r.get("seed") or 0)),
                          np.asarray(rows, dtype=float).reshape(len(rows), len(order)))
    return out


@dataclass
class Draws:
    """Bootstrap replicates of every cell's mean score (same item draws for all cells)."""

    keys: list
    point: np.ndarray  # (cells,)
    draws: np.ndarray  # (cells, replicates)
    seeds: np.ndarray  # (cells,) number of seeds behind each cell

    def index(self, key) -> int:
        return self.keys.index(key)

    def interval(self, key, level: float = 0.95) -> tuple[float, float, float]:
        row = self.draws[self.index(key)]
        lo, hi = np.percentile(row, [50 * (1 - level), 50 * (1 + level)])
        return float(self.point[self.index(key)]), float(lo), float(hi)

    def contrast(self, weights: dict) -> tuple[float, np.ndarray]:
        """``sum(w * mean)`` over cells: the point value and its replicates."""
        vector = np.zeros(len(self.keys))
        for key, w in weights.items():
            vector[self.index(key)] += w
        return float(vector @ self.point), vector @ self.draws

    def min_seeds(self, keys) -> int:
        return int(min(self.seeds[self.index(k)] for k in keys))


def bootstrap(cells: dict, n_boot: int = N_BOOT, seed: int = 0) -> Draws:
    """Two-level bootstrap of each cell's mean (module docstring). ``cells``: key -> :class:`Scores`,
    all over the same items."""
    keys = list(cells)
    n = cells[keys[0]].matrix.shape[1] if keys else 0
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).T / n if n else np.zeros((0, n_boot))  # (items, B)
    point, draws, seeds = [], [], []
    for key in keys:
        m = cells[key].matrix
        k = m.shape[0]
        per_seed = m @ weights  # (seeds, B): each seed's mean under the replicate's item draw
        centre = per_seed.mean(axis=0)
        if k > 1:
            picks = rng.integers(k, size=(n_boot, k))
            chosen = np.take_along_axis(per_seed.T, picks, axis=1).mean(axis=1)
            replicate = centre + math.sqrt(k / (k - 1)) * (chosen - centre)
        else:
            replicate = centre
        point.append(float(m.mean()))
        draws.append(replicate)
        seeds.append(k)
    return Draws(keys, np.asarray(point), np.asarray(draws).reshape(len(keys), n_boot), np.asarray(seeds))


def best_set(d: Draws, alpha: float = ALPHA) -> set:
    """Keys of the cells that could be the best (higher is better) at confidence 1 - alpha.

    Cell i leaves when some cell j is shown better: t_ij = (mean_j - mean_i) / se_ij above the
    (1 - alpha) quantile of the bootstrap's max over the comparisons still open of the centred t's.
    Step-down (Romano-Wolf): the quantile is recomputed over the cells still in the set until nothing
    more leaves; the family-wise error of "the true best was dropped" stays at alpha.
    """
    c = len(d.keys)
    if c <= 1:
        return set(d.keys)
    diff = d.point[None, :] - d.point[:, None]  # diff[i, j] = mean_j - mean_i
    reps = d.draws[None, :, :] - d.draws[:, None, :]  # (i, j, B)
    se = reps.std(axis=2)
    off = ~np.eye(c, dtype=bool)
    spread = off & (se > 0)
    t_point = np.where(spread, diff / np.where(spread, se, 1.0), np.where(off & (diff > 0), np.inf, -np.inf))
    centred = (reps - diff[:, :, None]) / np.where(spread, se, 1.0)[:, :, None]
    remaining = np.ones(c, dtype=bool)
    while True:
        family = spread & remaining[:, None]
        critical = float(np.quantile(centred[family].max(axis=0), 1 - alpha)) if family.any() else 0.0
        shown = ((t_point > critical) & off).any(axis=1) & remaining
        if not shown.any():
            return {d.keys[i] for i in range(c) if remaining[i]}
        remaining &= ~shown


@dataclass(frozen=True)
class Comparison:
    diff: float
    low: float  # 95% interval
    high: float
    p_value: float  # two-sided, from the bootstrap replicates
    verdict: str  # better | worse | equivalent | not shown different
    seeds: int  # fewest seeds behind either side (1: seed noise unmeasured)


def verdict(diff: float, replicates: np.ndarray, margin: float = MARGIN, seeds: int = 2) -> Comparison:
    lo95, hi95 = np.percentile(replicates, [2.5, 97.5])
    lo90, hi90 = np.percentile(replicates, [5, 95])
    b = len(replicates)
    p = min(1.0, 2 * min((np.sum(replicates <= 0) + 1) / (b + 1), (np.sum(replicates >= 0) + 1) / (b + 1)))
    if seeds >= 2 and -margin < lo90 and hi90 < margin:
        word = "equivalent"
    elif lo95 > 0:
        word = "better"
    elif hi95 < 0:
        word = "worse"
    else:
        word = "not shown different"
    return Comparison(diff, float(lo95), float(hi95), float(p), word, int(seeds))


def compare(d: Draws, a, b, margin: float = MARGIN) -> Comparison:
    """``a - b`` (keys of ``d``) on paired items, seeds resampled on both sides."""
    diff, reps = d.contrast({a: 1.0, b: -1.0})
    return verdict(diff, reps, margin, d.min_seeds([a, b]))
