"""Tables from records: ``results.csv`` (one row per run), ``results.md`` (the verdict) with its page
``results.html`` (bench.html_report), terminal.

Pure functions of the records, so the same records always give the same files. What is chosen and
what is reported follows bench.verdict: choices on validation, test only reported, intervals over
seeds and items, "best" as a confidence set, equivalence only within a declared margin.
"""

from __future__ import annotations

import math
import shlex
import sys
import warnings

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from bench import costs, html_report, memory_figures, race, submission
from bench import verdict as verdicts
from bench.machine import one_line
from bench.stats import MARGIN
from bench.store import atomic_write_bytes, atomic_write_text

FACTORS = {"target_set": "target set", "rank": "rank", "vision_policy": "vision policy", "variant": "LoRA variant"}
CELL_COLUMNS = ["target_set", "rank", "alpha", "vision_policy", "variant"]


def frame(records: list[dict]) -> pd.DataFrame:
    """``results.csv``: one row per run; ``chosen`` marks the runs at their cell's validation-chosen rate.
    Memory: ``peak_mem_mib`` as measured (``memory_kind``: CUDA peak allocated, or the CPU process's peak
    RSS, which depends on run order), ``peak_delta_mib`` the run's growth over the process baseline,
    ``state_mib`` the memory model's exact weight + gradient + AdamW bytes, and ``memory_mib`` the figure
    runs are compared on, named in ``memory_figure`` (bench.memory_figures)."""
    chosen = {id(r) for c in verdicts.choose_rates(records).values() for r in c.runs}
    figure = memory_figures.compared(records)
    base_controls = {r["suite"]: {k: e["score"] for k, e in (r.get("control") or {}).items()}
                     for r in records if r.get("kind") == "base" and r.get("status") == "ok"}
    rows = []
    for r in records:
        cell = r.get("cell") or {}
        train = r.get("train") or {}
        losses = r.get("losses") or []
        rows.append({
            "suite": r["suite"],
            "model": r["model"],
            "kind": r["kind"],
            "target_set": cell.get("targets", "base"),
            "rank": cell.get("rank", 0),
            "alpha": cell.get("alpha", 0.0),
            "vision_policy": cell.get("vision", "base"),
            "variant": cell.get("variant", "lora") if cell else "base",
            "lr": train.get("lr"),
            "lr_connector": train.get("lr_connector"),
            "lr_vision": train.get("lr_vision"),
            "lora_dropout": train.get("lora_dropout"),
            "seed": r.get("seed") if r.get("seed") is not None else -1,
            "metric": r["metric"],
            "val_score": r.get("val_score"),
            "score": r.get("score"),
            "chosen": id(r) in chosen,
            "plateaued": r.get("plateaued"),
            "trainable_params": r.get("trainable_params"),
            "total_params": r.get("total_params"),
            "peak_mem_mib": r.get("peak_mem_mib"),
            "peak_reserved_mib": r.get("peak_reserved_mib"),
            "memory_kind": r.get("memory_kind"),
            "peak_delta_mib": r.get("peak_delta_mib"),
            "memory_released": r.get("memory_released"),
            "state_mib": memory_figures.state_mib(r) if r.get("kind") == "cell" else None,
            "memory_mib": figure.mib(r) if r.get("kind") == "cell" else None,
            "memory_figure": figure.kind if r.get("kind") == "cell" else None,
            "train_samples_per_s": r.get("train_samples_per_s"),
            "train_tokens_per_s": r.get("train_tokens_per_s"),
            "eval_items_per_s": r.get("eval_items_per_s"),
            "train_s": r.get("train_s"),
            "eval_s": r.get("eval_s"),
            "final_loss": float(np.mean(losses[-10:])) if losses else None,
            "train_items": train.get("train_items"),
            "stopped_at": r.get("stopped_at"),
            **_control_columns(r, base_controls.get(r["suite"], {})),
            "status": r["status"],
            "key": r["key"],
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["suite", "kind", "target_set", "rank", "alpha", "vision_policy", "variant", "lr", "seed"],
                          kind="stable", na_position="first").reset_index(drop=True)


def _control_columns(r: dict, base: dict) -> dict:
    """The first control suite's score (bench.costs): the run's, the base model's, and what was lost."""
    name = next(iter(r.get("control") or {}), None)
    if name is None:
        return {"control_suite": None, "control_score": None, "base_control_score": None, "forgetting": None}
    score, before = r["control"][name]["score"], base.get(name)
    return {"control_suite": name, "control_score": score, "base_control_score": before,
            "forgetting": before - score if before is not None and r.get("kind") == "cell" else None}


def _mean(values) -> float:
    values = [x for x in values if x is not None]
    return float(np.mean(values)) if values else math.nan


def cells_frame(v: verdicts.SuiteVerdict, memory: memory_figures.Figure | None = None) -> pd.DataFrame:
    """One row per cell at its chosen rate: validation (chosen on), test (reported) with intervals.
    ``memory_mib``: ``memory`` (default: what the cells' runs measured, bench.memory_figures.measured);
    ``state_mib``: the memory model's exact weight, gradient and AdamW bytes."""
    memory = memory or memory_figures.measured([r for c in v.cells for r in c.runs])
    rows = []
    for c in v.cells:
        _, targets, rank, alpha, vision, variant = c.key
        test = v.test.interval(c.key) if v.test is not None and c.key in v.test.keys else (c.test, math.nan, math.nan)
        val = v.val.interval(c.key) if v.val is not None and c.key in v.val.keys else (c.val, math.nan, math.nan)
        rows.append({
            "target_set": targets, "rank": rank, "alpha": alpha, "vision_policy": vision, "variant": variant, "lr": c.lr, "edge": c.edge,
            "seeds": c.seeds, "val": val[0], "val_low": val[1], "val_high": val[2], "in_best_set": c.key in v.best_set,
            "test": test[0], "test_low": test[1], "test_high": test[2],
            "plateaued": c.plateaued[0], "curves": c.plateaued[1],
            "trainable_params": int(c.mean("trainable_params")) if not math.isnan(c.mean("trainable_params")) else None,
            "peak_mem_mib": c.mean("peak_mem_mib"), "memory_mib": _mean(memory.mib(r) for r in c.runs),
            "state_mib": _mean(memory_figures.state_mib(r) for r in c.runs), "train_samples_per_s": c.mean("train_samples_per_s"),
            "eval_items_per_s": c.mean("eval_items_per_s"), "key": c.key,
        })
    return pd.DataFrame(rows)


def main_effects(cells: pd.DataFrame, factor: str) -> pd.DataFrame:
    """Mean test score per level of ``factor`` over the cells (each at its chosen rate)."""
    overall = cells.test.mean()
    table = cells.groupby(factor).test.agg(["mean", "count", "min", "max"]).reset_index()
    table["vs_overall"] = table["mean"] - overall
    return table.sort_values("mean", ascending=False).reset_index(drop=True)


INTERACTIONS = (("target_set", "vision_policy"), ("rank", "target_set"), ("target_set", "variant"), ("rank", "variant"))


def two_way(cells: pd.DataFrame, rows: str, cols: str) -> pd.DataFrame:
    return cells.pivot_table(index=rows, columns=cols, values="test", aggfunc="mean")


def cross_suite(all_verdicts: dict[str, verdicts.SuiteVerdict], bases: dict) -> pd.DataFrame:
    """Rows = cells (each suite's chosen rate), columns = suites (test scores), the base model last."""
    rows = {}
    for suite, v in all_verdicts.items():
        for c in v.cells:
            rows.setdefault(verdicts.cell_name(c.key), {})[suite] = c.test
    table = pd.DataFrame(rows).T
    table = table.loc[table.mean(axis=1).sort_values(ascending=False).index]
    base = pd.DataFrame([{suite: bases.get(suite, (None, None))[1] for suite in all_verdicts}], index=["(base model)"])
    return pd.concat([table, base])


def heatmap_name(suite: str) -> str:
    return f"heatmap-{suite}.png"


def heatmap_png(cells: pd.DataFrame, suite: str, metric: str) -> bytes:
    """Target set x vision policy (test scores, each cell at its chosen rate), values in the cells."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pivot = two_way(cells, "target_set", "vision_policy")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * pivot.shape[1], 0.8 + 0.5 * pivot.shape[0]), dpi=110)
    image = ax.imshow(pivot.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(pivot.shape[1]), pivot.columns)
    ax.set_yticks(range(pivot.shape[0]), pivot.index)
    ax.set_xlabel("vision policy")
    ax.set_ylabel("LoRA target set")
    for (i, j), value in np.ndenumerate(pivot.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < np.nanmean(pivot) else "black")
    fig.colorbar(image, ax=ax, label=f"test {metric}")
    ax.set_title(f"{suite}: test {metric}, each cell at its best rate")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _ci(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"


def _comparison(c) -> str:
    return f"{c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}] {c.verdict}"


def _rate(lr: float, edge: bool) -> str:
    return f"{lr:.2g}" + (" (edge)" if edge else "")


def _cell_name(row) -> str:
    # Item access, not attributes: ``row.rank`` is pandas' Series.rank method.
    variant = row.get("variant", "lora")
    return f"{row['target_set']}-r{row['rank']}-a{row['alpha']:g}-{row['vision_policy']}" + ("" if variant == "lora" else f"-{variant}")


def _span(values) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _protocol_lines(v: verdicts.SuiteVerdict, margin: float) -> list[str]:
    grid = ", ".join(f"{lr:.2g}" for lr in v.grid)
    lines = [f"Protocol: every choice below (each cell's learning rate, the best cell, the confidence set of the best) "
             f"looks at the validation split only; test is reported, never chosen on. LoRA learning rates tried per "
             f"cell: {grid} (fully trained parts at their declared ratio); seeds per cell: {_span(c.seeds for c in v.cells)}. "
             f"Intervals resample seeds and items "
             f"(95%); \"equivalent\" needs the 90% interval of a difference inside +-{margin:g} (TOST).", ""]
    if v.seeds < 2:
        lines += ["**One seed per cell: seed noise is not measured.** Intervals and the confidence set below hold item "
                  "noise only, and no equivalence is claimed; rerun with `--seeds 0,1,2`.", ""]
    edges = [verdicts.cell_name(c.key) for c in v.cells if c.edge]
    if edges:
        lines += [f"Best rate at the edge of the grid for {len(edges)} of {len(v.cells)} cells ({', '.join(edges[:6])}"
                  f"{', ...' if len(edges) > 6 else ''}): their optimum may lie outside it; widen `--lrs` to find out.", ""]
    plateau = [c.plateaued for c in v.cells]
    done, total = sum(p[0] for p in plateau), sum(p[1] for p in plateau)
    if total:
        best = v.best.plateaued if v.best else (0, 0)
        lines += [f"Training length: {done} of {total} chosen runs had plateaued (validation gained < 0.01 over the last "
                  f"quarter of training); the best cell: {best[0]} of {best[1]} seeds.", ""]
    return lines


def _mib(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _memory_phrase(row, memory: memory_figures.Figure) -> str:
    parts = [] if math.isnan(row.memory_mib) else [f"{_mib(row.memory_mib)} MiB ({memory.short})"]
    if not math.isnan(row.state_mib):
        parts.append(f"{_mib(row.state_mib)} MiB of weights, gradients and AdamW state (memory model)")
    return "memory " + (", ".join(parts) or "not recorded")


def _score(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def race_lines(p, metric: str) -> list[str]:
    """The race's account: what it spent against the exhaustive protocol, and each cell that left."""
    share = p.spent_steps / p.exhaustive_steps if p.exhaustive_steps else 0.0
    lines = ["### Racing (bench/race.py)", "",
             f"Training steps spent: {p.spent_steps:,} of the exhaustive protocol's {p.exhaustive_steps:,} ({share:.0%}). "
             f"Learning rates: every rate trains to the rung (half the steps), the better half (at least two) go on to "
             f"the end, the best of those at the end is the cell's rate. Seeds: every cell runs {race.MIN_SEEDS}; a further "
             f"seed runs only for cells still in the 95% confidence set of the best on validation.", ""]
    if p.exits:
        rows = [{"cell": e.cell.name, "left after seeds": e.seeds, "steps spent": f"{e.steps:,}",
                 f"val {metric} then": f"{e.val[0]:.3f} {_ci(e.val[1], e.val[2])}",
                 "best then": f"{e.best_cell.name} {e.best[0]:.3f} {_ci(e.best[1], e.best[2])}"} for e in p.exits]
        lines += ["Cells that left the race (shown worse than another cell on validation):", "",
                  pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    else:
        lines += ["No cell left the race early: every cell ran every seed.", ""]
    return lines


def suite_markdown(v: verdicts.SuiteVerdict, metric: str, base: tuple, margin: float, source: str | None,
                   race=None) -> list[str]:
    lines = [f"## {v.suite} ({metric})", ""]
    if source:
        lines += [f"Data: {source}", ""]
    if not v.cells:
        return lines + ["No finished runs.", ""]
    memory = memory_figures.measured([r for c in v.cells for r in c.runs])
    cells = cells_frame(v, memory)
    lines += _protocol_lines(v, margin)
    b = cells.iloc[0]
    in_set = [verdicts.cell_name(k) for k in (c.key for c in v.cells) if k in v.best_set]
    lines += [f"**Best cell (validation):** `{_cell_name(b)}` at lr {b.lr:.2g}: validation {metric} {b.val:.3f}, "
              f"test {b.test:.3f} {_ci(b.test_low, b.test_high)} over {b.seeds} seed(s); {_memory_phrase(b, memory)}, "
              f"{b.train_samples_per_s:.0f} train samples/s.", ""]
    lines += [f"**Confidence set of the best (95%, validation):** {len(in_set)} of {len(v.cells)} cells: "
              + ", ".join(f"`{n}`" for n in in_set) + ".", ""]
    if base[1] is not None:
        lines += [f"**Base model (no tuning):** test {metric} {base[1]:.3f}" + (f", validation {base[0]:.3f}" if base[0] is not None else ""), ""]
    shown = pd.DataFrame({
        "cell": cells.apply(_cell_name, axis=1),
        "lr": [_rate(lr, e) for lr, e in zip(cells.lr, cells.edge)],
        "seeds": cells.seeds,
        f"val {metric}": cells.val,
        "best set": ["yes" if x else "" for x in cells.in_best_set],
        f"test {metric}": cells.test,
        "test 95% CI": [_ci(lo, hi) for lo, hi in zip(cells.test_low, cells.test_high)],
        "vs best on test": ["(best)" if k == v.best.key else (_comparison(v.vs_best[k]) if k in v.vs_best else "") for k in cells.key],
        "plateaued": [f"{p}/{n}" if n else "" for p, n in zip(cells.plateaued, cells.curves)],
        "trainable": cells.trainable_params,
        memory.header: [None if math.isnan(x) else x for x in cells.memory_mib],
        memory_figures.HEADERS[memory_figures.MODEL_STATE]: [None if math.isnan(x) else x for x in cells.state_mib],
        "samples/s": [f"{x:.0f}" for x in cells.train_samples_per_s],
    })
    lines += ["### Cells (best validation score first; each at its best learning rate on validation)", ""]
    lines += ["*vs best on test*: the cell minus the validation-chosen best on the same test items, 95% interval over "
              "seeds and items, and the verdict (better / worse / equivalent within the margin / not shown different). "
              "Validation scores are each cell's best over the rate grid, so they are optimistic; test scores are not.", ""]
    lines += [f"*{memory.header}*: {memory.label}" + (f" ({memory.note})" if memory.note else "") + f"; *"
              f"{memory_figures.HEADERS[memory_figures.MODEL_STATE]}*: {memory_figures.LABELS[memory_figures.MODEL_STATE]}. "
              "Means over the cell's seeds.", ""]
    mib = {memory.header: ".0f" if memory.kind in (memory_figures.CUDA_PEAK, memory_figures.RECORDED) else ".1f",
           memory_figures.HEADERS[memory_figures.MODEL_STATE]: ".1f"}
    lines += [shown.to_markdown(index=False, floatfmt=[mib.get(c, ".3f") for c in shown.columns]), ""]
    if len(v.grid) > 1:
        rates = pd.DataFrame({f"{lr:.2g}": [_score(c.by_rate.get(lr, (math.nan,))[0]) for c in v.cells] for lr in v.grid},
                             index=[verdicts.cell_name(c.key) for c in v.cells])
        lines += ["### Learning rate sweep (validation score, mean over seeds)", "",
                  *(["-: stopped at the racing rung (its score there trailed), so no final score."] if race else []), "",
                  rates.to_markdown(disable_numparse=True), ""]
    if race is not None:
        lines += race_lines(race, metric)
    findings = [f for f in v.findings if f.comparison is not None]
    if findings:
        rows = [{"claim": f.claim.name, "source": f.claim.source, "contrast": f"{f.claim.a} - {f.claim.b}",
                 "matched pairs": f.pairs, "difference (test)": f"{f.comparison.diff:+.3f}",
                 "95% CI": f"[{f.comparison.low:+.3f}, {f.comparison.high:+.3f}]",
                 "range over pairs": f"{f.spread[0]:+.3f} to {f.spread[1]:+.3f}", "verdict": f.comparison.verdict}
                for f in findings]
        lines += ["### Findings (test; each contrast averages cells that match on every other factor)", "",
                  pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    lines += ["### Main effects (mean test score per level, over the other factors)", ""]
    for factor, title in FACTORS.items():
        effects = main_effects(cells, factor)
        if len(effects) < 2:
            continue
        effects = effects.rename(columns={"mean": f"mean {metric}", "count": "cells", "vs_overall": "vs overall"})
        lines += [f"**{title}**", "", effects.to_markdown(index=False, floatfmt=".3f"), ""]
    interactions = [(r, c) for r, c in INTERACTIONS if cells[r].nunique() > 1 and cells[c].nunique() > 1]
    if interactions:
        lines += ["### Two-way tables (mean test score over the other factors)", ""]
        if ("target_set", "vision_policy") in interactions:
            lines += [f"![{v.suite}: target set x vision policy]({heatmap_name(v.suite)})", ""]
    for rows, cols in interactions:
        lines += [f"**{FACTORS[rows]} x {FACTORS[cols]}**", "", two_way(cells, rows, cols).to_markdown(floatfmt=".3f"), ""]
    return lines


def markdown(records: list[dict], command: str, settings: dict, margin: float = MARGIN,
             judged: dict | None = None, racing: tuple | None = None) -> str:
    """``racing``: (cells, lrs, seeds, steps) of a raced matrix, for its account per suite."""
    judged = verdicts.judge(records, margin) if judged is None else judged
    bases = verdicts.base_scores(records)
    first = records[0] if records else {}
    lines = ["# LoRA ablation results", ""]
    lines += [f"Command: `{command}`", ""]
    if first:
        lines += [f"Machine: {one_line(first['machine'])}; precision: {first.get('mixed_precision', 'no')}", ""]
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()), ""]
    if settings:
        lines += ["Per run: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None), ""]
    cells = [r for r in records if r.get("kind") == "cell"]
    bad = [r for r in cells if r.get("status") not in ("ok", "raced")]
    raced = [r for r in cells if r.get("status") == "raced"]
    lines += [f"Runs: {len(cells) - len(bad) - len(raced)} ok" + (f", {len(raced)} stopped at the racing rung" if raced else "")
              + (f", {len(bad)} not ok (listed at the end)" if bad else ""), ""]
    for suite in sorted({r["suite"] for r in records}):
        metric = next(r["metric"] for r in records if r["suite"] == suite)
        source = next((r.get("data_source") for r in records if r.get("suite") == suite and r.get("data_source")), None)
        v = judged.get(suite) or verdicts.SuiteVerdict(suite, [], None, set(), None, None)
        plan = None
        if racing is not None:
            plan = race.plan([r for r in records if r.get("suite") == suite], *racing)
        lines += suite_markdown(v, metric, bases.get(suite, (None, None)), margin, source, plan)
        for f in costs.forgetting(v, [r for r in records if r["suite"] == suite], margin):
            lines += costs.forgetting_lines(f, metric)
    regimes = costs.regimes_table(judged, records)
    for task, table in regimes.items():
        lines += [f"## {task}: training-set size (test score [95% interval], each cell at its best rate on validation)", "",
                  "The same items nested: a smaller set is the first items of a larger one; validation and test are shared.", "",
                  table.to_markdown(disable_numparse=True), ""]
    cost_findings = costs.regime_findings(judged, records, margin)
    if not cost_findings.empty:
        lines += ["## Costs of tuning: findings", "",
                  "*on test*: the section's own test score (a negative difference where data resemble pretraining is "
                  "over-fitting); *on control*: the control suite's score (a negative difference is more forgetting).", "",
                  cost_findings.to_markdown(index=False, disable_numparse=True), ""]
    if len(judged) > 1:
        lines += ["## Across suites (test score, each cell at its best rate on that suite's validation)", "",
                  cross_suite(judged, bases).to_markdown(floatfmt=".3f"), ""]
    if bad:
        lines += ["## Runs that did not finish", ""]
        table = pd.DataFrame([{"suite": r["suite"], "cell": verdicts.cell_name(verdicts.cell_key(r)), "lr": r["train"]["lr"],
                               "seed": r.get("seed"), "status": r["status"]} for r in bad])
        lines += [table.to_markdown(index=False), ""]
        lines += [f"- `{r['key']}`: {r.get('error')}" for r in bad] + [""]
    return "\n".join(lines)


def terminal_table(judged: dict[str, verdicts.SuiteVerdict], records: list[dict], console: Console) -> None:
    """Fits 80 columns: cell, chosen rate, validation (chosen on), test with its interval. With LoRA
    variants, a variant column, shorter headers, and the vision policy is the column that gives way."""
    bases = verdicts.base_scores(records)
    for suite, v in judged.items():
        metric = next(r["metric"] for r in records if r["suite"] == suite)
        memory = memory_figures.measured([r for c in v.cells for r in c.runs])
        cells = cells_frame(v, memory)
        variants = set(cells.variant) != {"lora"}  # a column only when a variant other than plain LoRA ran
        columns = ("set", "r", "vision", "variant", "lr", "n") if variants else ("targets", "r", "vision", "lr", "seeds")
        columns += ("val", "test", "±95%", "MiB", "samp/s")
        rows = []
        for row in cells.itertuples():
            half = "" if math.isnan(row.test_low) else f"{(row.test_high - row.test_low) / 2:.3f}"
            rows.append([row.target_set, str(row.rank), row.vision_policy, *((row.variant,) if variants else ()),
                         f"{row.lr:.0e}" + ("!" if row.edge else ""), str(row.seeds),
                         f"{row.val:.3f}" + ("*" if row.in_best_set else " "), f"{row.test:.3f}", half,
                         _mib(row.memory_mib), f"{row.train_samples_per_s:.0f}"])
        base = bases.get(suite, (None, None))
        if base[1] is not None:
            val = "" if base[0] is None else f"{base[0]:.3f} "
            label = ["", "", "(base)", ""] if variants else ["(base)", "", ""]  # variants: "set" stays 4 wide
            rows.append([*label, "", "", val, f"{base[1]:.3f}", "", "", ""])
        table = Table(title=f"{suite}: {metric}, best on validation first (* = in the 95% best set; MiB = {memory.header}"
                            + ("; n = seeds)" if variants else ")"), box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for k, col in enumerate(columns):
            natural = max(len(col), *(len(r[k]) for r in rows)) if rows else len(col)
            table.add_column(col, justify="left" if col in ("targets", "set", "vision", "variant") else "right", no_wrap=True,
                             min_width=(13 if not variants else None) if col == "vision" else natural)
        for i, row in enumerate(rows):
            base_row = base[1] is not None and i == len(rows) - 1
            table.add_row(*row, style="dim" if base_row else "bold green" if i == 0 else None)
        console.print(table)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    """Any small frame as a terminal table (floats to 4 significant digits)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in frame.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


def command_line(argv: list[str], storage: str | None = None) -> str:
    """The command as results.md shows it: every URL argument (``--storage URL``, ``--storage=URL``, an
    abbreviated flag) without its password or credential query parameters."""
    from bench.study import redact, redact_text

    shown = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and flag.startswith("--") and "://" in value:
            arg = f"{flag}={redact(value)}"
        elif "://" in arg:
            arg = redact(arg)
        shown.append(arg)
    return redact_text("python run_bench.py " + " ".join(shlex.quote(a) for a in shown), storage)


def write_all(records: list[dict], spec, console: Console, study=None) -> None:
    out = spec.out
    margin = getattr(spec, "margin", MARGIN)
    judged = verdicts.judge(records, margin)
    command = command_line(sys.argv[1:], getattr(spec, "storage", None)) if sys.argv else ""
    settings = {"steps": spec.train.steps, "batch_size": spec.train.batch_size,
                "lrs": ",".join(f"{t.lr:g}" for t in spec.settings) if hasattr(spec, "settings") else spec.train.lr,
                "lr_connector/lr": f"{spec.train.lr_connector / spec.train.lr:g}", "lr_vision/lr": f"{spec.train.lr_vision / spec.train.lr:g}",
                "lora_dropout": spec.train.lora_dropout, "alpha_rule": spec.alpha_rule,
                "param_budget": getattr(spec, "param_budget", None)}
    atomic_write_text(out / "results.csv", frame(records).to_csv(index=False, float_format="%.6g"))
    racing = None
    if getattr(spec, "protocol", None) == "race" and not spec.search:
        racing = (list(spec.cells), sorted(t.lr for t in spec.settings), list(spec.seeds), spec.train.steps)
    text = markdown(records, command, settings, margin, judged, racing)
    if study is not None and spec.search:
        text += "\n" + search_markdown(study, spec)
        if len(spec.objectives) > 1 and any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
            atomic_write_bytes(out / PARETO_PNG, pareto_png(study, spec))
    elif study is not None:
        for suite in sorted({r["suite"] for r in records}):  # a section per suite and data regime
            text += f"\n## Parameter importance: {suite}\n\n" + importance_table(study, spec.objectives, suite)
    for suite, v in judged.items():
        metric = next(r["metric"] for r in records if r["suite"] == suite)
        if heatmap_name(suite) in text:
            atomic_write_bytes(out / heatmap_name(suite), heatmap_png(cells_frame(v), suite, metric))
        for f in costs.forgetting(v, [r for r in records if r["suite"] == suite], margin):
            atomic_write_bytes(out / costs.png_name(f.section, f.control), costs.forgetting_png(f, metric))
    atomic_write_text(out / "results.md", text + "\n")
    html_report.write_next_to(out / "results.md", text + "\n")  # after the figures, which it embeds
    submission.write_all(records, judged, out)
    if judged:
        terminal_table(judged, records, console)
    console.print(f"wrote {out / 'results.md'} (and .html), {out / 'results.csv'} and predictions in submission format under {out / 'submissions'}")


# ----------------------------------------------------------------------------- the study's view


def _suite_study(study, suite: str | None):
    """An in-memory copy of the study's finished trials of one suite (importance is per suite), in run
    order: workers finish runs in any order, and fANOVA's forest depends on the order of its rows."""
    import optuna
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "run" in t.user_attrs and (suite is None or t.user_attrs.get("suite", suite) == suite)]
    trials.sort(key=lambda t: (str(t.user_attrs["run"]), t.number))
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(trials)
    return copy


def importance_table(study, objectives: tuple[str, ...], suite: str | None = None) -> str:
    """fANOVA importance per objective (explicit targets), plus PED-ANOVA on the Pareto view when
    there are enough trials; a line saying why when there are too few."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    sub = _suite_study(study, suite)
    trials = sub.trials
    varying = [p for p in sorted({p for t in trials for p in t.params}) if len({repr(t.params.get(p)) for t in trials}) > 1]
    if len(trials) < 4 or not varying:
        return f"Parameter importance: needs at least 4 finished trials with varying parameters (have {len(trials)}).\n"
    rows, constant = {}, []
    for i, objective in enumerate(objectives):
        if len({t.values[i] for t in trials}) < 2:  # fANOVA has no variance to split
            constant.append(objective)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows[f"{objective} (fANOVA)"] = get_param_importances(
                sub, evaluator=FanovaImportanceEvaluator(seed=0), params=varying, target=lambda t, i=i: t.values[i])
    if len(objectives) == 1 and len(trials) >= 10 and not constant:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows["score (PED-ANOVA, top 10%)"] = get_param_importances(sub, evaluator=PedAnovaImportanceEvaluator(), params=varying)
        rank = {}
    elif len(objectives) > 1 and len(trials) >= 10:
        rank = {(tuple(t.values), repr(t.params)): r for r, front in enumerate(_pareto_ranks(sub)) for t in front}
    else:
        rank = {}
    if len(set(rank.values())) > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows["Pareto rank (PED-ANOVA)"] = get_param_importances(
                sub, evaluator=PedAnovaImportanceEvaluator(), params=varying,
                target=lambda t: float(rank.get((tuple(t.values), repr(t.params)), 0)))
    note = f"Parameter importance: {', '.join(constant)} did not vary over the trials, so no factor explains it.\n" if constant else ""
    if not rows:
        return note
    frame_ = pd.DataFrame(rows).T.fillna(0.0)
    frame_ = frame_[sorted(frame_.columns, key=lambda c: -frame_[c].max())]
    return note + "Parameter importance (share of variance explained; per objective):\n\n" + frame_.to_markdown(floatfmt=".2f") + "\n"


def _pareto_ranks(study) -> list[list]:
    """Non-dominated sorting with Optuna's own Pareto front, peeling one front at a time."""
    import optuna

    remaining = list(study.trials)
    fronts = []
    while remaining:
        peel = optuna.create_study(directions=study.directions)
        peel.add_trials(remaining)
        front = peel.best_trials
        fronts.append(front)
        ids = {(tuple(t.values), repr(t.params)) for t in front}
        remaining = [t for t in remaining if (tuple(t.values), repr(t.params)) not in ids]
    return fronts


OBJECTIVE_LABELS = {"score": "val score", "memory": "peak MiB", "throughput": "train samples/s"}


def search_markdown(study, spec) -> str:
    """The search's trials, its Pareto front (Optuna's, feasible trials only) and where steps went."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if "run" in t.user_attrs and not t.user_attrs.get("stale")]
    lines = ["## Search (Optuna)", ""]
    pruner = spec.pruner if len(spec.objectives) == 1 else "none (multi-objective)"
    lines += [f"Sampler: TPE (seed {spec.sampler_seed}); pruner: {pruner}; objectives: "
              + ", ".join(f"{o} ({d.name.lower()})" for o, d in zip(spec.objectives, study.directions))
              + (f"; memory budget {spec.memory_budget_mib:.0f} MiB (a constraint)" if spec.memory_budget_mib else ""), ""]
    rows = []
    for t in trials:
        p = t.params
        feasible = all(v <= 0 for v in t.constraints.values()) if t.constraints else True
        rows.append({"trial": t.number, "state": t.state.name.lower(), "targets": p.get("targets"), "rank": p.get("rank"),
                     "vision": p.get("vision"), **({"variant": p.get("variant")} if "variant" in p else {}), "lr": p.get("lr"), "alpha/r": p.get("alpha_ratio"), "dropout": p.get("lora_dropout"),
                     **{OBJECTIVE_LABELS[o]: (t.values[i] if t.values else None) for i, o in enumerate(spec.objectives)},
                     "test score": _test_score(t),
                     "steps": t.user_attrs.get("steps_trained"), "feasible": "yes" if feasible else "no"})
    steps = sum(r["steps"] or 0 for r in rows)
    matrix_steps = len(spec.cells) * spec.train.steps
    lines += [f"Trials: {len(rows)}; training steps used: {steps} ({steps / matrix_steps:.0%} of the {len(spec.cells)}-cell matrix's {matrix_steps}).", ""]
    if rows:
        lines += [pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"), ""]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = _suite_study(study, None).best_trials if len(spec.objectives) > 1 else [max(complete, key=lambda t: t.values[0])]
        title = "Pareto front (feasible trials only; never an infeasible one)" if len(spec.objectives) > 1 else "Best trial"
        front = [r for r in rows if any((tuple(b.values), repr(b.params)) == (tuple(t.values or ()), repr(t.params))
                                        for b in best for t in trials if t.number == r["trial"])]
        shown = pd.DataFrame(front).to_markdown(index=False, floatfmt=".3g") if front else "No feasible trial: every trial broke the memory budget."
        lines += [f"**{title}**", "", shown, ""]
        if len(spec.objectives) > 1:
            lines += [f"![Pareto front]({PARETO_PNG})", ""]
    lines += [importance_table(study, spec.objectives), ""]
    return "\n".join(lines)


def _test_score(trial) -> float | None:
    """The trial's test score, reported next to the validation score it was chosen on."""
    from bench.study import trial_record

    record = trial_record(trial)
    return record.get("score") if record else None


PARETO_PNG = "pareto.png"


def pareto_png(study, spec) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_pareto_front

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = plot_pareto_front(_suite_study(study, None), target_names=[OBJECTIVE_LABELS[o] for o in spec.objectives[:3]])
    fig = ax.figure
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches="tight")
    matplotlib.pyplot.close(fig)
    return buffer.getvalue()
