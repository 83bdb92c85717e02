"""Reports are pure functions of records: check the tables against hand-made records."""

import io

from rich.console import Console

from bench import report
from bench import verdict as verdicts

MACHINE = {"processor": "x86_64", "torch_threads": 2, "cpu_count": 2, "platform": "Linux"}


def items(scores, prefix="t"):
    return [{"id": f"{prefix}{i}", "prediction": "", "score": float(s)} for i, s in enumerate(scores)]


def record(targets, vision, seed, score, rank=8, lr=1e-3, val=None, n=40, suite="docvqa"):
    """A run whose per-item scores average exactly ``score`` (test) and ``val`` (validation)."""
    val = score if val is None else val
    ones = round(score * n)
    return {
        "suite": suite, "model": "tiny", "kind": "cell", "metric": "anls", "status": "ok",
        "cell": {"targets": targets, "rank": rank, "alpha": 2.0 * rank, "vision": vision},
        "train": {"steps": 10, "batch_size": 4, "lr": lr, "lr_connector": lr / 10, "lr_vision": lr / 10, "lora_dropout": 0.05},
        "seed": seed, "score": ones / n, "val_score": round(val * n) / n, "trainable_params": 1000, "peak_mem_mib": 900.0,
        "train_samples_per_s": 100.0, "eval_items_per_s": 300.0, "losses": [1.0, 0.5], "plateaued": True,
        "items": items([1] * ones + [0] * (n - ones)), "val_items": items([1] * round(val * n) + [0] * (n - round(val * n)), "v"),
        "key": f"{targets}-{vision}-{lr}-{seed}-{suite}", "machine": MACHINE, "versions": {"torch": "x"},
    }


BASE = {**record("qv", "frozen", None, 0.1), "kind": "base", "cell": None, "train": None, "key": "base"}
RECORDS = [
    BASE,
    record("qv", "frozen", 0, 0.30), record("qv", "frozen", 1, 0.35), record("qv", "frozen", 2, 0.325),
    record("all", "resampler", 0, 0.70), record("all", "resampler", 1, 0.75), record("all", "resampler", 2, 0.725),
    # the same cells at a worse rate: never reported, only seen in the sweep
    record("all", "resampler", 0, 0.60, lr=1e-2), record("all", "resampler", 1, 0.60, lr=1e-2),
    record("all", "resampler", 2, 0.60, lr=1e-2),
]


def test_csv_rows_carry_validation_rates_and_the_chosen_flag():
    df = report.frame(RECORDS)
    for column in ("val_score", "score", "lr", "lr_connector", "lr_vision", "chosen", "plateaued"):
        assert column in df.columns
    chosen = df[(df.kind == "cell") & df.chosen]
    assert set(chosen.lr) == {1e-3} and len(chosen) == 6


def test_markdown_names_best_cell_set_base_and_effects():
    text = report.markdown(RECORDS, "python run_bench.py --suite docvqa", {"steps": 5})
    assert "**Best cell (validation):** `all-r8-a16-resampler` at lr 0.001" in text
    assert "test 0.725" in text
    assert "**Confidence set of the best (95%, validation):** 1 of 2 cells" in text
    assert "**Base model (no tuning):** test anls 0.100" in text
    assert "**vision policy**" in text and "**target set**" in text
    assert "Runs: 9 ok" in text
    assert "### Learning rate sweep" in text and "(edge)" in text  # best rate 1e-3 is the low end of {1e-3, 1e-2}
    assert "seed noise is not measured" not in text


def test_terminal_table_fits_80_columns():
    buffer = io.StringIO()
    report.terminal_table(verdicts.judge(RECORDS), RECORDS, Console(file=buffer, width=80))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("0.725" in line and "resampler" in line for line in lines)
    assert "…" not in buffer.getvalue()  # nothing truncated


def test_one_seed_says_seed_noise_is_unmeasured_and_claims_no_equivalence():
    one = [BASE, record("all", "resampler", 0, 0.70), record("qv", "resampler", 0, 0.70)]
    text = report.markdown(one, "cmd", {})
    assert "seed noise is not measured" in text
    rows = [line for line in text.splitlines() if line.startswith("| qv-r8")]
    assert rows and "not shown different" in rows[0] and "equivalent" not in rows[0]  # identical scores, one seed


def test_heatmap_is_written_and_linked(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    records = RECORDS + [record("all", "frozen", 0, 0.5), record("qv", "resampler", 0, 0.6)]
    train = SimpleNamespace(steps=1, batch_size=1, lr=1e-3, lr_connector=1e-4, lr_vision=1e-4, lora_dropout=0.0)
    spec = SimpleNamespace(out=tmp_path, alpha_rule="2r", train=train, settings=[train], margin=0.01, search=None, suites=("docvqa",))
    report.write_all(records, spec, Console(file=io.StringIO()))
    assert "](heatmap-docvqa.png)" in (tmp_path / "results.md").read_text()
    assert 'src="data:image/png;base64,' in (tmp_path / "results.html").read_text()  # and embedded in the page
    with Image.open(tmp_path / "heatmap-docvqa.png") as image:
        assert image.width > 100 and image.height > 100


def test_cross_suite_table_has_base_row():
    other = [record("qv", "frozen", 0, 0.15, suite="shapes"), record("all", "resampler", 0, 0.35, suite="shapes"),
             {**record("qv", "frozen", None, 0.05, suite="shapes"), "kind": "base", "cell": None, "train": None, "key": "base-s"}]
    records = RECORDS + other
    judged = verdicts.judge(records)
    table = report.cross_suite(judged, verdicts.base_scores(records))
    assert list(table.columns) == ["docvqa", "shapes"]
    assert table.index[0] == "all-r8-a16-resampler" and table.index[-1] == "(base model)"
    assert abs(table.loc["(base model)", "shapes"] - 0.05) < 1e-9
    assert "## Across suites" in report.markdown(records, "cmd", {})


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



def test_importance_does_not_depend_on_trial_order():
    """Workers finish runs in any order; the importance table must be a function of the runs, the same
    as one process running the matrix writes (fANOVA's forest reads its rows in trial order)."""
    import random

    import optuna

    from bench.report import importance_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"targets": optuna.distributions.CategoricalDistribution(["qk", "qv", "all"]),
             "vision": optuna.distributions.CategoricalDistribution(["frozen", "resampler"]),
             "lr": optuna.distributions.CategoricalDistribution([0.002, 0.005, 0.01])}
    rng = random.Random(0)
    runs = [({"targets": t, "vision": v, "lr": lr}, f"{t}-{v}-{lr}", rng.random(), 100 * rng.random())
            for t in ("qk", "qv", "all") for v in ("frozen", "resampler") for lr in (0.002, 0.005, 0.01)]
    tables = []
    for order in (runs, runs[::-1], sorted(runs, key=lambda r: r[2])):
        study = optuna.create_study(directions=["maximize", "minimize"])
        for params, key, score, memory in order:
            study.add_trial(optuna.trial.create_trial(params=params, distributions=space, values=[score, memory],
                                                      user_attrs={"run": key}))
        tables.append(importance_table(study, ("score", "memory")))
    assert "score (fANOVA)" in tables[0] and "Pareto rank" in tables[0]
    assert tables[1] == tables[0] and tables[2] == tables[0]

    single = optuna.create_study(direction="maximize")  # one objective, ten trials or more: PED-ANOVA on the score
    for params, key, score, _ in runs:
        single.add_trial(optuna.trial.create_trial(params=params, distributions=space, values=[score], user_attrs={"run": key}))
    assert "score (PED-ANOVA, top 10%)" in importance_table(single, ("score",))
