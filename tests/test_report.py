"""Reports are pure functions of records: check the tables against hand-made records."""

import io
import math

from rich.console import Console

from bench import report

MACHINE = {"processor": "x86_64", "torch_threads": 2, "cpu_count": 2, "platform": "Linux"}


def record(targets, vision, seed, score, rank=8):
    return {
        "suite": "docvqa", "model": "tiny", "kind": "cell", "metric": "anls", "status": "ok",
        "cell": {"targets": targets, "rank": rank, "alpha": 2.0 * rank, "vision": vision},
        "seed": seed, "score": score, "trainable_params": 1000, "peak_mem_mib": 900.0,
        "train_samples_per_s": 100.0, "eval_items_per_s": 300.0, "losses": [1.0, 0.5],
        "key": f"{targets}-{vision}-{seed}", "machine": MACHINE, "versions": {"torch": "x"},
    }


RECORDS = [
    {**record("qv", "frozen", None, 0.1), "kind": "base", "cell": None, "key": "base"},
    record("qv", "frozen", 0, 0.30), record("qv", "frozen", 1, 0.34), record("qv", "frozen", 2, 0.32),
    record("all", "resampler", 0, 0.70), record("all", "resampler", 1, 0.74), record("all", "resampler", 2, 0.72),
]


def test_cell_table_means_and_t_intervals():
    cells = report.cell_table(report.frame(RECORDS))
    best = cells.iloc[0]
    assert (best.target_set, best.vision_policy, best.seeds) == ("all", "resampler", 3)
    assert math.isclose(best.score, 0.72)
    # t(0.975, 2) = 4.303; sd = 0.02; half-width = 4.303 * 0.02 / sqrt(3)
    assert math.isclose(best.ci_high - best.score, 4.3027 * 0.02 / math.sqrt(3), rel_tol=1e-3)


def test_markdown_names_best_cell_base_and_effects():
    text = report.markdown(report.frame(RECORDS), RECORDS, "python run_bench.py --suite docvqa", {"steps": 5})
    assert "**Best cell:** `all-r8-a16-resampler` with anls 0.720" in text
    assert "**Base model (no tuning):** anls 0.100" in text
    assert "**vision policy**" in text and "**target set**" in text
    assert "Runs: 6 ok" in text


def test_terminal_table_fits_80_columns():
    buffer = io.StringIO()
    report.terminal_table(report.frame(RECORDS), Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("0.720" in line and "resampler" in line and "0.050" in line for line in lines)
    assert "…" not in buffer.getvalue()  # nothing truncated


def with_items(rec, scores):
    return {**rec, "items": [{"id": f"t{i}", "prediction": "", "score": s} for i, s in enumerate(scores)]}


def test_paired_comparison_finds_real_differences_and_not_noise():
    import numpy as np
    import pandas as pd

    from bench import stats

    rng = np.random.default_rng(0)
    a = pd.Series(rng.integers(0, 2, 400).astype(float))
    better = a.copy()
    better[a == 0] = rng.integers(0, 2, int((a == 0).sum())) * (rng.random(int((a == 0).sum())) < 0.5)
    same = stats.paired_comparison(a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    up = stats.paired_comparison(a, better)
    assert up["diff"] > 0 and up["low"] > 0 and up["p_value"] < 0.01
    # A relabelled copy of the same scores differs only by item noise around zero.
    shuffled = pd.Series(rng.permutation(a.to_numpy()))
    noise = stats.paired_comparison(a, shuffled)
    assert noise["low"] <= 0 <= noise["high"]


def test_markdown_marks_cells_within_noise_of_best():
    rng = __import__("numpy").random.default_rng(1)
    best = (rng.random(300) < 0.7).astype(float)
    close = best.copy()
    close[:3] = 1 - close[:3]  # three items flipped: indistinguishable
    far = (rng.random(300) < 0.3).astype(float)
    records = [RECORDS[0],
               with_items(record("all", "resampler", 0, best.mean()), best),
               with_items(record("qv", "resampler", 0, close.mean()), close),
               with_items(record("qk", "frozen", 0, far.mean()), far)]
    text = report.markdown(report.frame(records), records, "cmd", {})
    cells = text[text.index("### Cells"):text.index("### Main effects")]
    rows = {line.split("|")[1].strip(): line for line in cells.splitlines() if line.startswith("| q")}
    assert "≈ best" in rows["qv"]
    assert "≈ best" not in rows["qk"] and "p=0.00" in rows["qk"]
    assert "**target set x vision policy**" in text and "**rank x target set**" not in text


def test_heatmap_is_written_and_linked(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    records = RECORDS + [record("all", "frozen", 0, 0.5), record("qv", "resampler", 0, 0.6)]
    spec = SimpleNamespace(out=tmp_path, alpha_rule="2r", train=SimpleNamespace(steps=1, batch_size=1, lr=1e-3, lora_dropout=0.0))
    report.write_all(records, spec, Console(file=io.StringIO()))
    assert "](heatmap-docvqa.png)" in (tmp_path / "results.md").read_text()
    with Image.open(tmp_path / "heatmap-docvqa.png") as image:
        assert image.width > 100 and image.height > 100


def test_cross_suite_table_has_base_row():
    other = [{**r, "suite": "shapes", "metric": "vqa_accuracy", "score": (r["score"] or 0) / 2, "key": r["key"] + "-s"} for r in RECORDS]
    records = RECORDS + other
    table = report.cross_suite(report.frame(records))
    assert list(table.columns) == ["docvqa", "shapes"]
    assert table.index[0] == "all-r8-a16-resampler" and table.index[-1] == "(base model)"
    assert abs(table.loc["(base model)", "shapes"] - 0.05) < 1e-9
    assert "## Across suites" in report.markdown(report.frame(records), records, "cmd", {})


def test_importance_with_scores_that_never_vary():
    """A matrix where every cell scores the same (a tiny random model) must still write its report."""
    import optuna

    from bench.report import importance_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i in range(12):
        trial = study.ask({"targets": optuna.distributions.CategoricalDistribution(["qk", "qv", "all"])})
        trial.set_user_attr("run", f"r{i}")
        study.tell(trial, [0.0, 100.0 + i])
    text = importance_table(study, ("score", "memory"))
    assert "score did not vary" in text and "memory (fANOVA)" in text
    single = optuna.create_study(direction="maximize")
    for _ in range(12):
        trial = single.ask({"targets": optuna.distributions.CategoricalDistribution(["qk", "qv", "all"])})
        trial.set_user_attr("run", "r")
        single.tell(trial, 0.0)
    assert "did not vary" in importance_table(single, ("score",))
