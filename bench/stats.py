"""Is one cell really better than another? Paired tests on the same test items.

Every cell of a suite is scored on the same test items, so differences are judged item by item
(paired): the bootstrap interval of the mean per-item difference and a sign-flip permutation
p-value, both from scipy. A cell whose difference from the best cell is not significant
(p >= 0.05) is "within noise" of the best. With several seeds, a cell's per-item score is the
mean over its seeds, so seed noise and item noise both enter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05


def item_scores(records: list[dict]) -> dict[tuple, pd.Series]:
    """Per (suite, targets, rank, alpha, vision): the per-item score averaged over seeds."""
    by_cell: dict[tuple, list[pd.Series]] = {}
    for r in records:
        if r.get("kind") != "cell" or r.get("status") != "ok" or not r.get("items"):
            continue
        c = r["cell"]
        key = (r["suite"], c["targets"], c["rank"], c["alpha"], c["vision"])
        by_cell.setdefault(key, []).append(pd.Series({i["id"]: float(i["score"]) for i in r["items"]}))
    return {key: pd.concat(series, axis=1).mean(axis=1) for key, series in by_cell.items()}


def _mean_difference(x, y, axis=-1):
    return np.mean(y - x, axis=axis)


def paired_comparison(a: pd.Series, b: pd.Series, n_resamples: int = 2000, seed: int = 0) -> dict:
    """``b - a`` on the items both were scored on: mean, 95% bootstrap interval, permutation p-value."""
    joined = pd.concat([a, b], axis=1, join="inner").dropna()
    x, y = joined.iloc[:, 0].to_numpy(), joined.iloc[:, 1].to_numpy()
    diff = float(np.mean(y - x))
    if len(joined) < 2 or np.all(x == y):
        return {"diff": diff, "low": diff, "high": diff, "p_value": 1.0, "items": len(joined)}
    boot = stats.bootstrap((x, y), _mean_difference, paired=True, vectorized=True, n_resamples=n_resamples,
                           confidence_level=0.95, method="percentile", random_state=seed)
    perm = stats.permutation_test((x, y), _mean_difference, permutation_type="samples", vectorized=True,
                                  n_resamples=n_resamples, random_state=seed)
    return {"diff": diff, "low": float(boot.confidence_interval.low), "high": float(boot.confidence_interval.high),
            "p_value": float(perm.pvalue), "items": len(joined)}


def versus_best(records: list[dict], suite: str, best: tuple) -> pd.DataFrame:
    """Every other cell of ``suite`` against ``best`` (a key of :func:`item_scores`)."""
    scores = item_scores(records)
    if best not in scores:  # records without per-item scores
        return pd.DataFrame()
    rows = []
    for key, series in scores.items():
        if key[0] != suite or key == best:
            continue
        result = paired_comparison(scores[best], series)
        rows.append({"target_set": key[1], "rank": key[2], "alpha": key[3], "vision_policy": key[4], **result,
                     "within_noise": result["p_value"] >= ALPHA})
    return pd.DataFrame(rows)
