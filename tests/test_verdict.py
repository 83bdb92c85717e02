"""The protocol: every choice on validation, test only reported."""

from bench import verdict
from tests.test_report import BASE, record


def test_each_cell_is_taken_at_its_best_rate_on_validation_not_test():
    runs = [record("qv", "frozen", s, score=0.9, val=0.2, lr=1e-3) for s in (0, 1)]  # great on test, poor on validation
    runs += [record("qv", "frozen", s, score=0.3, val=0.6, lr=3e-3) for s in (0, 1)]
    runs += [record("qv", "frozen", s, score=0.3, val=0.4, lr=1e-2) for s in (0, 1)]
    (cell,) = verdict.choose_rates(runs).values()
    assert cell.lr == 3e-3 and not cell.edge and cell.test == 0.3
    assert cell.by_rate == {1e-3: (0.2, 2), 3e-3: (0.6, 2), 1e-2: (0.4, 2)}


def test_a_best_rate_at_the_end_of_the_grid_is_flagged():
    runs = [record("qk", "frozen", 0, 0.5, lr=1e-3), record("qk", "frozen", 0, 0.6, lr=1e-2)]
    assert verdict.choose_rates(runs)[("docvqa", "qk", 8, 16.0, "frozen", "lora")].edge
    assert not verdict.choose_rates(runs[:1])[("docvqa", "qk", 8, 16.0, "frozen", "lora")].edge  # a single rate is no grid


def test_the_best_cell_is_chosen_on_validation_and_compared_on_test():
    runs = [BASE]
    runs += [record("all", "resampler", s, score=0.5, val=0.80) for s in range(3)]
    runs += [record("qv", "resampler", s, score=0.7, val=0.70) for s in range(3)]
    v = verdict.judge(runs)["docvqa"]
    assert verdict.cell_name(v.best.key) == "all-r8-a16-resampler"
    other = ("docvqa", "qv", 8, 16.0, "resampler", "lora")
    assert v.vs_best[other].diff > 0 and v.vs_best[other].verdict == "better"  # test disagrees, and the report says so


def test_findings_contrast_matched_cells():
    runs = []
    for targets, shift in (("qk", 0.0), ("qv", 0.1)):
        for vision, level in (("frozen", 0.2), ("resampler", 0.6)):
            runs += [record(targets, vision, s, score=level + shift) for s in range(3)]
    v = verdict.judge(runs)["docvqa"]
    found = {f.claim.name: f for f in v.findings}
    qv_qk = found["q,v vs q,k"]
    assert qv_qk.pairs == 2 and abs(qv_qk.comparison.diff - 0.1) < 0.03 and qv_qk.comparison.verdict == "better"
    resampler = found["resampler vs frozen"]
    assert resampler.pairs == 2 and abs(resampler.comparison.diff - 0.4) < 0.03
    assert found["all linear vs attention"].comparison is None  # no matched pair in this matrix


def test_a_rate_that_diverged_on_some_seed_is_not_chosen():
    runs = [record("qv", "frozen", s, score=0.3, val=0.3, lr=1e-3) for s in (0, 1)]
    runs += [record("qv", "frozen", 0, score=0.9, val=0.9, lr=1e-2),  # one lucky seed...
             {**record("qv", "frozen", 1, score=0.0, lr=1e-2), "status": "diverged", "val_score": None, "score": None}]
    (cell,) = verdict.choose_rates(runs).values()
    assert cell.lr == 1e-3  # ...of a rate whose other seed diverged
