"""How much of the sound protocol's training budget the Optuna search needs to find a cell as good as its best.

    python -m bench.perf.search_efficiency --suite docvqa --matrix results/docvqa \\
        --sampler-seeds 0,1,2 --out results/search-efficiency

Reads the matrix's records (cells x learning rates x seeds: its validation-chosen best cell, that
cell's test score with its 95% interval over seeds and items, and the total training steps), runs
the single-objective search (TPE on validation, median pruning on validation checkpoints) under a
step budget (10% of the matrix's steps by default: about one run per cell) once per sampler seed,
and writes ``summary.md`` / ``summary.csv``: per seed the search's validation-chosen best, its test
score, the steps used, and whether that test score reaches the matrix best's interval.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench.machine import one_line
from bench.store import atomic_write_text, read_record, record_files

ROOT = Path(__file__).resolve().parents[2]


def _records(folder: Path, suite: str) -> list[dict]:
    return [r for r in map(read_record, record_files(folder / "records" / suite, "")) if r is not None]


def matrix_summary(folder: Path, suite: str) -> dict:
    from bench.verdict import cell_name, judge

    runs = [r for r in _records(folder, suite) if r.get("kind") == "cell" and r.get("status") == "ok"]
    if not runs:
        raise SystemExit(f"error: no finished matrix runs in {folder}/records/{suite}; run the matrix first")
    v = judge(runs)[suite]
    _, low, high = v.test.interval(v.best.key)
    return {"best_cell": cell_name(v.best.key), "best_lr": v.best.lr, "best_val": v.best.val, "best_test": v.best.test,
            "best_low": low, "best_high": high, "best_set": len(v.best_set), "cells": len(v.cells), "runs": len(runs),
            "steps": sum(r["train"]["steps"] for r in runs)}


def trials_machine(out: Path, suite: str) -> dict:
    for run in sorted(out.glob("sampler-seed-*")):
        for r in _records(run, suite):
            if "machine" in r:
                return r["machine"]
    raise SystemExit(f"error: no records under {out}")


def search(suite: str, seed: int, budget: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "run_bench.py"), "--suite", suite, "--search", "optuna", "--objectives", "score",
           "--trials", "1000", "--step-budget", str(budget), "--sampler-seed", str(seed), "--out", str(out), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    trials = [r for r in _records(out, suite) if r.get("kind") == "cell"]
    done = [r for r in trials if r["status"] == "ok"]
    best = max(done, key=lambda r: r["val_score"]) if done else None  # chosen on validation, as the matrix's best
    return {"sampler_seed": seed, "wall_min": round(wall / 60, 1), "trials": len(trials), "pruned": sum(r["status"] == "pruned" for r in trials),
            "steps_used": sum(r.get("steps_trained") or 0 for r in trials), "search_best_val": best["val_score"] if best else None,
            "search_best_test": best["score"] if best else None,
            "search_best_cell": f"{best['cell']['targets']}-r{best['cell']['rank']}-{best['cell']['vision']} lr {best['train']['lr']:.1e}" if best else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="docvqa")
    p.add_argument("--matrix", type=Path, default=Path("results/docvqa"))
    p.add_argument("--sampler-seeds", default="0,1,2")
    p.add_argument("--fraction", type=float, default=0.1, help="step budget as a fraction of the matrix's steps")
    p.add_argument("--out", type=Path, default=Path("results/search-efficiency"))
    args, extra = p.parse_known_args(argv)
    matrix = matrix_summary(args.matrix, args.suite)
    budget = int(matrix["steps"] * args.fraction)
    rows = []
    for seed in [int(s) for s in args.sampler_seeds.split(",")]:
        row = search(args.suite, seed, budget, args.out / f"sampler-seed-{seed}", extra)
        row["reaches_matrix_best"] = row["search_best_test"] is not None and row["search_best_test"] >= matrix["best_low"]
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(args.out / "summary.csv", table.to_csv(index=False, float_format="%.4g"))
    text = "\n".join([
        "# Search efficiency", "",
        f"Command: `python -m bench.perf.search_efficiency {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"Matrix ({args.matrix}): {matrix['cells']} cells, {matrix['runs']} runs (learning rates x seeds), {matrix['steps']} "
        f"training steps; best on validation `{matrix['best_cell']}` at lr {matrix['best_lr']:.2g}: test "
        f"{matrix['best_test']:.3f} [{matrix['best_low']:.3f}, {matrix['best_high']:.3f}] (95%, seeds and items); "
        f"{matrix['best_set']} cell(s) in its confidence set of the best.",
        f"Machine: {one_line(trials_machine(args.out, args.suite))}; versions as in each seed's results.md.",
        f"Search: TPE on the validation score (one seed per trial), median pruning on validation checkpoints, step budget "
        f"{budget} ({args.fraction:.0%} of the matrix). A seed succeeds when its validation-chosen best trial's test score "
        f"reaches the matrix best's interval (>= {matrix['best_low']:.3f}); the search's own best is one seed, so its test "
        "score carries that seed's noise.", "",
        table.to_markdown(index=False, floatfmt=".3f"), "",
        f"Reaches the matrix best: {int(table.reaches_matrix_best.sum())} of {len(table)} sampler seeds; "
        f"steps used {table.steps_used.min()}-{table.steps_used.max()} of {matrix['steps']} "
        f"({table.steps_used.max() / matrix['steps']:.0%} at most).", "",
    ])
    atomic_write_text(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
