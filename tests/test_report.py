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
