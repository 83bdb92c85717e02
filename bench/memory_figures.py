"""Which memory figure a table shows, and the figure runs are compared on.

A run's record (bench.runner.memory_fields) carries:

* ``peak_mem_mib`` with ``memory_kind``: on CUDA ``cuda_max_allocated``, the allocator's peak, reset
  at the run's start (a figure of the run alone); on CPU ``cpu_peak_rss``, the process's peak resident
  memory, which holds whatever the process held before the run (weights, data, memory freed by earlier
  cells and kept by the C allocator): it depends on what ran before, so runs do not compare on it;
* ``peak_delta_mib``: the run's growth over the process baseline at its start. On CPU it compares
  across runs when ``memory_released`` is true (bench.measure returned freed memory to the kernel
  before reading the baseline); older records reused freed memory unseen (a frozen cell right after a
  vpm-lora cell grew by 0 MiB);
* ``state_bytes``: the memory model's exact weight, gradient and AdamW bytes of the cell
  (bench.memory_model.train_state). Records made before it existed are given it from their parameter
  counts on CPU, where every weight is fp32: weights ``(total + trainable) * 4``, gradients
  ``trainable * 4``, AdamW ``trainable * 8``.

:func:`measured` picks what a table shows as measured (CUDA peak allocated; CPU growth over baseline),
:func:`compared` what runs are ranked on (the recommender's cost): CUDA peak allocated on GPU; on CPU
the memory model's exact weights plus the measured growth (which holds gradients, AdamW state and
activations, and is never taken below their exact bytes). Where records lack a field the figure falls
back (the memory model's bytes, else the peak as recorded) and says so in ``note``.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20

CUDA_PEAK = "cuda_peak_allocated"
CPU_GROWTH = "cpu_growth_over_baseline"
CPU_TRAIN = "cpu_model_weights_plus_growth"
MODEL_STATE = "memory_model_bytes"
RECORDED = "recorded_peak"

HEADERS = {
    CUDA_PEAK: "peak MiB (CUDA allocated)",
    CPU_GROWTH: "growth MiB (CPU)",
    CPU_TRAIN: "train MiB (model weights + CPU growth)",
    MODEL_STATE: "state MiB (memory model)",
    RECORDED: "peak MiB (as recorded)",
}

SHORT = {
    CUDA_PEAK: "CUDA peak allocated",
    CPU_GROWTH: "CPU growth over baseline",
    CPU_TRAIN: "memory-model weights + CPU growth over baseline",
    MODEL_STATE: "memory-model bytes",
    RECORDED: "peak as recorded",
}

LABELS = {
    CUDA_PEAK: "CUDA peak allocated memory (max_memory_allocated, reset at the run's start)",
    CPU_GROWTH: "CPU growth over baseline: the run's peak resident memory minus the process's at its start, "
                "freed memory returned to the kernel first",
    CPU_TRAIN: "the memory model's exact weight bytes plus the run's CPU growth over baseline (gradients, AdamW "
               "state, activations; never below the memory model's exact gradient and AdamW bytes)",
    MODEL_STATE: "memory-model bytes: exact weights, gradients and AdamW state of the cell (bench/memory_model.py; "
                 "activations not included)",
    RECORDED: "peak memory as recorded",
}


@dataclass(frozen=True)
class Figure:
    kind: str
    note: str | None = None  # why a fallback was used

    @property
    def header(self) -> str:
        return HEADERS[self.kind]

    @property
    def short(self) -> str:
        return SHORT[self.kind]

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def mib(self, record: dict) -> float | None:
        """This figure for one run (None where the run has none: not finished, or a field is missing)."""
        if self.kind in (CUDA_PEAK, RECORDED):
            return record.get("peak_mem_mib")
        if self.kind == CPU_GROWTH:
            return record.get("peak_delta_mib")
        state = state_bytes(record)
        if state is None:
            return None
        if self.kind == MODEL_STATE:
            return sum(state.values()) / MIB
        growth = record.get("peak_delta_mib")
        if growth is None:
            return None
        return state["weight_bytes"] / MIB + max(growth, (state["grad_bytes"] + state["optimizer_bytes"]) / MIB)


def state_bytes(record: dict) -> dict | None:
    """The memory model's exact weight / gradient / AdamW bytes of the run's cell: as recorded, or from
    the recorded parameter counts for CPU records made before ``state_bytes`` existed (fp32 throughout)."""
    if record.get("state_bytes"):
        return record["state_bytes"]
    total, trainable = record.get("total_params"), record.get("trainable_params")
    if _device(record) == "cpu" and total is not None and trainable is not None:
        return {"weight_bytes": 4 * (total + trainable), "grad_bytes": 4 * trainable, "optimizer_bytes": 8 * trainable}
    return None


def state_mib(record: dict) -> float | None:
    state = state_bytes(record)
    return None if state is None else sum(state.values()) / MIB


def _device(record: dict) -> str | None:
    kind = record.get("memory_kind") or ""
    if kind.startswith("cuda"):
        return "cuda"
    if kind.startswith("cpu"):
        return "cpu"
    return (record.get("machine") or {}).get("device")


def _runs(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind", "cell") == "cell" and r.get("peak_mem_mib") is not None]


def measured(records: list[dict]) -> Figure:
    """What tables show as the measured memory of these runs: CUDA peak allocated, or CPU growth over
    baseline; the peak as recorded (with a note) where the records cannot give either."""
    runs = _runs(records)
    kinds = {r.get("memory_kind") for r in runs}
    if runs and kinds == {"cuda_max_allocated"}:
        return Figure(CUDA_PEAK)
    if runs and kinds == {"cpu_peak_rss"} and all(r.get("memory_released") and r.get("peak_delta_mib") is not None for r in runs):
        return Figure(CPU_GROWTH)
    return Figure(RECORDED, _recorded_note(runs, kinds))


def compared(records: list[dict]) -> Figure:
    """The figure these runs are compared on (a policy's cost): CUDA peak allocated; on CPU the memory
    model's exact weights plus the run's growth over baseline; falling back, with a note, to the memory
    model's exact bytes and then to the peak as recorded."""
    runs = _runs(records)
    shown = measured(runs)
    if shown.kind == CUDA_PEAK:
        return shown
    if shown.kind == CPU_GROWTH and all(r.get("state_bytes") for r in runs):
        return Figure(CPU_TRAIN)
    if runs and all(state_bytes(r) is not None for r in runs):
        old = sum(not (r.get("memory_released") and r.get("state_bytes")) for r in runs)
        return Figure(MODEL_STATE, f"{old} of {len(runs)} runs were recorded before per-run memory figures (their CPU "
                                   "growth reused memory freed by earlier runs, so it depends on run order): memory is "
                                   f"compared on {LABELS[MODEL_STATE]}, from the recorded parameter counts where needed; "
                                   "rerun the benchmark to compare measured growth too")
    return shown


def _recorded_note(runs: list[dict], kinds: set) -> str | None:
    if not runs:
        return None
    if kinds == {"cpu_peak_rss"}:
        return ("memory is the process's peak resident memory on CPU, as these records hold it: it includes what "
                "the process held before each run, so it depends on run order; rerun the benchmark for figures that compare")
    if None in kinds:
        return "the records do not say which memory figure they hold; shown as recorded"
    return (f"the records mix memory figures ({', '.join(sorted(k for k in kinds if k))}); shown as recorded, "
            "not comparable across them")
