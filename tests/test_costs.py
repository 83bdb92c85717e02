"""The costs of tuning (bench/costs.py): control suites and forgetting, training-set size as a nested
factor, validation-based stopping, and the recommender's --max-forgetting."""

import math

import pandas as pd
import pytest
import torch

from bench import costs
from bench.errors import BenchError
from bench.recommend import _feasible, _forgetting, build_evidence
from bench.runner import _BestCheckpoint, regime_label
from bench.store import read_record, record_files
from conftest import run_cli


def test_pareto_front_is_optunas_non_dominated_set():
    points = {"a": (0.10, 0.00), "b": (0.30, 0.05), "c": (0.05, 0.02), "d": (0.30, 0.10), "e": (math.nan, 0.0)}
    assert costs.pareto_front(points) == {"a", "b"}  # c is beaten by a on both; d by b; e has no gain


def test_regime_labels_name_each_level():
    assert regime_label("docvqa", None) == "docvqa"
    assert regime_label("docvqa", {"train_items": 250}) == "docvqa@n250"


def test_best_checkpoint_restores_the_best_validation_weights():
    model = torch.nn.Linear(2, 2)
    best = _BestCheckpoint()
    best.offer(1, 0.5, model)
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    best.offer(2, 0.4, model)  # worse: not kept
    assert best.step == 1
    best.restore(model)
    assert torch.equal(model.weight, kept)
    again = _BestCheckpoint(best.to_state())  # survives a racing pause (the state is saved with the run)
    assert again.step == 1 and again.score == 0.5


def test_forgetting_is_the_worst_controls_loss_averaged_over_seeds():
    runs = [{"control": {"shapes": {"score": 0.80}, "other": {"score": 0.70}}},
            {"control": {"shapes": {"score": 0.90}, "other": {"score": 0.75}}}]
    assert _forgetting(runs, {"shapes": 0.90, "other": 0.80}) == pytest.approx((0.10 + 0.05) / 2)
    assert math.isnan(_forgetting([{"control": {}}], {"shapes": 0.9}))  # unmeasured is unknown, not zero


def _cell(suite, vision, seed, score, control, base_control_items=None):
    items = lambda prefix, p: [{"id": f"{prefix}{i}", "score": float(i < p * 20)} for i in range(20)]  # noqa: E731
    return {"kind": "cell", "suite": suite, "model": "tiny-minicpmv", "data": "d", "metric": "anls", "status": "ok",
            "key": f"{vision}-{seed}", "seed": seed, "score": score, "val_score": score, "peak_mem_mib": 100.0,
            "train_samples_per_s": 10.0, "cell": {"targets": "qv", "rank": 8, "alpha": 16.0, "vision": vision},
            "train": {"lr": 1e-3, "lr_connector": 3e-4, "lr_vision": 1e-4, "lora_dropout": 0.05, "steps": 10, "batch_size": 4},
            "items": items("t", score), "val_items": items("v", score),
            "control": {"shapes": {"score": control, "data": "c", "items": items("c", control)}}}


def test_forgetting_table_gains_and_losses_against_the_base_model():
    from bench.verdict import judge

    recs = [_cell("docvqa", "frozen", s, 0.5, 0.9) for s in (0, 1)] + [_cell("docvqa", "resampler+vpm", s, 0.8, 0.6) for s in (0, 1)]
    recs.append({"kind": "base", "suite": "docvqa", "status": "ok", "score": 0.3, "val_score": 0.3, "metric": "anls",
                 "control": {"shapes": {"score": 0.9, "data": "c", "items": []}}})
    [f] = costs.forgetting(judge(recs)["docvqa"], recs)
    rows = f.frame.set_index("cell")
    assert rows.loc["qv-r8-a16-frozen", "forgetting"] == pytest.approx(0.0)
    assert rows.loc["qv-r8-a16-resampler+vpm", "forgetting"] == pytest.approx(0.3)
    assert rows.loc["qv-r8-a16-resampler+vpm", "gain"] == pytest.approx(0.5)
    assert rows.pareto.all()  # one gains more, the other forgets less: both on the front
    claim = next(x for x in f.findings if x.claim.b == "frozen")
    assert claim.comparison.diff == pytest.approx(-0.3) and claim.comparison.verdict == "worse"


def test_max_forgetting_leaves_out_configurations_that_forget_more():
    recs = [_cell("docvqa", "frozen", 0, 0.5, 0.88), _cell("docvqa", "resampler+vpm", 0, 0.8, 0.6),
            {"kind": "base", "suite": "docvqa", "model": "tiny-minicpmv", "data": "d", "status": "ok", "score": 0.3,
             "val_score": 0.3, "metric": "anls", "control": {"shapes": {"score": 0.9, "data": "c", "items": []}}}]
    evidence, _ = build_evidence(recs, "tiny-minicpmv")
    table = _feasible(evidence, None, None, max_forgetting=0.05)
    assert list(table.vision) == ["frozen"]
    assert set(_feasible(evidence, None, None).vision) == {"frozen", "resampler+vpm"}


def test_train_items_factor_control_scores_and_early_stopping_end_to_end(tmp_path):
    out = tmp_path / "costs"
    matrix = ["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler+vpm",
              "--seeds", "0", "--steps", "4", "--train-items", "48,96", "--early-stopping"]
    result = run_cli(*matrix, "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (out / "records").iterdir()} == {"docvqa@n48", "docvqa@n96"}
    df = pd.read_csv(out / "results.csv")
    cells = df[df.kind == "cell"]
    assert sorted(set(cells.train_items)) == [48, 96] and len(cells) == 4
    assert set(df.control_suite) == {"shapes"} and cells.control_score.notna().all()
    assert ((cells.forgetting - (cells.base_control_score - cells.control_score)).abs() < 1e-5).all()  # CSV keeps 6 digits
    assert cells.stopped_at.between(1, 4).all()
    recs = [read_record(p) for p in record_files(out / "records")]
    for r in (r for r in recs if r["kind"] == "cell"):
        assert [s for s, _ in r["val_curve"]] == [1, 2, 3, 4]  # 10/20/30/50/75% of 4 steps, rounded, and the end
        assert r["val_score"] == max(v for _, v in r["val_curve"])  # the best checkpoint is the one scored
        assert len(r["control"]["shapes"]["items"]) == 48  # the control follows --test-items when fewer
    md = (out / "results.md").read_text()
    assert "Gain against forgetting (control: shapes" in md and "docvqa: training-set size" in md
    assert "Costs of tuning: findings" in md and "tuning the vision encoder forgets" in md
    assert list(out.glob("forgetting-docvqa-n48-shapes.png"))
    csv = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    again = run_cli(*matrix, "--report-only", "--out", str(out))  # tables from the records, nothing trained
    assert again.returncode == 0 and "train qv" not in again.stdout, again.stderr[-2000:]
    assert (out / "results.csv").read_text() == csv
    empty = run_cli(*matrix, "--report-only", "--out", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "holds no finished run" in empty.stderr


@pytest.mark.parametrize("flags, message", [
    (["--control", "nosuch"], "neither a suite"),
    (["--control", "none,shapes"], "give it alone"),
    (["--train-items", "250,0"], "--train-items"),
    (["--train-items", "250,1000", "--search", "optuna"], "one data regime"),
])
def test_cost_flags_refuse_nonsense_in_one_line(flags, message):
    from bench.cli import parser
    from bench.spec import from_args

    try:
        args = parser().parse_args(["--suite", "docvqa", "--preset", "smoke", *flags])
    except SystemExit:  # argparse's type check: the message is on stderr, one line (tests/test_numeric_flags.py)
        assert message == "--train-items"
        return
    with pytest.raises(BenchError, match=message):
        from_args(args)
