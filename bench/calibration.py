"""How much each vision policy gains over ``frozen`` as a function of how far data is from pretraining,
and how well that rule decides, checked against every rule that needs no calibration.

Two axes of distance, both symmetric MMD^2 from the model's pretraining sample (bench.similarity):
*visual* in the vision encoder's features of the images, *task* in the LLM's token embeddings of the
questions and answers. Images alone cannot see a task shift (shapes-shift is the farthest suite in
pixels, yet asks the pretraining questions), and text alone cannot see new images.

The gain of a policy at a point is a kernel-weighted mean of the benchmarked suites' gains (Gaussian
kernel, one bandwidth per axis). Each bandwidth is chosen by leave-one-suite-out error of the
predicted gains from a grid that includes "infinite" (the axis is ignored) and, with both infinite,
the plain mean over suites: a constant rule. So the calibration uses an axis only where it predicted
held-out suites better, which is also what the report calls the axis that mattered; and no anchor
is assumed (the suite nearest pretraining is measured like every other).

:func:`validate` hides each suite (or each family of graded suites) in turn, decides its policy from
the rest, bandwidths included, and scores the decision by regret on the hidden suite's test split:
its validation-chosen best cell minus the validation-best cell of the decided policy. The same is
done for each constant rule ("always frozen", ...) and for "copy the nearest suite's best policy".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.errors import BenchError

MIN_GAIN = 0.01  # one point: a smaller gain does not pay for more memory or less throughput
POLICY_ORDER = ("frozen", "resampler", "vpm-lora", "resampler+vpm", "minicpmv-recipe")
AXES = ("visual", "task")
BANDWIDTH_SCALES = (0.05, 0.1, 0.2, 0.4, 0.8)  # times the axis's range over the suites; plus infinity
BOOTSTRAPS = 2000
NEAREST = "nearest suite's best"


def point(visual, task=None) -> tuple[float, float | None]:
    """(visual, task) coordinates from two Comparisons; a distance not told apart from pretraining
    (p >= 0.05) is 0, an unmeasured task distance None."""
    def axis(c):
        return None if c is None else (0.0 if c.same else max(c.mmd2, 0.0))
    return axis(visual), axis(task)


def coordinates(ev) -> tuple[float, float | None]:
    """A suite's (visual, task) distance from pretraining."""
    return point(ev.distance, getattr(ev, "task_distance", None))


@dataclass
class Calibration:
    """Gain of each policy over frozen at a (visual, task) distance, and what each policy costs."""

    points: list[tuple[str, tuple[float, float], dict[str, float]]]  # (suite, (visual, task), gains)
    cost: dict[str, tuple[float, float]]  # policy -> (mean MiB of the evidence's memory figure, mean train samples/s)
    bandwidth: tuple[float, float] = (math.inf, math.inf)  # per axis; inf: the axis does not enter
    residual: float = math.nan  # leave-one-suite-out RMS error of the predicted gains (the calibration's spread)

    def kernel(self, at, skip: int | None = None) -> np.ndarray:
        """Weights of the points at ``at`` (a visual distance, or (visual, task))."""
        v, t = (at, 0.0) if np.isscalar(at) else (at[0], at[1] if at[1] is not None else 0.0)
        log_w = np.zeros(len(self.points))
        for axis, (x, h) in enumerate(zip((v, t), self.bandwidth)):
            if math.isfinite(h):
                coords = np.array([p[1][axis] for p in self.points])
                log_w -= 0.5 * ((coords - x) / h) ** 2
        w = np.exp(log_w - log_w.max())
        if skip is not None:
            w[skip] = 0.0
        return w

    def gain(self, policy: str, at, skip: int | None = None) -> float:
        w = self.kernel(at, skip)
        pairs = [(wi, g[policy]) for wi, (_, _, g) in zip(w, self.points) if policy in g and wi > 0]
        total = sum(wi for wi, _ in pairs)
        return float(sum(wi * gi for wi, gi in pairs) / total) if total > 0 else math.nan

    def policies(self) -> list[str]:
        present = {p for _, _, g in self.points for p in g}
        return [p for p in POLICY_ORDER if p in present] + sorted(present - set(POLICY_ORDER))

    def axes(self) -> list[str]:
        """The axes that enter the prediction (those with a finite bandwidth)."""
        return [a for a, h in zip(AXES, self.bandwidth) if math.isfinite(h)]

    def decide(self, at, allowed: set[str] | None = None) -> str:
        """The cheapest policy whose predicted gain is within MIN_GAIN of the best predicted gain."""
        gains = {p: self.gain(p, at) for p in self.policies() if (allowed is None or p in allowed) and p in self.cost}
        gains = {p: g for p, g in gains.items() if not math.isnan(g)}
        if not gains:
            raise BenchError("no vision policy has both measured gains and costs; benchmark frozen and at least one other policy")
        top = max(gains.values())
        return min((p for p, g in gains.items() if g >= top - MIN_GAIN), key=lambda p: (self.cost[p][0], -self.cost[p][1]))

    def distinguishable(self, at) -> bool:
        """Whether the best predicted policy beats the worst by more than the calibration's own error."""
        gains = [g for g in (self.gain(p, at) for p in self.policies()) if not math.isnan(g)]
        return len(gains) > 1 and math.isfinite(self.residual) and max(gains) - min(gains) > 2 * self.residual

    def threshold(self, policy: str, task: float = 0.0) -> float | None:
        """Smallest visual distance (at task distance ``task``) at which ``policy`` gains MIN_GAIN over every cheaper policy."""
        cheaper = [p for p in self.policies() if p in self.cost and self.cost[p][0] < self.cost.get(policy, (math.inf,))[0]]
        far = max(x[0] for _, x, _ in self.points) * 1.25 or 1.0
        for d in np.linspace(0, far, 501):
            if self.gain(policy, (d, task)) - max([self.gain(p, (d, task)) for p in cheaper] + [0.0]) >= MIN_GAIN:
                return float(d)
        return None

    def weights(self, at) -> dict[str, float]:
        """Each suite's share of the prediction at ``at`` (for picking a configuration within the policy)."""
        w = self.kernel(at)
        return {suite: float(wi / w.sum()) for wi, (suite, _, _) in zip(w, self.points)}


def _loo_error(cal: Calibration) -> float:
    """RMS error of each suite's gains predicted from the other suites (frozen, always 0, left out)."""
    errors = [cal.gain(p, x, skip=i) - g[p] for i, (_, x, g) in enumerate(cal.points) for p in g if p != "frozen"]
    errors = [e for e in errors if not math.isnan(e)]
    return float(np.sqrt(np.mean(np.square(errors)))) if errors else math.nan


def calibrate(evidence: list, axes: tuple[str, ...] = AXES) -> Calibration:
    """Points from the suites with a frozen baseline and a measured distance; bandwidths by leave-one-suite-out
    error over a grid, smoothest first (a sharper bandwidth must predict strictly better). ``axes``: the
    axes allowed to enter (the task axis is off when any suite, or the user's data, lacks a task distance)."""
    located = [ev for ev in evidence if ev.distance is not None and ev.gains]
    if not located:
        raise BenchError("no benchmarked suite has both a frozen baseline and another vision policy; "
                         "benchmark --vision frozen plus the policies to compare")
    coords = [coordinates(ev) for ev in located]
    use_task = "task" in axes and all(t is not None for _, t in coords)
    points = [(ev.suite, (v, t if use_task else 0.0), ev.gains) for ev, (v, t) in zip(located, coords)]
    policies = {p for ev in located for p in ev.gains}
    cost = {}
    for policy in policies:
        rows = pd.concat([ev.configs[ev.configs.vision == policy] for ev in evidence])
        if len(rows):
            cost[policy] = (float(rows.mem_mib.mean()), float(rows.train_samples_per_s.mean()))
    grids = []
    for axis, name in enumerate(AXES):
        span = max(p[1][axis] for p in points)
        usable = name in axes and span > 0 and (name == "visual" or use_task)
        grids.append([math.inf] + ([span * s for s in reversed(BANDWIDTH_SCALES)] if usable else []))
    best = None
    for hv in grids[0]:
        for ht in grids[1]:
            cal = Calibration(points, cost, (hv, ht))
            err = _loo_error(cal)
            if best is None or (not math.isnan(err) and (math.isnan(best.residual) or err < best.residual - 1e-9)):
                cal.residual = err
                best = cal
    return best


# ------------------------------------------------------------------------------------- validation


def regret(ev, policy: str) -> float:
    """Test score of the hidden suite's validation-best cell minus that of ``policy``'s validation-best cell
    (NaN when the policy was not benchmarked there)."""
    own = ev.configs[ev.configs.vision == policy].sort_values("val", ascending=False, kind="stable")
    return float(ev.best.score - own.iloc[0].score) if len(own) else math.nan


def validate(evidence: list, between: dict[tuple[str, str], float] | None = None,
             families: dict[str, str] | None = None, axes: tuple[str, ...] = AXES,
             cost: dict[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """One row per (held-out unit, suite, rule): the decided policy, whether it is in the suite's confidence
    set of the best, its regret and memory. Units are single suites (``leave-one-suite-out``) and, when
    ``families`` groups several suites, whole families (``leave-one-family-out``). ``between``: symmetric
    suite-to-suite distance, for the nearest-suite rule. ``cost``: the policies' costs the real decision
    uses (the user's model under ``--estimate-for``), so the held-out decisions break ties the same way."""
    located = [ev for ev in evidence if ev.distance is not None and ev.gains]
    families = families or {}
    schemes = [("leave-one-suite-out", [[ev] for ev in located])]
    groups: dict[str, list] = {}
    for ev in located:
        groups.setdefault(families.get(ev.suite, ev.suite), []).append(ev)
    if any(len(g) > 1 for g in groups.values()):
        schemes.append(("leave-one-family-out", list(groups.values())))
    policies = [p for p in POLICY_ORDER if any(p in ev.gains for ev in located)]
    rows = []
    for scheme, units in schemes:
        for unit in units:
            others = [ev for ev in located if all(ev is not u for u in unit)]
            if len(others) < 2:
                continue
            cal = calibrate(others, axes)
            if cost is not None:
                cal.cost = {p: cost[p] for p in cal.cost if p in cost}
            for ev in unit:
                at = coordinates(ev)
                decided = {"recommender": cal.decide(at)}
                decided.update({f"always {p}": p for p in policies})
                if between:
                    near = min(others, key=lambda o: between.get((ev.suite, o.suite), math.inf))
                    decided[NEAREST] = near.best.vision
                for rule, policy in decided.items():
                    mem = ev.configs[ev.configs.vision == policy].mem_mib
                    rows.append({"scheme": scheme, "suite": ev.suite, "rule": rule, "decided": policy,
                                 "correct": policy in ev.acceptable, "regret": regret(ev, policy),
                                 "mem_mib": float(mem.mean()) if len(mem) else math.nan,
                                 "axes": ("+".join(cal.axes()) or "none") if rule == "recommender" else ""})
    return pd.DataFrame(rows)


def regret_table(rows: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per scheme and rule: mean regret over held-out suites with a 95% bootstrap interval (suites resampled),
    and the recommender's regret minus the rule's on the same suites, with its interval and verdict."""
    out = []
    rng = np.random.default_rng(seed)
    for scheme, part in rows.groupby("scheme", sort=False):
        wide = part.pivot_table(index="suite", columns="rule", values="regret", sort=False)
        correct = part.pivot_table(index="suite", columns="rule", values="correct", sort=False)
        memory = part.pivot_table(index="suite", columns="rule", values="mem_mib", sort=False)
        wide = wide.dropna()  # suites where every rule's policy was benchmarked
        n = len(wide)
        if n == 0:
            continue
        draws = rng.integers(0, n, (BOOTSTRAPS, n))
        mine = wide["recommender"].to_numpy()
        for rule in wide.columns:
            r = wide[rule].to_numpy()
            boot = r[draws].mean(1)
            row = {"scheme": scheme, "rule": rule, "suites": n, "mean regret": r.mean(),
                   "95% CI": _interval(boot), "in best set": f"{int(correct.loc[wide.index, rule].sum())}/{n}",
                   "mean MiB": float(memory.loc[wide.index, rule].mean())}
            if rule != "recommender":
                diff = (mine - r)[draws].mean(1)
                lo, hi = np.quantile(diff, [0.025, 0.975])
                row["recommender - rule"] = f"{(mine - r).mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"
                row["verdict"] = "recommender lower" if hi < 0 else ("rule lower" if lo > 0 else
                                                                      "not shown different")
            out.append(row)
    return pd.DataFrame(out)


def _interval(boot: np.ndarray) -> str:
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return f"[{lo:.4f}, {hi:.4f}]"
