"""Tables from records: ``results.csv`` (one row per run), ``results.md`` (cells, effects, best), terminal.

Pure functions of the records, so the same records always give the same files.
"""

from __future__ import annotations

import math
import warnings
import shlex
import sys

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table
from scipy import stats

from bench.machine import one_line
from bench.stats import versus_best
from bench.store import atomic_write_bytes, atomic_write_text

FACTORS = {"target_set": "target set", "rank": "rank", "vision_policy": "vision policy"}
CELL_COLUMNS = ["target_set", "rank", "alpha", "vision_policy"]


def frame(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in records:
        cell = r.get("cell") or {}
        losses = r.get("losses") or []
        rows.append({
            "suite": r["suite"],
            "model": r["model"],
            "kind": r["kind"],
            "target_set": cell.get("targets", "base"),
            "rank": cell.get("rank", 0),
            "alpha": cell.get("alpha", 0.0),
            "vision_policy": cell.get("vision", "base"),
            "seed": r.get("seed") if r.get("seed") is not None else -1,
            "metric": r["metric"],
            "score": r.get("score"),
            "trainable_params": r.get("trainable_params"),
            "total_params": r.get("total_params"),
            "peak_mem_mib": r.get("peak_mem_mib"),
            "peak_reserved_mib": r.get("peak_reserved_mib"),
            "memory_kind": r.get("memory_kind"),
            "train_samples_per_s": r.get("train_samples_per_s"),
            "train_tokens_per_s": r.get("train_tokens_per_s"),
            "eval_items_per_s": r.get("eval_items_per_s"),
            "train_s": r.get("train_s"),
            "eval_s": r.get("eval_s"),
            "final_loss": float(np.mean(losses[-10:])) if losses else None,
            "status": r["status"],
            "key": r["key"],
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["suite", "kind", "target_set", "rank", "alpha", "vision_policy", "seed"], kind="stable").reset_index(drop=True)


def interval(scores: pd.Series) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (NaN bounds with one seed)."""
    values = scores.dropna().to_numpy(dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def cell_table(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[(df.kind == "cell") & (df.status == "ok")]
    rows = []
    for keys, group in ok.groupby(["suite", *CELL_COLUMNS], sort=False):
        mean, lo, hi = interval(group.score)
        rows.append({
            **dict(zip(["suite", *CELL_COLUMNS], keys)),
            "seeds": len(group),
            "score": mean,
            "ci_low": lo,
            "ci_high": hi,
            "trainable_params": int(group.trainable_params.iloc[0]),
            "peak_mem_mib": group.peak_mem_mib.mean(),
            "train_samples_per_s": group.train_samples_per_s.mean(),
            "eval_items_per_s": group.eval_items_per_s.mean(),
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values(["suite", "score"], ascending=[True, False], kind="stable").reset_index(drop=True)
    return table


def main_effects(df: pd.DataFrame, suite: str, factor: str) -> pd.DataFrame:
    ok = df[(df.kind == "cell") & (df.status == "ok") & (df.suite == suite)]
    overall = ok.score.mean()
    table = ok.groupby(factor).score.agg(["mean", "count", "min", "max"]).reset_index()
    table["vs_overall"] = table["mean"] - overall
    return table.sort_values("mean", ascending=False).reset_index(drop=True)


INTERACTIONS = (("target_set", "vision_policy"), ("rank", "target_set"))


def two_way(df: pd.DataFrame, suite: str, rows: str, cols: str) -> pd.DataFrame:
    ok = df[(df.kind == "cell") & (df.status == "ok") & (df.suite == suite)]
    return ok.pivot_table(index=rows, columns=cols, values="score", aggfunc="mean")


def cross_suite(df: pd.DataFrame) -> pd.DataFrame:
    """Rows = cells, columns = suites, with each suite's base model as the last row."""
    cells = cell_table(df)
    cells = cells.assign(cell=cells.apply(_cell_name, axis=1))
    table = cells.pivot_table(index="cell", columns="suite", values="score", aggfunc="mean")
    table = table.loc[table.mean(axis=1).sort_values(ascending=False).index]
    base = df[df.kind == "base"].groupby("suite").score.mean().rename("(base model)")
    return pd.concat([table, base.to_frame().T])


def heatmap_name(suite: str) -> str:
    return f"heatmap-{suite}.png"


def heatmap_png(df: pd.DataFrame, suite: str) -> bytes:
    """Target set x vision policy, one colour scale per suite, values printed in the cells."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pivot = two_way(df, suite, "target_set", "vision_policy")
    metric = df[df.suite == suite].metric.iloc[0]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * pivot.shape[1], 0.8 + 0.5 * pivot.shape[0]), dpi=110)
    image = ax.imshow(pivot.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    ax.set_xticks(range(pivot.shape[1]), pivot.columns)
    ax.set_yticks(range(pivot.shape[0]), pivot.index)
    ax.set_xlabel("vision policy")
    ax.set_ylabel("LoRA target set")
    for (i, j), value in np.ndenumerate(pivot.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < np.nanmean(pivot) else "black")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{suite}: mean {metric}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _fmt_ci(row) -> str:
    if math.isnan(row.ci_low):
        return "n/a (1 seed)"
    return f"[{row.ci_low:.3f}, {row.ci_high:.3f}]"


def _versus_best_column(records: list[dict], suite: str, suite_cells: pd.DataFrame) -> list[str]:
    best = suite_cells.iloc[0]
    key = lambda row: (row["target_set"], row["rank"], float(row["alpha"]), row["vision_policy"])  # noqa: E731
    table = versus_best(records, suite, (suite, *key(best)))
    found = {key(row): row for _, row in table.iterrows()} if not table.empty else {}
    column = []
    for i, (_, row) in enumerate(suite_cells.iterrows()):
        r = found.get(key(row))
        if i == 0:
            column.append("(best)")
        elif r is None:
            column.append("")
        else:
            mark = "**≈ best** " if r.within_noise else ""
            column.append(f"{mark}{r['diff']:+.3f} [{r.low:+.3f}, {r.high:+.3f}] p={r.p_value:.3f}")
    return column


def _cell_name(row) -> str:
    # Item access, not attributes: ``row.rank`` is pandas' Series.rank method.
    return f"{row['target_set']}-r{row['rank']}-a{row['alpha']:g}-{row['vision_policy']}"


def markdown(df: pd.DataFrame, records: list[dict], command: str, settings: dict) -> str:
    cells = cell_table(df)
    first = records[0] if records else {}
    lines = ["# LoRA ablation results", ""]
    lines += [f"Command: `{command}`", ""]
    if first:
        lines += [f"Machine: {one_line(first['machine'])}; precision: {first.get('mixed_precision', 'no')}", ""]
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()), ""]
    if settings:
        lines += ["Per run: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None), ""]
    n_ok = int(((df.kind == "cell") & (df.status == "ok")).sum()) if not df.empty else 0
    bad = df[(df.kind == "cell") & (df.status != "ok")] if not df.empty else df
    lines += [f"Runs: {n_ok} ok" + (f", {len(bad)} not ok (listed at the end)" if len(bad) else ""), ""]
    for suite in sorted(df.suite.unique()) if not df.empty else []:
        metric = df[df.suite == suite].metric.iloc[0]
        base = df[(df.suite == suite) & (df.kind == "base")]
        suite_cells = cells[cells.suite == suite] if not cells.empty else cells
        lines += [f"## {suite} ({metric})", ""]
        source = next((r.get("data_source") for r in records if r.get("suite") == suite and r.get("data_source")), None)
        if source:
            lines += [f"Data: {source}", ""]
        if not suite_cells.empty:
            best = suite_cells.iloc[0]
            lines += [
                f"**Best cell:** `{_cell_name(best)}` with {metric} {best.score:.3f} {_fmt_ci(best)}"
                f" over {best.seeds} seed(s); peak memory {best.peak_mem_mib:.0f} MiB, {best.train_samples_per_s:.0f} train samples/s.",
                "",
            ]
        if not base.empty:
            lines += [f"**Base model (no tuning):** {metric} {base.score.iloc[0]:.3f}", ""]
        if not suite_cells.empty:
            shown = suite_cells.assign(
                cell=suite_cells.apply(_cell_name, axis=1),
                **{"95% CI": suite_cells.apply(_fmt_ci, axis=1)},
            )
            shown["vs best (paired)"] = _versus_best_column(records, suite, suite_cells)
            shown = shown[["target_set", "rank", "alpha", "vision_policy", "seeds", "score", "95% CI", "vs best (paired)",
                           "trainable_params", "peak_mem_mib", "train_samples_per_s", "eval_items_per_s"]]
            if not base.empty:
                b = base.iloc[0]
                base_row = pd.DataFrame([{
                    "target_set": "(base model)", "rank": "-", "alpha": "-", "vision_policy": "-", "seeds": "-",
                    "score": b.score, "95% CI": "", "trainable_params": 0, "peak_mem_mib": np.nan,
                    "train_samples_per_s": np.nan, "eval_items_per_s": b.eval_items_per_s,
                }])
                shown = pd.concat([shown, base_row], ignore_index=True)
            shown = shown.rename(columns={"score": metric})
            lines += ["### Cells (mean and 95% interval over seeds; sorted by score)", ""]
            lines += ["*vs best (paired)*: difference from the best cell on the same test items, 95% bootstrap "
                      "interval and permutation p-value; **≈ best** marks cells within noise of the best (p >= 0.05). "
                      "With one seed per cell this is item noise only: seed noise can be larger "
                      "(run `--seeds 0,1,2` to include it).", ""]
            lines += [shown.to_markdown(index=False, floatfmt=".3f"), ""]
            lines += ["### Main effects (mean score per level, over all other factors)", ""]
            for factor, title in FACTORS.items():
                effects = main_effects(df, suite, factor)
                if len(effects) < 2:
                    continue
                effects = effects.rename(columns={"mean": f"mean {metric}", "count": "runs", "vs_overall": "vs overall"})
                lines += [f"**{title}**", "", effects.to_markdown(index=False, floatfmt=".3f"), ""]
            suite_runs = df[(df.suite == suite) & (df.kind == "cell")]
            interactions = [(r, c) for r, c in INTERACTIONS if suite_runs[r].nunique() > 1 and suite_runs[c].nunique() > 1]
            if interactions:
                lines += ["### Two-way tables (mean score over the other factors and seeds)", ""]
                lines += [f"![{suite}: target set x vision policy]({heatmap_name(suite)})", ""] if ("target_set", "vision_policy") in interactions else []
            for rows, cols in interactions:
                pivot = two_way(df, suite, rows, cols)
                lines += [f"**{FACTORS[rows]} x {FACTORS[cols]}**", "", pivot.to_markdown(floatfmt=".3f"), ""]
    if not df.empty and df.suite.nunique() > 1:
        lines += ["## Across suites (mean score over seeds; each suite's own metric)", "", cross_suite(df).to_markdown(floatfmt=".3f"), ""]
    if len(bad):
        lines += ["## Runs that did not finish", ""]
        lines += [bad[["suite", "target_set", "rank", "vision_policy", "seed", "status"]].to_markdown(index=False), ""]
        for r in records:
            if r.get("kind") == "cell" and r.get("status") != "ok":
                lines.append(f"- `{r['key']}`: {r.get('error')}")
        lines.append("")
    return "\n".join(lines)


def terminal_table(df: pd.DataFrame, console: Console) -> None:
    """Fits 80 columns: the interval column only when some cell has several seeds."""
    cells = cell_table(df)
    for suite in sorted(df.suite.unique()):
        metric = df[df.suite == suite].metric.iloc[0]
        base = df[(df.suite == suite) & (df.kind == "base")]
        suite_cells = cells[cells.suite == suite] if not cells.empty else cells
        with_ci = not suite_cells.empty and suite_cells.ci_low.notna().any()
        table = Table(title=f"{suite}: {metric} per cell, best first", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        columns = ["targets", "r", "vision", "seeds", metric] + (["±95%"] if with_ci else []) + ["trainable", "MiB", "samp/s"]
        for col in columns:
            table.add_column(col, justify="left" if col in ("targets", "vision") else "right", no_wrap=True,
                             min_width={metric: 5, "vision": 13}.get(col))
        for i, row in enumerate(suite_cells.itertuples()):
            ci = ["" if math.isnan(row.ci_low) else f"{(row.ci_high - row.ci_low) / 2:.3f}"] if with_ci else []
            table.add_row(row.target_set, str(row.rank), row.vision_policy, str(row.seeds), f"{row.score:.3f}", *ci,
                          f"{row.trainable_params:,}", f"{row.peak_mem_mib:.0f}", f"{row.train_samples_per_s:.0f}",
                          style="bold green" if i == 0 else None)
        if not base.empty:
            table.add_row("(base)", "", "", "", f"{base.score.iloc[0]:.3f}", *([""] if with_ci else []), "0", "", "", style="dim")
        console.print(table)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    """Any small frame as a terminal table (floats to 4 significant digits)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in frame.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


def write_all(records: list[dict], spec, console: Console, study=None) -> None:
    df = frame(records)
    out = spec.out
    from bench.study import redact

    command = redact("python run_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])) if sys.argv else ""
    settings = {"steps": spec.train.steps, "batch_size": spec.train.batch_size, "lr": spec.train.lr,
                "lora_dropout": spec.train.lora_dropout, "alpha_rule": spec.alpha_rule}
    atomic_write_text(out / "results.csv", df.to_csv(index=False, float_format="%.6g"))
    text = markdown(df, records, command, settings)
    if study is not None and spec.search:
        text += "\n" + search_markdown(study, spec)
        if len(spec.objectives) > 1 and any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
            atomic_write_bytes(out / PARETO_PNG, pareto_png(study, spec))
    elif study is not None:
        for suite in spec.suites:
            text += f"\n## Parameter importance: {suite}\n\n" + importance_table(study, spec.objectives, suite)
    for suite in sorted(df.suite.unique()) if not df.empty else []:
        if heatmap_name(suite) in text:
            atomic_write_bytes(out / heatmap_name(suite), heatmap_png(df, suite))
    atomic_write_text(out / "results.md", text + "\n")
    if not df.empty:
        terminal_table(df, console)
    console.print(f"wrote {out / 'results.md'} and {out / 'results.csv'}")


# ----------------------------------------------------------------------------- the study's view


def _suite_study(study, suite: str | None):
    """An in-memory copy of the study's finished trials of one suite (importance is per suite)."""
    import optuna
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if "run" in t.user_attrs and (suite is None or t.user_attrs.get("suite", suite) == suite)]
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


OBJECTIVE_LABELS = {"score": "score", "memory": "peak MiB", "throughput": "train samples/s"}


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
                     "vision": p.get("vision"), "lr": p.get("lr"), "alpha/r": p.get("alpha_ratio"), "dropout": p.get("lora_dropout"),
                     **{OBJECTIVE_LABELS[o]: (t.values[i] if t.values else None) for i, o in enumerate(spec.objectives)},
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
