"""Every speed benchmark; each writes its section to results/perf/<name>.md, then results/perf.md is
assembled from all sections present (so one benchmark can be rerun without the others).

    python -m bench.perf                         # all of them (~2.5 h on 2 CPU cores)
    python -m bench.perf --only racing           # racing vs the exhaustive protocol, replayed over published records (seconds)
    python -m bench.perf --only default-command  # python run_bench.py --suite docvqa from scratch, timed (~1.2 h on 2 cores)
    python -m bench.perf --only packing          # K packed runs vs the same runs one after another (~10 min)
    python -m bench.perf --only dropout          # LoRA dropout: peft's nn.Dropout vs an int64-bits mask (~5 min)
    python -m bench.perf --only generation       # batched vs one-by-one generation, in phases, against the matmul rate (~3 min)
    python -m bench.perf --only overheads        # side by side: training, generation, lm-eval, smoke matrix (~12 min)
    python -m bench.perf --only phases           # the default cells at one rate and seed under cProfile, in phases (~18 min)
    python -m bench.perf --only default-matrix   # the default matrix, one process vs a process per cell (~40 min a repetition)
    python -m bench.perf --only resolution       # a tiny Qwen2-VL trained at three max_pixels: memory, samples/s, visual tokens (~1 min)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

RUNNABLE = ["racing", "default-command", "packing", "dropout", "generation", "overheads", "phases", "default-matrix",
            "resolution"]
ORDER = [*RUNNABLE, "phases-before"]  # phases-before: kept from before the fixes, not rerun
TITLE = """# Performance: side-by-side measurements

Every figure here is produced by `python -m bench.perf` (one section each: `--only NAME`); the command,
machine and library versions are in each section. Goals from the performance issue: training loop <= 1.05x a
hand-written loop; batched generation >= 8x one-by-one; lm-eval <= 1.10x a direct loop; one process <= 0.6x
a process per cell; racing: the exhaustive protocol's verdict with <= 30% of its training steps, and the default
command in <= 20 min on 2 cores; packed runs: K = 4 in <= 0.4x their sequential time on a GPU (embedded model), <= 0.7x
on a ~1B model, and used on CPU only where they pay; LoRA dropout: a cheaper mask of the same distribution if one pays.
"""


def _phases() -> str:
    """In a fresh process, as a user runs it: imports, first evaluation and all; on the 20 default cells
    at one rate and one seed (the raced default, ~1.2 h, would take hours under cProfile)."""
    import subprocess

    from bench.perf.overheads import OLD_DEFAULT

    with tempfile.TemporaryDirectory() as tmp:
        section = Path(tmp) / "phases.md"
        cmd = [sys.executable, "-m", "bench.perf.phases", "--out", str(section), "--",
               "--suite", "docvqa", "--out", f"{tmp}/run", "--save-adapters", "none", *OLD_DEFAULT]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: the profiled run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        return section.read_text().replace(f"--out {tmp}/run", "--out <temporary folder>")


def run(name: str, reps: int, matrix_reps: int) -> str:
    if name == "racing":
        from bench.perf.racing import section

        return section()
    if name == "default-command":
        from bench.perf.racing import default_command_section

        return default_command_section()
    if name == "packing":
        from bench.perf.packing import section

        return section(reps)
    if name == "dropout":
        from bench.perf.dropout import section

        return section(reps)
    if name == "generation":
        from bench.perf.generation import section

        return section(reps)
    if name == "overheads":
        from bench.perf.overheads import section

        return section(reps)
    if name == "phases":
        return _phases()
    if name == "default-matrix":
        from bench.perf.overheads import default_matrix_section

        return default_matrix_section(matrix_reps)
    if name == "resolution":
        from bench.perf.resolution import section

        return section()
    raise ValueError(name)  # main() checks names first


def assemble(folder: Path) -> str:
    from bench.store import assemble_sections

    return assemble_sections(TITLE, ORDER, folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(RUNNABLE), help=f"comma-separated from {', '.join(RUNNABLE)}")
    p.add_argument("--reps", type=int, default=5, help="repetitions per side-by-side measurement (median)")
    p.add_argument("--matrix-reps", type=int, default=1,
                   help="repetitions of the default-matrix comparison (each ~40 min on 2 CPU cores; default 1)")
    p.add_argument("--out", type=Path, default=Path("results/perf.md"))
    args = p.parse_args(argv)
    from bench.store import atomic_write_text

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for name in names:
        if name not in RUNNABLE:
            print(f"error: unknown benchmark {name!r}; choose from {', '.join(RUNNABLE)}", file=sys.stderr)
            return 2
    folder = args.out.with_suffix("")  # results/perf.md -> results/perf/
    for name in names:
        text = run(name, args.reps, args.matrix_reps)
        atomic_write_text(folder / f"{name}.md", text)
        print(text)
    atomic_write_text(args.out, assemble(folder))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
