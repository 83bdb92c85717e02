"""Per-run memory compares across runs whatever ran before in the process, tables name their figure, and
the recommender decides on the comparable figure (issue 17, defect 7)."""

import numpy as np
import pytest

from bench.recommend import build_evidence, calibrate
from bench.similarity import Comparison

SMOKE = ["--suite", "shapes", "--preset", "smoke", "--targets", "qv", "--ranks", "4", "--device", "cpu",
         "--vision", "frozen,resampler,vpm-lora,resampler+vpm", "--seeds", "0,1", "--limit", "16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs of the runner, all in this one process: resampler and resampler+vpm first (the first
    training of a process also pays one-time allocations of torch's, ~15 MiB here), then vpm-lora ->
    frozen (seed 0) and frozen -> vpm-lora (seed 1)."""
    from rich.console import Console

    from bench.cli import parser
    from bench.runner import Session, progress_bar
    from bench.spec import from_args

    out = tmp_path_factory.mktemp("order") / "out"
    spec = from_args(parser().parse_args([*SMOKE, "--out", str(out)]))
    session = Session(spec, Console(quiet=True))
    cells = {c.vision: c for c in spec.cells}
    order = [("resampler", 0), ("resampler+vpm", 0), ("vpm-lora", 0), ("frozen", 0), ("frozen", 1), ("vpm-lora", 1)]
    records = {}
    with progress_bar(session.console) as progress:
        session.prepare(progress)
        (sr,) = session.suite_runs.values()
        for vision, seed in order:
            record = session.run(sr, cells[vision], seed, progress)
            assert record["status"] == "ok", record.get("error")
            records[vision, seed] = record
    return records


def _distance(d):
    return Comparison(mmd2=d, low=d - 0.01, high=d + 0.01, p_value=0.001, kid=0, auc=0.9, early_mmd2=d, n_data=100, n_reference=100)


def _recommender_cost(records: list[dict]) -> dict[str, float]:
    """What the recommender charges each policy (MiB): its calibration's cost."""
    evidence, _ = build_evidence(records, "tiny-minicpmv")
    for ev in evidence:
        ev.distance = _distance(0.5)
    return {policy: mib for policy, (mib, _) in calibrate(evidence).cost.items()}


def test_run_order_does_not_change_how_two_cells_compare(runs):
    """vpm-lora then frozen, and frozen then vpm-lora, in one process: the recommender's memory figure
    ranks them the same way both times, and each cell reads about the same in either order."""
    after_vpm = _recommender_cost([runs["vpm-lora", 0], runs["frozen", 0]])  # frozen right after vpm-lora
    before_vpm = _recommender_cost([runs["frozen", 1], runs["vpm-lora", 1]])  # frozen first
    shown = {k: round(v, 1) for k, v in after_vpm.items()}, {k: round(v, 1) for k, v in before_vpm.items()}
    assert after_vpm["frozen"] < after_vpm["vpm-lora"] and before_vpm["frozen"] < before_vpm["vpm-lora"], shown
    gap = min(after_vpm["vpm-lora"] - after_vpm["frozen"], before_vpm["vpm-lora"] - before_vpm["frozen"])
    for policy in ("frozen", "vpm-lora"):
        assert abs(after_vpm[policy] - before_vpm[policy]) < gap / 2, shown


def test_every_run_records_the_memory_models_exact_bytes(runs, tiny):
    from bench import memory_figures
    from bench.memory_model import train_state
    from bench.train import resolve

    for (vision, seed), r in runs.items():
        assert r["memory_kind"] == "cpu_peak_rss" and r["memory_released"] is True
        assert 0 < r["peak_delta_mib"] < r["peak_mem_mib"] and r["memory_baseline_mib"] > 0
        cell = _cell(r)
        exact = train_state(tiny.model, resolve(tiny.model, tiny.roles, cell), cell)
        assert r["state_bytes"] == {k: v for k, v in exact.items() if k.endswith("_bytes")}
        assert r["state_bytes"]["grad_bytes"] == 4 * r["trainable_params"]  # fp32 on CPU
    state = {vision: memory_figures.state_mib(r) for (vision, _), r in runs.items()}
    assert state["frozen"] < state["resampler"] < state["vpm-lora"] < state["resampler+vpm"]
    assert memory_figures.state_mib(runs["frozen", 0]) == memory_figures.state_mib(runs["frozen", 1])
    figure = memory_figures.compared(list(runs.values()))
    assert figure.kind == memory_figures.CPU_TRAIN and figure.note is None
    for r in runs.values():  # never below the exact weights, gradients and AdamW state
        assert figure.mib(r) >= memory_figures.state_mib(r)


def _cell(record):
    from bench.space import Cell

    c = record["cell"]
    return Cell.from_dict(c)


def test_old_cpu_records_fall_back_to_exact_bytes_from_their_parameter_counts(runs):
    """Records made before per-run figures (no state_bytes, growth measured without releasing freed
    memory) are compared on the memory model's bytes, derived exactly from the recorded counts, with a note."""
    from bench import memory_figures

    old = [{k: v for k, v in r.items() if k not in ("state_bytes", "memory_released", "memory_baseline_mib")}
           for r in runs.values()]
    figure = memory_figures.compared(old)
    assert figure.kind == memory_figures.MODEL_STATE and "rerun the benchmark" in figure.note
    for r, o in zip(runs.values(), old):
        assert figure.mib(o) == pytest.approx(memory_figures.state_mib(r), abs=1e-9)
    assert memory_figures.measured(old).kind == memory_figures.RECORDED
    assert "depends on run order" in memory_figures.measured(old).note
    unlabelled = [{k: v for k, v in r.items() if k not in ("memory_kind", "machine", "state_bytes")} for r in old]
    assert memory_figures.compared(unlabelled).kind == memory_figures.RECORDED
    assert "do not say which memory figure" in memory_figures.compared(unlabelled).note


def _record(vision, score, peak, growth, trainable, suite="far", seed=0):
    """A CPU run as the runner records it; the tiny model's parameter counts (813,440 base)."""
    total = 813_440
    return {"kind": "cell", "suite": suite, "model": "tiny-minicpmv", "data": f"{suite}-data", "metric": "anls",
            "status": "ok", "key": f"{vision}-{seed}", "seed": seed, "score": score, "val_score": score,
            "cell": {"targets": "qv", "rank": 8, "alpha": 16.0, "vision": vision},
            "train": {"lr": 1e-3, "lr_connector": 1e-4, "lr_vision": 1e-4, "lora_dropout": 0.05, "steps": 10, "batch_size": 4},
            "trainable_params": trainable, "total_params": total, "peak_mem_mib": peak, "peak_delta_mib": growth,
            "memory_kind": "cpu_peak_rss", "memory_released": True, "train_samples_per_s": 100.0,
            "state_bytes": {"weight_bytes": 4 * (total + trainable), "grad_bytes": 4 * trainable, "optimizer_bytes": 8 * trainable}}


def test_recommender_decides_on_comparable_memory_not_the_process_peak():
    """resampler gains half a point over frozen (less than MIN_GAIN), so the cheaper policy is chosen.
    The process peaks say resampler is cheaper (1032 vs 1033 MiB, as the published CPU table had it: the
    frozen runs came after bigger cells); the runs' own growth and exact bytes say frozen is."""
    records = [_record("frozen", 0.500, peak=1033.0, growth=41.0, trainable=7_168),
               _record("resampler", 0.505, peak=1032.0, growth=45.0, trainable=114_944)]
    evidence, notes = build_evidence(records, "tiny-minicpmv")
    for ev in evidence:
        ev.distance = _distance(0.5)
    calibration = calibrate(evidence)
    assert calibration.decide(0.5) == "frozen", calibration.cost
    assert calibration.cost["frozen"][0] < calibration.cost["resampler"][0]
    from bench import memory_figures

    assert evidence[0].memory.kind == memory_figures.CPU_TRAIN and not notes
    old = [{k: v for k, v in r.items() if k not in ("peak_delta_mib", "memory_released", "state_bytes", "total_params")}
           for r in records]  # what the old figure saw: the process peaks only
    old_evidence, old_notes = build_evidence(old, "tiny-minicpmv")
    for ev in old_evidence:
        ev.distance = _distance(0.5)
    assert calibrate(old_evidence).decide(0.5) == "resampler"
    assert any("depends on run order" in n for n in old_notes)


def test_tables_name_the_memory_figure(runs):
    from bench import memory_figures, report

    records = list(runs.values())
    md = report.markdown(records, "python run_bench.py", {})
    assert "growth MiB (CPU)" in md and "state MiB (memory model)" in md and "peak MiB |" not in md
    assert f"*growth MiB (CPU)*: {memory_figures.LABELS[memory_figures.CPU_GROWTH]}" in md
    assert "MiB (CPU growth over baseline)" in md  # the best cell's line
    frame = report.frame(records)
    cells = frame[frame.kind == "cell"]
    assert set(cells.memory_figure) == {memory_figures.CPU_TRAIN}
    assert np.allclose(cells.memory_mib, [memory_figures.Figure(memory_figures.CPU_TRAIN).mib(r) for r in
                                          sorted(records, key=lambda r: (r["cell"]["vision"], r["seed"]))])
    assert (cells.state_mib > 0).all() and (cells.peak_delta_mib < cells.peak_mem_mib).all()
