"""The recommender: gains paired over frozen, the calibrated decision, budgets, and the CLI end to end."""

import base64
import itertools
import json
import math

import numpy as np
import pytest

from bench.errors import BenchError
from bench.calibration import Calibration, calibrate, regret_table, validate
from bench.recommend import _axes_text, _regret_verdict, build_evidence, choose
from bench.similarity import Comparison
from conftest import run_cli


def record(suite, targets, vision, score, seed=0, mem=1000.0, speed=100.0, items=None, model="tiny-minicpmv"):
    """A run whose validation and test agree (per-item scores ``items`` on both)."""
    scored = lambda prefix: [{"id": f"{prefix}{i}", "score": float(s)} for i, s in enumerate(items)] if items is not None else None  # noqa: E731
    return {"kind": "cell", "suite": suite, "model": model, "data": f"{suite}-data", "metric": "anls", "status": "ok",
            "key": f"{targets}-{vision}-{seed}", "seed": seed, "score": score, "val_score": score, "peak_mem_mib": mem,
            "train_samples_per_s": speed, "cell": {"targets": targets, "rank": 8, "alpha": 16.0, "vision": vision},
            "train": {"lr": 1e-3, "lr_connector": 1e-4, "lr_vision": 1e-4, "lora_dropout": 0.05, "steps": 10, "batch_size": 4},
            "items": scored("t"), "val_items": scored("v")}


def distance(d):
    return Comparison(mmd2=d, low=d - 0.01, high=d + 0.01, p_value=0.5 if d == 0 else 0.001, kid=0, auc=0.5, early_mmd2=d,
                      n_data=100, n_reference=100)


def suite_records(suite, scores, mems=None, n_items=60, seed=0):
    """scores: {(targets, vision): mean score}; per-item scores are 0/1 with that mean (paired across cells)."""
    rng = np.random.default_rng(seed)
    u = rng.random(n_items)
    mems = mems or {}
    return [record(suite, t, v, s, mem=mems.get(v, 1000.0), items=(u < s).astype(float)) for (t, v), s in scores.items()]


def test_gains_are_paired_over_frozen_on_validation():
    recs = [record("a", "qk", "frozen", 0.2, seed=0), record("a", "qk", "frozen", 0.4, seed=1),
            record("a", "qk", "resampler", 0.5, seed=0), record("a", "qk", "resampler", 0.6, seed=1),
            record("a", "all", "frozen", 0.1), record("a", "all", "resampler", 0.9),
            record("a", "qv", "resampler", 0.0)]  # no frozen partner: not in the gain
    (ev,), _ = build_evidence(recs, "tiny-minicpmv")
    assert ev.gains["frozen"] == 0
    assert ev.gains["resampler"] == pytest.approx(np.mean([0.55 - 0.3, 0.8]))  # per matched cell, seeds averaged
    assert len(ev.configs) == 5  # qk/frozen and qk/resampler average their two seeds


def test_choices_look_at_validation_and_records_without_it_are_set_aside():
    recs = [record("a", "qk", "frozen", 0.2), record("a", "qk", "resampler", 0.5)]
    recs[1] = {**recs[1], "score": 0.9, "val_score": 0.1}  # best on test, worst on validation
    old = {**record("a", "all", "resampler", 0.99), "key": "old"}
    del old["val_score"]
    (ev,), notes = build_evidence(recs + [old], "tiny-minicpmv")
    assert ev.best.vision == "frozen" and ev.gains["resampler"] == pytest.approx(-0.1)
    assert any("before the validation split" in n for n in notes) and len(ev.configs) == 2


def test_other_models_records_are_refused():
    with pytest.raises(BenchError, match="not on --model tiny-minicpmv"):
        build_evidence([record("a", "qk", "frozen", 0.1, model="other")], "tiny-minicpmv")


def test_decision_is_the_cheapest_policy_within_one_point_of_the_best():
    cal = Calibration(points=[("near", (0.1, 0.0), {"frozen": 0, "resampler": 0.005, "resampler+vpm": -0.05}),
                              ("far", (0.5, 0.0), {"frozen": 0, "resampler": 0.2, "resampler+vpm": 0.4})],
                      cost={"frozen": (100, 50), "resampler": (110, 45), "resampler+vpm": (150, 30)}, bandwidth=(0.05, math.inf))
    assert cal.decide(0.0) == "frozen"
    assert cal.decide(0.1) == "frozen"  # resampler gains half a point: not worth its memory
    assert cal.decide(0.5) == "resampler+vpm"
    assert cal.decide(0.9) == "resampler+vpm"  # the farthest suite carries the prediction beyond it
    assert cal.decide(0.5, allowed={"frozen", "resampler"}) == "resampler"
    assert 0.1 < cal.threshold("resampler") < 0.5 and 0.1 < cal.threshold("resampler+vpm") < 0.5
    assert cal.weights(0.3) == pytest.approx({"near": 0.5, "far": 0.5})
    assert cal.weights(0.1)["near"] > 0.99
    assert cal.axes() == ["visual"]
    wide = Calibration(cal.points, cal.cost, bandwidth=(math.inf, math.inf))  # no axis: the mean over suites everywhere
    assert wide.gain("resampler+vpm", 0.0) == wide.gain("resampler+vpm", 0.9) == pytest.approx(0.175)


def graded_evidence(gain_of, n_suites=8, task=None, seed=0):
    """``n_suites`` suites at visual distances 0..0.8 (task distances from ``task``, when given), where each
    policy's true score is 0.5 + gain_of(policy, visual, task)."""
    recs, where = [], {}
    mems = {"frozen": 900.0, "resampler": 950.0, "resampler+vpm": 1200.0}
    rng = np.random.default_rng(seed)
    for i in range(n_suites):
        v = 0.8 * i / (n_suites - 1)
        t = task(i) if task else 0.0
        name = f"s{i}"
        where[name] = (v, t)
        scores = {(targets, p): 0.5 + gain_of(p, v, t) + (0.01 if targets == "all" else 0)
                  for targets in ("qk", "all") for p in mems}
        recs += suite_records(name, scores, mems, n_items=400, seed=int(rng.integers(1 << 30)))
    evidence, _ = build_evidence(recs, "tiny-minicpmv")
    for ev in evidence:
        v, t = where[ev.suite]
        ev.distance, ev.task_distance = distance(v), distance(t)
    return evidence


def visual_rule(p, v, t):
    """Tuning the vision side hurts near pretraining and pays far from it."""
    return {"frozen": 0.0, "resampler": 0.3 * v - 0.04, "resampler+vpm": 0.5 * v - 0.1}[p]


def test_the_recommender_beats_every_constant_rule_where_the_best_policy_depends_on_distance():
    evidence = graded_evidence(visual_rule)
    rows = validate(evidence)
    table = regret_table(rows)
    loso = table[table.scheme == "leave-one-suite-out"].set_index("rule")
    constant = loso[loso.index.str.startswith("always ")]
    assert len(constant) == 3
    assert (constant["mean regret"] > loso.loc["recommender", "mean regret"]).all(), loso
    assert "does not beat" not in _regret_verdict(table)
    assert calibrate(evidence).axes() == ["visual"]  # the task coordinate (0 everywhere) says nothing


def test_the_axis_that_decides_is_found():
    """The best policy depends on the task distance only; the visual coordinate is noise."""
    noise = np.random.default_rng(5).permutation(8) / 10

    def task_rule(p, v, t):
        return visual_rule(p, t, v)  # the same shape of rule, on the task axis

    evidence = graded_evidence(lambda p, v, t: task_rule(p, v, t), task=lambda i: 0.8 * i / 7)
    for ev, x in zip(evidence, noise):
        ev.distance = distance(float(x))  # shuffle the visual coordinate: unrelated to the gains
    cal = calibrate(evidence)
    assert "task" in cal.axes()
    assert cal.decide((0.0, 0.8)) == "resampler+vpm" and cal.decide((0.8, 0.0)) == "frozen"


def test_where_distance_does_not_matter_it_says_so():
    evidence = graded_evidence(lambda p, v, t: {"frozen": 0.0, "resampler": 0.05, "resampler+vpm": 0.1}[p])
    cal = calibrate(evidence)
    assert cal.axes() == [] and "neither" in _axes_text(cal)
    table = regret_table(validate(evidence))
    verdict = _regret_verdict(table)
    assert "does not beat every constant rule" in verdict or "not shown for every rule" in verdict, verdict
    assert "**The recommender's regret is below every constant rule's" not in verdict


def test_choice_under_a_budget():
    evidence = graded_evidence(visual_rule)
    cal = calibrate(evidence)
    far = choose(evidence, cal, (0.8, 0.0), "s7", None, None)
    assert far.config.vision == "resampler+vpm" and far.config.targets in ("qk", "all")
    capped = choose(evidence, cal, (0.8, 0.0), "s7", 1000.0, None)
    assert capped.config.vision == "resampler" and capped.config.mem_mib <= 1000
    assert choose(evidence, cal, (0.8, 0.0), "s7", 500.0, None) is None


# -------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def two_suites(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    result = run_cli("--suite", "shapes,docvqa", "--preset", "smoke", "--vision", "frozen,resampler", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def my_images(tmp_path_factory):
    from suites.chartqa.generate import generate

    folder = tmp_path_factory.mktemp("mine") / "charts"
    folder.mkdir()
    for i, item in enumerate(itertools.islice(generate(40, seed=11), 40)):
        item["image"].save(folder / f"{i:03d}.png")
    return folder


def test_recommend_end_to_end(two_suites, my_images, tmp_path):
    from bench.store import read_record, record_files

    from bench import memory_figures

    recs = [read_record(p) for p in record_files(two_suites / "records")]
    cells = [r for r in recs if r["kind"] == "cell"]
    figure = memory_figures.compared(cells)
    assert figure.kind == memory_figures.CPU_TRAIN and figure.note is None  # fresh CPU records: comparable per run
    budget = sorted(figure.mib(r) for r in cells)[-1] + 1
    out = tmp_path / "rec"
    result = run_cli("--recommend", "--data", str(my_images), "--results", str(two_suites), "--samples", "40",
                     "--memory-budget", f"{budget:.0f}MiB", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    md = (out / "recommendation.md").read_text()
    summary = json.loads((out / "recommendation.json").read_text())
    chosen = summary["recommended"]
    measured = [r for r in cells if (r["cell"]["targets"], r["cell"]["rank"], r["cell"]["vision"]) ==
                (chosen["targets"], chosen["rank"], chosen["vision"])]
    assert measured, "the recommendation names a cell that was benchmarked"
    assert max(figure.mib(r) for r in measured) <= budget
    assert summary["recommended"]["measured_mib"] == pytest.approx(max(
        np.mean([figure.mib(r) for r in measured if r["data"] == data]) for data in {r["data"] for r in measured}))
    assert f"memory: {figure.label}" in md
    assert f"**Recommended: {chosen['targets']} r{chosen['rank']}" in md
    assert "## Calibration" in md and "MMD^2" in md
    assert "## Is the rule worth having" not in md  # two suites: none can be hidden and still be calibrated on
    assert "holds images without questions: its task distance is unknown" in md
    assert summary["axes"] == [] and "too few to tell" in md
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert "](calibration.png)" in md
    page = (out / "recommendation.html").read_text()
    assert base64.b64encode((out / "calibration.png").read_bytes()).decode() in page and "<h2" in page


def test_a_suite_is_never_its_own_evidence(two_suites, tmp_path):
    out = tmp_path / "rec"
    result = run_cli("--recommend", "--data", "shapes", "--results", str(two_suites), "--samples", "40", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    md = (out / "recommendation.md").read_text()
    summary = json.loads((out / "recommendation.json").read_text())
    assert "shapes's own benchmark" in md and summary["nearest_suite"] == "docvqa"
    assert "| shapes " not in md.split("## Calibration")[1]  # not a calibration point either
    assert summary["task_mmd2_from_pretraining"] is not None  # a suite has questions: both axes are measured


def test_recommend_applies_the_budget_to_estimates_on_another_model(two_suites, my_images, tmp_path):
    """--estimate-for: each configuration's peak is estimated on the user's model; the budget applies to that."""
    import hf_families

    from bench.memory_model import estimate_on
    from bench.models import get_adapter
    from bench.space import Cell

    folder = tmp_path / "qwen2_vl"
    hf_families.save("qwen2_vl", folder)
    target = get_adapter(str(folder))
    skeleton = target.skeleton()
    tokens = target.image_tokens() or 1024
    frozen = estimate_on(skeleton, target.roles, Cell("qv", 4, 8, "frozen"), 4, 256, tokens, 2).total_bytes
    resampler = estimate_on(skeleton, target.roles, Cell("qv", 4, 8, "resampler"), 4, 256, tokens, 2).total_bytes
    assert resampler > frozen
    budget_mib = (frozen + resampler) / 2 / 2**20  # frozen cells fit, resampler cells do not
    out = tmp_path / "rec"
    result = run_cli("--recommend", "--data", str(my_images), "--results", str(two_suites), "--samples", "10",
                     "--estimate-for", str(folder), "--batch-size", "4", "--seq-len", "256",
                     "--memory-budget", f"{budget_mib:.3f}MiB", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "recommendation.json").read_text())
    assert summary["recommended"]["vision"] == "frozen"
    assert summary["memory"].startswith(f"estimated on {folder} at batch 4 x 256 tokens")
    assert summary["estimated_bytes"]["total_bytes"] <= budget_mib * 2**20
    assert "estimated peak training memory on" in (out / "recommendation.md").read_text()


def test_recommend_bad_input_is_one_line(two_suites, my_images, tmp_path, capsys):
    from bench.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data", str(my_images), "--results", str(empty)], "no benchmark records"),
        (["--data", str(my_images), "--results", str(two_suites), "--memory-budget", "1MiB"], "no benchmarked configuration fits"),
        (["--data", str(empty), "--results", str(two_suites)], "holds no images"),
        (["--results", str(two_suites)], "--recommend needs --data"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert main(["--recommend", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_held_out_decisions_use_the_costs_the_real_decision_uses():
    """Under --estimate-for the policies' costs come from the user's model: the leave-one-out decisions,
    which break near-ties by cost, must use the same costs, not the benchmark model's."""
    evidence = graded_evidence(lambda p, v, t: {"frozen": 0.0, "resampler": 0.0, "resampler+vpm": 0.0}[p])
    bench_costs = validate(evidence)
    assert set(bench_costs[bench_costs.rule == "recommender"].decided) == {"frozen"}  # no gain: the cheapest policy
    flipped = {"frozen": (2000.0, 10.0), "resampler": (1000.0, 10.0), "resampler+vpm": (3000.0, 10.0)}
    user_costs = validate(evidence, cost=flipped)
    assert set(user_costs[user_costs.rule == "recommender"].decided) == {"resampler"}
