"""The costs of tuning: forgetting on control suites, and the data regime as a factor.

Every tuned run is also scored on control suites the base model already does well (bench.runner:
the embedded model's own pretraining task, ``shapes``, or ``--control``), on the same items for every
cell. *Forgetting* is the base model's control score minus the run's: points of what the model could
do that tuning cost it. Gain (test score over the base model) is what tuning bought, so each cell is a
point (gain, forgetting) and the cells nobody beats on both are the Pareto front (Optuna's).

Intervals are the same two-level bootstrap as the test scores' (bench.stats: items and seeds), on the
control items; the base model is deterministic, so its control score is a constant. With
``--train-items a,b,c`` each level is its own section (``docvqa@n250``), and :func:`regime_findings`
sets the folklore about over-fitting and forgetting against them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench import stats
from bench import verdict as verdicts
from bench.verdict import Claim, Finding


def task_of(record: dict) -> str:
    """The suite a record's section belongs to (``docvqa`` for ``docvqa@n250``)."""
    return record.get("task") or record["suite"]


def regime_of(record: dict) -> dict:
    return record.get("regime") or {}


def controls_of(records: list[dict]) -> list[str]:
    """Control suites the cell records of one section were scored on, in first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        if r.get("kind") == "cell":
            names.update(dict.fromkeys(r.get("control") or {}))
    return list(names)


def base_control(records: list[dict], control: str) -> float | None:
    for r in records:
        if r.get("kind") == "base" and r.get("status") == "ok":
            entry = (r.get("control") or {}).get(control)
            if entry:
                return float(entry["score"])
    return None


def control_draws(v: verdicts.SuiteVerdict, control: str, n_boot: int = stats.N_BOOT) -> stats.Draws | None:
    """Bootstrap draws of each cell's control score (cells at their validation-chosen rate)."""
    groups = {}
    for c in v.cells:
        entries = [(r.get("control") or {}).get(control) for r in c.runs]
        if entries and all(e and e.get("items") for e in entries):
            groups[c.key] = [{"seed": r.get("seed"), "control_items": e["items"]} for r, e in zip(c.runs, entries)]
    scores = stats.matrices(groups, "control_items")
    return stats.bootstrap(scores, n_boot) if scores else None


def pareto_front(points: dict) -> set:
    """Keys not dominated on (gain: higher, forgetting: lower), by Optuna's own non-dominated sort."""
    import optuna
    from optuna.distributions import IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    keys = [k for k, (g, f) in points.items() if not (math.isnan(g) or math.isnan(f))]
    if not keys:
        return set()
    study = optuna.create_study(directions=["maximize", "minimize"])
    distribution = {"i": IntDistribution(0, max(len(keys) - 1, 1))}
    study.add_trials([optuna.trial.create_trial(params={"i": i}, distributions=distribution, values=list(points[k]))
                      for i, k in enumerate(keys)])
    return {keys[t.params["i"]] for t in study.best_trials}


@dataclass
class Forgetting:
    section: str
    control: str
    base_control: float
    base_test: float | None
    frame: pd.DataFrame  # one row per cell: gain, control score, forgetting (each with its 95% interval), on the front
    findings: list[Finding]


FORGETTING_CLAIMS = (
    Claim("tuning the vision encoder forgets", "MiniCPM-V: keep the vision encoder frozen when images resemble "
          "pretraining (over-fitting)", "vision", "resampler+vpm", "frozen"),
    Claim("LoRA forgets less than full training of the encoder", "LoRA \"learns less and forgets less\" (Biderman et al.)",
          "vision", "vpm-lora", "resampler+vpm"),
)
# on a section's own test score: does training the vision encoder beat leaving it frozen?
OVERFIT_CLAIM = Claim("tuning the vision encoder over-fits", "MiniCPM-V: tuning the vision encoder on images like "
                      "pretraining risks over-fitting", "vision", "resampler+vpm", "frozen")


def forgetting(v: verdicts.SuiteVerdict, records: list[dict], margin: float = stats.MARGIN) -> list[Forgetting]:
    """One table per control suite a section's runs were scored on."""
    out = []
    bases = verdicts.base_scores(records)
    base_test = bases.get(v.suite, (None, None))[1]
    for control in controls_of(records):
        base = base_control(records, control)
        draws = control_draws(v, control)
        if base is None or draws is None:
            continue
        rows, points = [], {}
        for c in v.cells:
            if c.key not in draws.keys:
                continue
            score, lo, hi = draws.interval(c.key)
            test = v.test.interval(c.key) if v.test is not None and c.key in v.test.keys else (c.test, math.nan, math.nan)
            gain = tuple(x - base_test for x in test) if base_test is not None else (math.nan,) * 3
            lost = (base - score, base - hi, base - lo)
            points[c.key] = (gain[0], lost[0])
            rows.append({"key": c.key, "cell": verdicts.cell_name(c.key), "lr": c.lr, "seeds": c.seeds,
                         "gain": gain[0], "gain_low": gain[1], "gain_high": gain[2],
                         "control": score, "control_low": lo, "control_high": hi,
                         "forgetting": lost[0], "forgetting_low": lost[1], "forgetting_high": lost[2]})
        front = pareto_front(points)
        frame = pd.DataFrame(rows)
        frame["pareto"] = [k in front for k in frame.key]
        keys = list(points)
        findings = [verdicts.contrast(draws, keys, claim, margin) for claim in FORGETTING_CLAIMS]
        out.append(Forgetting(v.suite, control, base, base_test, frame, findings))
    return out


def _interval(x: float, lo: float, hi: float, signed: bool = True) -> str:
    fmt = "+.3f" if signed else ".3f"
    if math.isnan(lo):
        return f"{x:{fmt}}"
    return f"{x:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def png_name(section: str, control: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in f"{section}-{control}")
    return f"forgetting-{safe}.png"


def forgetting_png(f: Forgetting, metric: str) -> bytes:
    """Gain against forgetting, one point per cell with its intervals; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = f.frame
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for on_front, colour in ((False, "#9aa5b1"), (True, "#c0392b")):
        part = frame[frame.pareto == on_front]
        if part.empty:
            continue
        xerr = np.nan_to_num(np.vstack([part.forgetting - part.forgetting_low, part.forgetting_high - part.forgetting]))
        yerr = np.nan_to_num(np.vstack([part.gain - part.gain_low, part.gain_high - part.gain]))
        ax.errorbar(part.forgetting, part.gain, xerr=xerr, yerr=yerr, fmt="o", color=colour, ecolor=colour, alpha=0.85,
                    capsize=2, label="Pareto front" if on_front else "dominated")
        for _, row in part.iterrows():
            ax.annotate(row.cell, (row.forgetting, row.gain), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = frame[frame.pareto].sort_values("forgetting")
    if len(front) > 1:
        ax.plot(front.forgetting, front.gain, "-", color="#c0392b", lw=1)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(f"forgetting on {f.control} (base {f.base_control:.3f} minus the cell's; lower is better)")
    ax.set_ylabel(f"gain on {f.section} test {metric} over the base model")
    ax.set_title(f"{f.section}: gain against forgetting (95% intervals over items and seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def forgetting_lines(f: Forgetting, metric: str) -> list[str]:
    table = pd.DataFrame({
        "cell": f.frame.cell,
        "lr": [f"{x:.2g}" for x in f.frame.lr],
        "seeds": f.frame.seeds,
        f"gain (test {metric})": [_interval(*x) for x in zip(f.frame.gain, f.frame.gain_low, f.frame.gain_high)],
        f"control {f.control}": [_interval(*x, signed=False) for x in zip(f.frame.control, f.frame.control_low, f.frame.control_high)],
        "forgetting": [_interval(*x) for x in zip(f.frame.forgetting, f.frame.forgetting_low, f.frame.forgetting_high)],
        "Pareto front": ["yes" if x else "" for x in f.frame.pareto],
    })
    lines = [f"### Gain against forgetting (control: {f.control}, base model {f.base_control:.3f})", "",
             "*gain*: the cell's test score minus the base model's; *forgetting*: the base model's control score minus "
             "the cell's (positive: the cell lost ability the base model had). 95% intervals over control items and seeds. "
             "*Pareto front*: no other cell gains more while forgetting less (Optuna's non-dominated sort).", "",
             table.to_markdown(index=False, disable_numparse=True), "", f"![gain against forgetting]({png_name(f.section, f.control)})", ""]
    rows = [_finding_row(x, f.section, f"control {f.control}") for x in f.findings if x.comparison is not None]
    if rows:
        lines += ["**Forgetting findings** (difference of control scores; positive: the first forgets less)", "",
                  pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]
    return lines


def _finding_row(x: Finding, section: str, on: str) -> dict:
    return {"claim": x.claim.name, "section": section, "on": on, "contrast": f"{x.claim.a} - {x.claim.b}",
            "pairs": x.pairs, "difference": f"{x.comparison.diff:+.3f}",
            "95% CI": f"[{x.comparison.low:+.3f}, {x.comparison.high:+.3f}]", "seeds": x.comparison.seeds,
            "verdict": x.comparison.verdict}


def regime_findings(judged: dict[str, verdicts.SuiteVerdict], records: list[dict], margin: float = stats.MARGIN) -> pd.DataFrame:
    """For every section: the vision encoder against frozen on its own test score (over-fitting), and
    on each control (forgetting), plus LoRA inside the encoder against full training on each control."""
    rows = []
    by_section = {}
    for r in records:
        by_section.setdefault(r["suite"], []).append(r)
    for section, v in sorted(judged.items(), key=lambda kv: (task_of(by_section[kv[0]][0]), _size(by_section[kv[0]]))):
        if v.test is None:
            continue
        keys = [c.key for c in v.cells if c.key in v.test.keys]
        x = verdicts.contrast(v.test, keys, OVERFIT_CLAIM, margin)
        if x.comparison is not None:
            rows.append(_finding_row(x, section, "test"))
        for f in forgetting(v, by_section[section], margin):
            rows += [_finding_row(y, section, f"control {f.control}") for y in f.findings if y.comparison is not None]
    return pd.DataFrame(rows)


def _size(records: list[dict]) -> int:
    return int(regime_of(records[0]).get("train_items") or 0)


def regimes_table(judged: dict[str, verdicts.SuiteVerdict], records: list[dict]) -> dict[str, pd.DataFrame]:
    """Suite -> cells x training-set sizes (test score [95% interval], each at its own chosen rate)."""
    sections: dict[str, list[tuple[int, str]]] = {}
    for r in records:
        if regime_of(r).get("train_items"):
            sections.setdefault(task_of(r), [])
            entry = (int(r["regime"]["train_items"]), r["suite"])
            if entry not in sections[task_of(r)]:
                sections[task_of(r)].append(entry)
    out = {}
    for task, levels in sections.items():
        columns = {}
        for n, section in sorted(levels):
            v = judged.get(section)
            if v is None:
                continue
            col = {}
            for c in v.cells:
                test = v.test.interval(c.key) if v.test is not None and c.key in v.test.keys else (c.test, math.nan, math.nan)
                col[verdicts.cell_name(c.key)] = _interval(*test, signed=False)
            columns[f"{n} items"] = col
        if columns:
            out[task] = pd.DataFrame(columns)
    return out
