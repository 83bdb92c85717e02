"""How much of a matrix's training budget the Optuna search needs to find a cell as good as the matrix best.

    python -m bench.perf.search_efficiency --suite docvqa --matrix results/docvqa \\
        --noise results/docvqa-seeds --sampler-seeds 0,1,2 --out results/search-efficiency

Reads the matrix's records (its best score and total training steps) and the seed-noise records
(the spread over seeds of the matrix best's vision policy), runs the single-objective search with
median pruning under a step budget (35% of the matrix's steps by default) once per sampler seed,
and writes ``summary.md`` / ``summary.csv``: the search's best per seed, the steps it used, and
whether it landed within max(seed noise, 1 point) of the matrix best.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench.machine import one_line
from bench.store import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]


def _records(folder: Path, suite: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((folder / "records" / suite).glob("*.json"))]


def matrix_summary(folder: Path, suite: str) -> dict:
    cells = [r for r in _records(folder, suite) if r.get("kind") == "cell" and r.get("status") == "ok"]
    if not cells:
        raise SystemExit(f"error: no finished matrix runs in {folder}/records/{suite}; run the matrix first")
    best = max(cells, key=lambda r: r["score"])
    return {"best_score": best["score"], "best_cell": best["cell"], "steps": sum(r["train"]["steps"] for r in cells),
            "cells": len(cells)}


def trials_machine(out: Path, suite: str) -> dict:
    for run in sorted(out.glob("sampler-seed-*")):
        for r in _records(run, suite):
            if "machine" in r:
                return r["machine"]
    raise SystemExit(f"error: no records under {out}")


def seed_noise(folder: Path, suite: str, vision: str) -> float:
    """Standard deviation over seeds of the best vision policy's cells (0 if fewer than two seeds)."""
    cells = [r for r in _records(folder, suite) if r.get("kind") == "cell" and r.get("status") == "ok"
             and r["cell"]["vision"] == vision]
    by_cell: dict[str, list[float]] = {}
    for r in cells:
        by_cell.setdefault(json.dumps(r["cell"], sort_keys=True), []).append(r["score"])
    spreads = [pd.Series(v).std() for v in by_cell.values() if len(v) > 1]
    return float(max(spreads)) if spreads else 0.0


def search(suite: str, seed: int, budget: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "run_bench.py"), "--suite", suite, "--search", "optuna", "--objectives", "score",
           "--trials", "1000", "--step-budget", str(budget), "--sampler-seed", str(seed), "--out", str(out), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    trials = [r for r in _records(out, suite) if r.get("kind") == "cell"]
    done = [r for r in trials if r["status"] == "ok"]
    best = max(done, key=lambda r: r["score"]) if done else None
    return {"sampler_seed": seed, "wall_min": round(wall / 60, 1), "trials": len(trials), "pruned": sum(r["status"] == "pruned" for r in trials),
            "steps_used": sum(r.get("steps_trained") or 0 for r in trials), "search_best": best["score"] if best else None,
            "search_best_cell": f"{best['cell']['targets']}-r{best['cell']['rank']}-{best['cell']['vision']} lr {best['train']['lr']:.1e}" if best else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="docvqa")
    p.add_argument("--matrix", type=Path, default=Path("results/docvqa"))
    p.add_argument("--noise", type=Path, default=Path("results/docvqa-seeds"))
    p.add_argument("--sampler-seeds", default="0,1,2")
    p.add_argument("--fraction", type=float, default=0.35, help="step budget as a fraction of the matrix's steps")
    p.add_argument("--out", type=Path, default=Path("results/search-efficiency"))
    args, extra = p.parse_known_args(argv)
    matrix = matrix_summary(args.matrix, args.suite)
    noise = seed_noise(args.noise, args.suite, matrix["best_cell"]["vision"])
    tolerance = max(noise, 0.01)
    budget = int(matrix["steps"] * args.fraction)
    rows = []
    for seed in [int(s) for s in args.sampler_seeds.split(",")]:
        row = search(args.suite, seed, budget, args.out / f"sampler-seed-{seed}", extra)
        row["within_noise"] = row["search_best"] is not None and row["search_best"] >= matrix["best_score"] - tolerance
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write_text(args.out / "summary.csv", table.to_csv(index=False, float_format="%.4g"))
    cell = matrix["best_cell"]
    text = "\n".join([
        "# Search efficiency", "",
        f"Command: `python -m bench.perf.search_efficiency {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        f"Matrix ({args.matrix}): {matrix['cells']} cells, {matrix['steps']} training steps; best "
        f"`{cell['targets']}-r{cell['rank']}-{cell['vision']}` {matrix['best_score']:.3f}.",
        f"Seed noise of the best vision policy ({args.noise}): sd {noise:.3f}; tolerance max(noise, 0.01) = {tolerance:.3f}.",
        f"Machine: {one_line(trials_machine(args.out, args.suite))}; versions as in each seed's results.md.",
        f"Search: TPE, single objective (score), median pruning, step budget {budget} ({args.fraction:.0%} of the matrix).", "",
        table.to_markdown(index=False, floatfmt=".3f"), "",
        f"Within tolerance: {int(table.within_noise.sum())} of {len(table)} sampler seeds; "
        f"steps used {table.steps_used.min()}-{table.steps_used.max()} of {matrix['steps']} "
        f"({table.steps_used.max() / matrix['steps']:.0%} at most).", "",
    ])
    atomic_write_text(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
