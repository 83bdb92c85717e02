"""Racing (bench/race.py): which runs it asks for, and that it reaches the exhaustive protocol's
verdict on fewer steps (replayed over records, as ``python -m bench.perf --only racing`` does)."""

import math

from bench import race, verdict
from bench.space import Cell
from tests.test_report import BASE, record

LRS = [1e-3, 3e-3, 1e-2]
STEPS = 10  # the helper's records say 10 steps: the rung is step 5
CELLS = [Cell(t, 8, 16.0, v) for t in ("qk", "qv") for v in ("frozen", "resampler")]


def run(targets, vision, seed, lr, rung_val, val, score=None):
    r = record(targets, vision, seed, score if score is not None else val, lr=lr, val=val, n=200)
    return {**r, "val_curve": [[5, rung_val], [10, r["val_score"]]], "steps_trained": STEPS}


def exhaustive(levels, wobble=0.01):
    """Every cell x rate x seed: ``levels[(targets, vision)]`` is the cell's score at 3e-3; 1e-2 trails at
    the rung but ends best for the resampler cells (short-horizon bias); 1e-3 is poor everywhere."""
    out = [BASE]
    for (targets, vision), level in levels.items():
        for seed in range(3):
            jitter = wobble * (seed - 1)
            late = 0.05 if vision == "resampler" else -0.05
            out += [run(targets, vision, seed, 1e-3, 0.05, max(0.0, level - 0.3)),
                    run(targets, vision, seed, 3e-3, level - 0.1, level + jitter),
                    run(targets, vision, seed, 1e-2, level - 0.2, min(1.0, level + late + jitter))]
    return out


def test_first_every_rate_of_every_cell_runs_to_the_rung_with_the_first_seed():
    p = race.plan([BASE], CELLS, LRS, [0, 1, 2], STEPS)
    assert {(j.cell, j.lr, j.seed, j.until) for j in p.jobs} == {(c, lr, 0, 5) for c in CELLS for lr in LRS}
    assert p.round == 0 and not p.stops and p.expected_steps <= p.exhaustive_steps


def test_at_the_rung_the_trailing_rate_stops_and_the_better_two_go_on():
    cell = CELLS[0]
    paused = [{**run("qk", "frozen", 0, lr, s, 0.0), "status": "paused", "steps_trained": 5, "val_curve": [[5, s]]}
              for lr, s in ((1e-3, 0.1), (3e-3, 0.5), (1e-2, 0.4))]
    p = race.plan(paused, [cell], LRS, [0, 1, 2], STEPS)
    assert [(j.lr, j.until) for j in p.stops] == [(1e-3, 5)]
    assert sorted((j.lr, j.until) for j in p.jobs) == [(3e-3, None), (1e-2, None)]


def test_a_rate_that_trails_at_the_rung_but_ends_best_is_chosen():
    records = exhaustive({("qk", "resampler"): 0.6})
    rep = race.replay(records, [Cell("qk", 8, 16.0, "resampler")], LRS, [0, 1, 2], STEPS)
    (cell,) = verdict.choose_rates(rep.records).values()
    assert cell.lr == 1e-2 and cell.seeds == 3 and cell.edge  # the top of the grid
    assert cell.by_rate[1e-3][1] == 0 and math.isnan(cell.by_rate[1e-3][0])  # stopped at the rung


def test_replay_reaches_the_exhaustive_verdict_on_fewer_steps():
    levels = {("qk", "frozen"): 0.2, ("qv", "frozen"): 0.25, ("qk", "resampler"): 0.7, ("qv", "resampler"): 0.71}
    records = exhaustive(levels)
    rep = race.replay(records, CELLS, LRS, [0, 1, 2], STEPS)
    full, raced = verdict.judge(records)["docvqa"], verdict.judge(rep.records + [BASE])["docvqa"]
    assert raced.best.key == full.best.key and raced.best_set == full.best_set
    assert {e.cell.vision for e in rep.last.exits} == {"frozen"}  # shown worse after two seeds: no third
    assert all(e.seeds == race.MIN_SEEDS for e in rep.last.exits)
    # per cell: 3 rungs of 5 + 2 continuations of 5, then seed 1; seed 2 for the two resampler cells only
    assert rep.steps == 4 * (3 * 5 + 2 * 5) + 4 * STEPS + 2 * STEPS < rep.exhaustive_steps == 4 * 3 * 3 * STEPS
    assert rep.last.finished and rep.last.spent_steps == rep.steps
    assert {verdict.cell_name(c.key): c.seeds for c in raced.cells}["qk-r8-a16-frozen"] == 2


def test_the_race_spends_its_oracle_floor_plus_the_second_seed_of_the_cells_that_left():
    from bench.perf.racing import floor

    levels = {("qk", "frozen"): 0.2, ("qv", "frozen"): 0.25, ("qk", "resampler"): 0.7, ("qv", "resampler"): 0.71}
    records = exhaustive(levels)
    rep = race.replay(records, CELLS, LRS, [0, 1, 2], STEPS)
    n_set = len(verdict.judge(records)["docvqa"].best_set)
    assert n_set == 2
    assert floor(4, n_set, 3, 3, STEPS, None) == 4 * STEPS + 2 * 2 * STEPS  # rates known: one run, then the set's seeds
    assert floor(4, n_set, 3, 3, STEPS, 1) == 4 * (3 * 5 + 5) + 2 * 2 * STEPS
    assert rep.steps == floor(4, n_set, 3, 3, STEPS, race.survivors_at_rung(3)) + len(rep.last.exits) * STEPS


def test_one_rate_and_one_seed_is_the_plain_matrix():
    p = race.plan([BASE], CELLS, [1e-3], [0], STEPS)
    assert {(j.cell, j.until) for j in p.jobs} == {(c, None) for c in CELLS}


def test_a_failed_leg_counts_as_finished_so_the_race_goes_on():
    """A run that raised is recorded (and retried when the command starts again, bench/study.py); within
    one process the plan must not ask for it again, or the race would never end."""
    cell = CELLS[0]
    legs = [{**run("qk", "frozen", 0, lr, s, 0.0), "status": "paused", "steps_trained": 5, "val_curve": [[5, s]]}
            for lr, s in ((3e-3, 0.5), (1e-2, 0.4))]
    failed = {**run("qk", "frozen", 0, 1e-3, 0.0, 0.0), "status": "failed", "val_curve": [], "steps_trained": 0}
    p = race.plan([*legs, failed], [cell], LRS, [0, 1, 2], STEPS)
    assert not any(j.lr == 1e-3 for j in p.jobs) and sorted(j.lr for j in p.jobs) == [3e-3, 1e-2]
