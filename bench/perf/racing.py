"""Racing against the exhaustive protocol, replayed over published exhaustive runs.

A paused-and-resumed run is the uninterrupted run, step for step (tests/test_train.py), and every
racing choice reads validation scores the exhaustive records hold, so replaying the race over them
(:func:`bench.race.replay`) gives exactly the records, steps and verdict a race would have produced on
the same machine. The verdicts are compared as the report states them: the validation-chosen best
cell, the 95% confidence set of the best, and each finding's verdict.

    python -m bench.perf --only racing          # seconds: no training
"""

from __future__ import annotations

from pathlib import Path

from bench import race, verdict
from bench.space import Cell
from bench.store import read_record, record_files

# (suite, folder of an exhaustive run's records, the command that made them)
SOURCES = [
    ("docvqa", Path("results/docvqa"), "python run_bench.py --suite docvqa --protocol exhaustive --out results/docvqa"),
    ("shapes-shift", Path("results/shapes-shift"),
     "python run_bench.py --suite shapes-shift --targets qk,qv --protocol exhaustive --out results/shapes-shift"),
]
OPPOSED = {("better", "worse"), ("worse", "better"), ("equivalent", "better"), ("equivalent", "worse"),
           ("better", "equivalent"), ("worse", "equivalent")}


def _matrix(records: list[dict]):
    cells = [r for r in records if r.get("kind") == "cell"]
    grid = sorted({Cell(r["cell"]["targets"], int(r["cell"]["rank"]), float(r["cell"]["alpha"]), r["cell"]["vision"]) for r in cells})
    lrs = sorted({float(r["train"]["lr"]) for r in cells})
    seeds = sorted({r["seed"] for r in cells})
    steps = cells[0]["train"]["steps"]
    return grid, lrs, seeds, steps


def compare(records: list[dict], min_seeds: int = race.MIN_SEEDS) -> dict:
    grid, lrs, seeds, steps = _matrix(records)
    rep = race.replay(records, grid, lrs, seeds, steps, min_seeds=min_seeds)
    bases = [r for r in records if r.get("kind") == "base"]
    (full,) = verdict.judge(records).values()
    (raced,) = verdict.judge(rep.records + bases).values()
    pairs = [(a.comparison.verdict if a.comparison else None, b.comparison.verdict if b.comparison else None)
             for a, b in zip(full.findings, raced.findings)]
    used = {r["key"] for r in rep.records}
    wall_full = sum(r.get("wall_s") or 0 for r in records if r.get("kind") == "cell")
    # a rung leg costs its share of the run's training time plus one validation; approximated by the step share
    wall_race = sum((r.get("wall_s") or 0) * (1 if r.get("status") == "ok" else r["steps_trained"] / steps)
                    for r in rep.records if r["key"] in used)
    return {
        "cells": len(grid), "lrs": len(lrs), "seeds": len(seeds), "steps": steps,
        "race_steps": rep.steps, "exhaustive_steps": rep.exhaustive_steps, "runs": rep.runs,
        "exhaustive_runs": len(grid) * len(lrs) * len(seeds),
        "best_equal": full.best.key == raced.best.key, "best": verdict.cell_name(full.best.key),
        "race_best": verdict.cell_name(raced.best.key),
        "set_equal": full.best_set == raced.best_set, "set_sizes": (len(full.best_set), len(raced.best_set)),
        "missing": sorted(verdict.cell_name(k) for k in full.best_set - raced.best_set),
        "extra": sorted(verdict.cell_name(k) for k in raced.best_set - full.best_set),
        "findings_same": sum(a == b for a, b in pairs), "findings": len(pairs),
        "opposed": sum((a, b) in OPPOSED for a, b in pairs),
        "changes": [(f.claim.name, a, b) for f, (a, b) in zip(full.findings, pairs) if a != b],
        "exits": rep.last.exits, "wall_full": wall_full, "wall_race": wall_race,
    }


def section() -> str:
    from bench import machine

    lines = ["## Racing against the exhaustive protocol (replayed)", "",
             "Command: `python -m bench.perf --only racing` (seconds; replays `bench/race.py` over the exhaustive runs' "
             "records: a paused-and-resumed run is the uninterrupted run bit for bit, and every racing choice reads "
             "validation scores those records hold, so the replay is the race those runs would have made)", ""]
    rows, sensitivity, notes = [], [], []
    for suite, folder, command in SOURCES:
        files = record_files(folder / "records", f"{suite}/")
        if not files:
            notes.append(f"- {suite}: no records under {folder}; run `{command}` first.")
            continue
        records = [r for r in map(read_record, files) if r is not None]
        first = next(r for r in records if r.get("kind") == "cell")
        c = compare(records)
        rows.append(f"| {suite} ({c['cells']} cells x {c['lrs']} rates x {c['seeds']} seeds, {c['steps']} steps) | "
                    f"{c['exhaustive_steps']:,} steps, {c['exhaustive_runs']} runs, {c['wall_full'] / 3600:.1f} h | "
                    f"{c['race_steps']:,} steps, {c['runs']} runs, {c['wall_race'] / 3600:.1f} h | "
                    f"**{c['race_steps'] / c['exhaustive_steps']:.3f}** | {'same' if c['best_equal'] else 'differs'} | "
                    f"{'same' if c['set_equal'] else 'differs'} ({c['set_sizes'][0]} vs {c['set_sizes'][1]} cells) | "
                    f"{c['findings_same']} of {c['findings']} same, {c['opposed']} opposed |")
        for name, a, b in c["changes"]:
            notes.append(f"- {suite}, finding \"{name}\": exhaustive says *{a}*, the race *{b}*.")
        if c["missing"] or c["extra"]:
            notes.append(f"- {suite}: confidence set, only exhaustive: {', '.join(c['missing']) or '-'}; only the race: "
                         f"{', '.join(c['extra']) or '-'}.")
        notes.append(f"- {suite}: {len(c['exits'])} cells left after {race.MIN_SEEDS} seeds "
                     f"({', '.join(e.cell.name for e in c['exits']) or 'none'}). Records: `{command}`; "
                     f"machine: {machine.one_line(first['machine'])}.")
        for k in (1, 2, 3):
            s = compare(records, min_seeds=k)
            sensitivity.append(f"| {suite} | {k} | {s['race_steps'] / s['exhaustive_steps']:.3f} | "
                               f"{'same' if s['set_equal'] else 'differs'} ({s['set_sizes'][0]} vs {s['set_sizes'][1]}) | "
                               f"{s['findings_same']} of {s['findings']} same, {s['opposed']} opposed |")
    lines += ["| suite (matrix) | exhaustive (steps, runs, CPU time) | race | step share (goal <= 0.30) | best cell | "
              "confidence set of the best | findings |", "|---|---|---|---|---|---|---|", *rows, "", *notes, ""]
    lines += ["CPU time: the records' wall seconds (each run on one of two one-thread workers); a rung leg is counted "
              "at its share of steps.", ""]
    lines += ["Seeds every cell runs before any may leave (the default is 2): after one seed, seed noise is unmeasured "
              "and the confidence set is too narrow.", "",
              "| suite | seeds before leaving | step share | confidence set | findings |", "|---|---|---|---|---|",
              *sensitivity, ""]
    return "\n".join(lines)
