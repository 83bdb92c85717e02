"""Racing: the sound protocol (each cell at its best rate, >= 3 seeds where the verdict needs them) at
a fraction of the exhaustive protocol's training steps.

The exhaustive protocol trains every cell x learning rate x seed to the end. Racing spends steps only
where they can change the verdict, in two stages, each decided on validation only:

1. **Learning rates, successive halving** (Hyperband's rung, with continuation): with the first seed,
   every rate of a cell trains to the rung (half the steps, a validation checkpoint the full run has
   anyway) and pauses; the rate with the best validation score there resumes to the end, the others
   stop ("raced out"). A resumed run is the uninterrupted run, step for step: the paused state
   (trainable weights, optimizer, schedule, random generators) is saved and loaded back.
2. **Seeds, racing** (F-Race's idea): every cell has run its chosen rate with the first seed; each
   further seed runs only for the cells still in the confidence set of the best
   (:func:`bench.stats.best_set` over validation, items and the seeds run so far resampled). A cell
   leaves once it is shown worse than another, and keeps the seeds it has. After one seed, seed noise
   is not measured yet, so a cell leaves only when item noise alone rules it out at :data:`FIRST_ALPHA`
   (a stricter level than the final 95%), which keeps a cell that one lucky or unlucky seed moved.

:func:`plan` is a pure function of the records so far: the same records give the same next runs, so
workers on several machines agree, an interrupted race resumes where it stopped, and
``python -m bench.perf --only racing`` replays it over an exhaustive run's records to count what it saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench import stats
from bench.space import Cell

RUNG = 0.5  # fraction of the steps at which the learning rates of a cell are compared
MIN_SEEDS = 2  # every cell runs this many seeds before any leaves: one seed cannot measure seed noise
ALPHA = stats.ALPHA  # a cell leaves the race when it leaves the report's 95% confidence set


def survivors_at_rung(n_rates: int) -> int:
    """Rates that go on past the rung: the better half, and never fewer than two. A rung cannot pick
    the final winner: higher rates trail at half the steps and overtake later (short-horizon bias;
    on docvqa, LoRA 1e-2 trailed 3e-3 at step 200 in 9 of 10 cells that train the vision side, and
    won at step 400 in 6 of them), so the rung only drops rates already far behind (collapsed ones)."""
    return max(2, math.ceil(n_rates / 2))


def rung_step(steps: int) -> int:
    return max(1, round(steps * RUNG))


@dataclass(frozen=True)
class Job:
    """One run to execute: ``until`` is the rung step for a rate's first leg, None for a run to the end
    (a rung winner resumes from its paused state, a later seed starts fresh)."""

    cell: Cell
    lr: float
    seed: int
    until: int | None = None


@dataclass(frozen=True)
class Exit:
    """A cell that left the race: after how many seeds, its validation interval then and the best's."""

    cell: Cell
    seeds: int
    steps: int  # training steps spent on the cell in total
    val: tuple[float, float, float]  # mean, 95% interval low, high (validation, at the round it left)
    best: tuple[float, float, float]
    best_cell: Cell


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)  # runnable now (everything they depend on is known)
    stops: list[Job] = field(default_factory=list)  # paused rung runs whose rate lost: record them as raced out
    chosen: dict[Cell, float] = field(default_factory=dict)  # each cell's winning rate, once its rung is decided
    exits: list[Exit] = field(default_factory=list)
    alive: list[Cell] = field(default_factory=list)  # cells still in the race after the last decided round
    round: int = 0  # seeds decided so far (0: the learning-rate stage is not finished)
    expected_steps: int = 0  # training steps the race will have spent at most, given what is known now
    spent_steps: int = 0
    exhaustive_steps: int = 0

    @property
    def finished(self) -> bool:
        return not self.jobs and not self.stops


def _lookup(records: list[dict]) -> dict:
    out = {}
    for r in records:
        if r.get("kind") != "cell" or not r.get("cell"):
            continue
        out[(Cell.from_dict(r["cell"]), float(r["train"]["lr"]), r["seed"])] = r
    return out


TERMINAL = ("ok", "diverged", "failed", "oom")  # a run to the end that needs no more work (failed: see Worker)


def _rung_score(record: dict | None, rung: int) -> float | None:
    """The validation score at the rung: -inf for a run that ended without one, None when not known yet."""
    if record is None:
        return None
    if record.get("status") in ("diverged", "failed", "oom") and not record.get("val_curve"):
        return -math.inf
    for step, score in record.get("val_curve") or []:
        if step == rung:
            return float(score)
    return -math.inf if record.get("status") in TERMINAL else None


def steps_spent(record: dict | None, steps: int) -> int:
    """Training steps a run's record accounts for (a finished run: all; a leg: those it trained)."""
    if record is None:
        return 0
    if record.get("status") == "ok":
        return steps
    return int(record.get("steps_trained") or 0)


def _pending(record: dict | None) -> bool:
    return record is None or record.get("status") not in TERMINAL


def plan(records: list[dict], cells: list[Cell], lrs: list[float], seeds: list[int], steps: int,
         min_seeds: int = MIN_SEEDS, alpha: float = ALPHA, keep: int | None = None) -> Plan:
    """What to run next, for one suite, from its records (module docstring). ``keep``: rates that go
    on past the rung (default :func:`survivors_at_rung`); ``min_seeds``, ``alpha`` and ``keep`` are
    parameters for the replays that justify their defaults."""
    runs = _lookup(records)
    keep = survivors_at_rung(len(lrs)) if keep is None else keep
    rung = rung_step(steps)
    lrs, seeds = sorted(lrs), list(seeds)
    p = Plan(exhaustive_steps=len(cells) * len(lrs) * len(seeds) * steps)
    first = seeds[0]
    racing_rates = keep < len(lrs) and rung < steps
    resumes = 0  # rung winners that continue from their pause

    # stage 1: learning rates, with the first seed
    for cell in cells:
        if not racing_rates:  # one rate, or too few steps for a rung: every rate runs to the end
            full = {lr: runs.get((cell, lr, first)) for lr in lrs}
            pending = [lr for lr, r in full.items() if _pending(r)]
            if pending:
                p.jobs += [Job(cell, lr, first) for lr in pending]
                continue
            scores = {lr: r["val_score"] for lr, r in full.items() if r["status"] == "ok"}
            p.chosen[cell] = max(sorted(scores), key=scores.get) if scores else None
            continue
        scores = {lr: _rung_score(runs.get((cell, lr, first)), rung) for lr in lrs}
        missing = [lr for lr, s in scores.items() if s is None]
        if missing:
            p.jobs += [Job(cell, lr, first, until=rung) for lr in missing]
            continue
        ranked = sorted(lrs, key=lambda lr: (-scores[lr], lr))  # ties: the lower rate
        survivors = [lr for lr in ranked[:keep] if scores[lr] > -math.inf]
        p.stops += [Job(cell, lr, first, until=rung) for lr in lrs
                    if lr not in survivors and (runs.get((cell, lr, first)) or {}).get("status") == "paused"]
        pending = []
        for lr in survivors:
            r = runs.get((cell, lr, first))
            if _pending(r):
                pending.append(Job(cell, lr, first))
                resumes += (r or {}).get("status") == "paused"
        if pending:
            p.jobs += pending
            continue
        final = {lr: runs[(cell, lr, first)]["val_score"] for lr in survivors if runs[(cell, lr, first)]["status"] == "ok"}
        p.chosen[cell] = max(sorted(final), key=final.get) if final else None  # None: the cell has no result

    p.spent_steps = sum(steps_spent(r, steps) for r in runs.values())
    undecided = [c for c in cells if c not in p.chosen]
    stage1_left = sum(rung if j.until else steps for j in p.jobs) - resumes * rung + len(undecided) * (steps - rung) * racing_rates
    if p.jobs or undecided:
        p.expected_steps = p.spent_steps + stage1_left + len(cells) * (len(seeds) - 1) * steps
        p.alive = list(cells)
        return p

    # stage 2: seeds, racing the cells that could still be the best
    alive = [c for c in cells if p.chosen.get(c) is not None and runs[(c, p.chosen[c], first)].get("status") == "ok"]
    for k in range(1, len(seeds) + 1):
        p.round = k
        group = {c: [runs[(c, p.chosen[c], s)] for s in seeds[:k]] for c in alive}
        group = {c: [r for r in rs if r.get("status") == "ok"] for c, rs in group.items()}
        group = {c: rs for c, rs in group.items() if rs}
        if len(group) > 1 and min_seeds <= k < len(seeds):
            scores = stats.matrices(group, "val_items")  # records without per-item scores cannot be judged: they stay
            if len(scores) > 1:
                val = stats.bootstrap(scores)
                keep = stats.best_set(val, alpha) | (set(alive) - set(val.keys))
                best = max(val.keys, key=lambda c: val.point[val.index(c)])
                for c in alive:
                    if c not in keep:
                        spent = sum(steps_spent(r, steps) for (cc, _, _), r in runs.items() if cc == c)
                        p.exits.append(Exit(c, k, spent, val.interval(c), val.interval(best), best))
                alive = [c for c in alive if c in keep]
        if k == len(seeds):
            break
        nxt = seeds[k]
        todo = [c for c in alive if _pending(runs.get((c, p.chosen[c], nxt)))]
        if todo:
            p.jobs = [Job(c, p.chosen[c], nxt) for c in todo]
            p.alive = alive
            p.expected_steps = p.spent_steps + len(todo) * steps + len(alive) * (len(seeds) - k - 1) * steps
            return p
        alive = [c for c in alive if runs[(c, p.chosen[c], nxt)].get("status") == "ok"]
    p.alive = alive
    p.expected_steps = p.spent_steps
    p.round = len(seeds)
    return p


# ------------------------------------------------------------------------------------------ replay


@dataclass
class Replay:
    records: list[dict]  # what the race would have recorded
    steps: int  # training steps it would have spent
    exhaustive_steps: int
    runs: int  # jobs it would have executed (a rung leg and its continuation count once each)
    last: Plan


def replay(records: list[dict], cells: list[Cell], lrs: list[float], seeds: list[int], steps: int, **kw) -> Replay:
    """Run the race over an exhaustive run's records instead of training: each job takes the record
    the exhaustive run made for it (a rung leg takes its first half: validation up to the rung). Exact
    because a paused-and-resumed run is the uninterrupted run, and every choice reads validation only."""
    full = _lookup(records)
    known: dict = {}
    spent = jobs = 0
    while True:
        p = plan([*known.values(), *(r for r in records if r.get("kind") == "base")], cells, lrs, seeds, steps, **kw)
        if p.finished:
            break
        for j in p.stops:
            known[(j.cell, j.lr, j.seed)] = {**known[(j.cell, j.lr, j.seed)], "status": "raced"}
        for j in p.jobs:
            source = full.get((j.cell, j.lr, j.seed))
            if source is None:
                raise ValueError(f"the records lack {j.cell.name} lr {j.lr:g} seed {j.seed}; replay needs an exhaustive run")
            before = known.get((j.cell, j.lr, j.seed))
            jobs += 1
            if j.until is not None:
                spent += j.until
                known[(j.cell, j.lr, j.seed)] = {k: v for k, v in source.items() if k not in ("items", "val_items", "score", "val_score")} | {
                    "status": "paused", "steps_trained": j.until,
                    "val_curve": [c for c in source.get("val_curve") or [] if c[0] <= j.until]}
            else:
                spent += steps - (before or {}).get("steps_trained", 0) if (before or {}).get("status") == "paused" else steps
                known[(j.cell, j.lr, j.seed)] = source
    return Replay(list(known.values()), spent, p.exhaustive_steps, jobs, p)
