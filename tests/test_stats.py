"""The statistics behind every verdict, on simulated cells whose truth is known."""

import numpy as np
import pytest

from bench import stats


def simulate(n_cells=20, seeds=3, items=500, gap=0.0, seed_sd=0.02, rs=0):
    """Cells scored on the same items (per-item difficulty shared); each seed shifts a cell's accuracy by
    N(0, seed_sd); cell 0 is better by ``gap``."""
    rng = np.random.default_rng(rs)
    difficulty = rng.uniform(0.2, 0.8, items)
    cells = {}
    for c in range(n_cells):
        rows = []
        for _ in range(seeds):
            p = np.clip(difficulty + rng.normal(0, seed_sd) + (gap if c == 0 else 0.0), 0, 1)
            rows.append((rng.random(items) < p).astype(float))
        cells[c] = stats.Scores(tuple(range(seeds)), np.array(rows))
    return cells


def test_twenty_equal_cells_stay_in_the_confidence_set_of_the_best():
    sizes = [len(stats.best_set(stats.bootstrap(simulate(rs=r), seed=r))) for r in range(4)]
    assert min(sizes) >= 18, sizes


def test_a_planted_gap_is_found():
    for r in range(3):
        assert stats.best_set(stats.bootstrap(simulate(gap=0.25, seed_sd=0.01, rs=r), seed=r)) == {0}


def test_the_best_is_kept_under_a_moderate_gap():
    found = [stats.best_set(stats.bootstrap(simulate(gap=0.12, rs=r), seed=r)) for r in range(3)]
    assert all(0 in f for f in found) and all(len(f) < 20 for f in found)


def test_seed_noise_widens_intervals():
    quiet = stats.bootstrap(simulate(n_cells=1, seed_sd=0.0, items=2000))
    noisy = stats.bootstrap(simulate(n_cells=1, seed_sd=0.08, items=2000))
    width = lambda d: d.interval(0)[2] - d.interval(0)[1]  # noqa: E731
    assert width(noisy) > 2 * width(quiet)


def test_one_seed_intervals_hold_item_noise_only():
    one = stats.bootstrap(simulate(n_cells=2, seeds=1, items=400))
    _, low, high = one.interval(0)
    assert 0 < high - low < 0.15  # about 4 binomial standard errors at n=400


def test_equivalence_needs_seeds_and_a_tight_interval():
    cells = simulate(n_cells=2, seeds=3, items=20000, seed_sd=0.0)
    d = stats.bootstrap(cells)
    assert stats.compare(d, 0, 1, margin=0.02).verdict == "equivalent"
    one_seed = stats.bootstrap({k: stats.Scores((0,), v.matrix[:1]) for k, v in cells.items()})
    assert stats.compare(one_seed, 0, 1, margin=0.02).verdict == "not shown different"  # seed noise unmeasured
    assert stats.compare(d, 0, 1, margin=0.001).verdict == "not shown different"  # too tight a margin to show


def test_real_differences_are_called_by_their_sign():
    d = stats.bootstrap(simulate(n_cells=2, gap=0.15, seed_sd=0.01))
    better = stats.compare(d, 0, 1)
    assert better.verdict == "better" and better.low > 0 and better.p_value < 0.01
    assert stats.compare(d, 1, 0).verdict == "worse"


def test_bootstrap_is_deterministic():
    cells = simulate(n_cells=3)
    a, b = stats.bootstrap(cells, seed=5), stats.bootstrap(cells, seed=5)
    assert np.array_equal(a.draws, b.draws)


def test_matrices_align_items_and_skip_cells_without_them():
    recs = {"a": [{"seed": 0, "items": [{"id": "x", "score": 1}, {"id": "y", "score": 0}]},
                  {"seed": 1, "items": [{"id": "y", "score": 1}, {"id": "x", "score": 1}]}],
            "b": [{"seed": 0, "items": [{"id": "y", "score": 0}, {"id": "x", "score": 0}]}],
            "c": [{"seed": 0, "items": []}]}
    m = stats.matrices(recs)
    assert set(m) == {"a", "b"}
    assert m["a"].matrix.tolist() == [[1.0, 0.0], [1.0, 1.0]] and m["a"].seeds == (0, 1)
    assert m["a"].mean == pytest.approx(0.75)
