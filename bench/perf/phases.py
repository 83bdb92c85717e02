"""Where the time of a run goes: the command run in-process under cProfile, its time split into phases.

    python -m bench.perf.phases --out results/perf/phases.md -- --suite docvqa --out /tmp/phases-run

Everything after ``--`` is passed to ``run_bench.py`` unchanged (default: a default docvqa run).
The split comes from the profile's cumulative times of the harness's own functions (imports, model
load, data, base-model score, LoRA attach/detach, training, evaluation, adapters, study bookkeeping,
report), with training and evaluation split further (forward, of which LoRA dropout and the vision
encoder; backward; optimizer; batches; generation; lm-eval bookkeeping; image decoding).
CPU only: on CUDA, kernels run asynchronously and their time lands wherever the host next waits.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


def _matches(key: tuple, path_end: str, name: str) -> bool:
    return key[2] == name and key[0].replace(os.sep, "/").endswith(path_end)


def cumulative(stats: pstats.Stats, path_end: str, name: str, caller: tuple[str, str] | None = None) -> float:
    """Cumulative seconds of the functions called ``name`` in a file ending in ``path_end`` (only their
    calls from ``caller``, a (path end, name) pair, when given); 0 when there is none."""
    total = 0.0
    for key, value in stats.stats.items():
        if not _matches(key, path_end, name):
            continue
        if caller is None:
            total += value[3]
        else:
            total += sum(v[3] for k, v in value[4].items() if _matches(k, *caller))
    return total


def breakdown(stats: pstats.Stats, total: float, main_s: float) -> dict:
    """Seconds per phase. Names are the harness's functions; a renamed one shows as 0 s here."""
    c = lambda path, name, caller=None: cumulative(stats, path, name, caller)  # noqa: E731
    run_eval = c("bench/runner.py", "_evaluate", ("bench/runner.py", "_one_run"))
    base_eval = c("bench/runner.py", "_evaluate_base")
    train = c("bench/train.py", "train")
    generate = c("bench/evaluate.py", "generate_until")
    lm_eval = c("bench/evaluate.py", "evaluate")
    phases = {
        "imports (torch, transformers, peft, lm-eval, optuna)": total - main_s,
        "spec and checks": c("bench/spec.py", "from_args"),
        "model load (once)": c("bench/runner.py", "__init__"),
        "data: generate or find, hash": c("bench/runner.py", "prepare"),
        "data: decode training images (once per suite)": c("bench/runner.py", "encode_split"),
        "base model score (once per suite)": base_eval,
        "LoRA attach": c("bench/train.py", "attach"),
        "training": train,
        "evaluation of trained cells": run_eval,
        "LoRA detach": c("bench/train.py", "detach"),
        "adapter files": c("bench/adapters.py", "keep"),
        "report (tables, plots, importance)": c("bench/report.py", "write_all"),
    }
    study = c("bench/study.py", "work") - c("bench/runner.py", "run", ("bench/study.py", "<lambda>")) \
        - c("bench/study.py", "base")
    phases["study bookkeeping (journal, heartbeats)"] = max(0.0, study)
    phases["other"] = max(0.0, total - sum(phases.values()))
    forward = c("/tiny_minicpmv.py", "forward_loss") or c("bench/models/hf.py", "forward_loss")
    inside_train = {
        "forward": forward,
        "  of which LoRA dropout (random masks)": c("~", "<built-in method torch.dropout>"),
        "  of which the vision encoder + resampler": c("/tiny_minicpmv.py", "vision_embedding", ("/tiny_minicpmv.py", "embed")),
        "backward": c("accelerate/accelerator.py", "backward"),
        "optimizer step (AdamW)": c("accelerate/optimizer.py", "step"),
        "gradient clipping": c("accelerate/accelerator.py", "clip_grad_norm_"),
        "batches (collate, tokens, pixels)": c("bench/models/adapter.py", "train_batch") or c("bench/models/hf.py", "train_batch"),
    }
    inside_eval = {
        "generation (KV cache)": c("/tiny_minicpmv.py", "generate_ids") or c("bench/models/hf.py", "generate_ids"),
        "test image decoding": c("bench/evaluate.py", "_open"),
        "prompt batches": c("bench/models/adapter.py", "prompt_batch") or c("bench/models/hf.py", "prompt_batch"),
        "lm-eval bookkeeping (requests, filters, metrics, samples)": lm_eval - generate,
    }
    return {"total_s": total, "phases": phases, "train": inside_train, "train_s": train,
            "eval": inside_eval, "eval_s": lm_eval}


def render(result: dict, command: str, machine: str) -> str:
    total = result["total_s"]
    lines = ["## Where the time goes: a profiled run", "",
             f"Command: `{command}` ({total / 60:.1f} min under cProfile)", "", f"Machine: {machine}", "",
             "| phase | seconds | share of the run |", "|---|---|---|"]
    for name, s in sorted(result["phases"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {s:.1f} | {s / total:.1%} |")
    for part, title, note in (("train", "training", ""), ("eval", "evaluation", "base and cells, ")):
        whole = result[f"{part}_s"]
        lines += ["", f"Inside {title} ({note}{whole:.1f} s):", "",
                  f"| part | seconds | share of {title} |", "|---|---|---|"]
        lines += [f"| {name} | {s:.1f} | {s / whole:.1%} |" if whole else f"| {name} | {s:.1f} | - |" for name, s in result[part].items()]
    return "\n".join(lines) + "\n"


def profile(run_args: list[str], pstats_path: Path | None = None) -> tuple[dict, int]:
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    import bench.cli  # the imports every run pays, profiled like the rest
    import bench.runner  # noqa: F401
    import bench.study  # noqa: F401
    main_start = time.perf_counter()
    code = bench.cli.main(run_args)
    main_s = time.perf_counter() - main_start
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    if pstats_path:
        stats.dump_stats(str(pstats_path))
    return breakdown(stats, total, main_s), code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = ["--suite", "docvqa"]
    if "--" in argv:
        cut = argv.index("--")
        argv, run_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/perf/phases.md"))
    p.add_argument("--pstats", type=Path, help="also keep the raw profile (for snakeviz / pstats)")
    args = p.parse_args(argv)
    result, code = profile(run_args, args.pstats)
    if code != 0:
        print(f"error: the profiled run exited with {code}", file=sys.stderr)
        return code
    import platform

    import torch

    from bench.machine import versions
    from bench.store import atomic_write_text

    v = versions()
    machine = (f"{platform.machine()} CPU, {torch.get_num_threads()} threads; python {v['python']}, torch {v['torch']}, "
               f"transformers {v['transformers']}, peft {v['peft']}, lm_eval {v.get('lm_eval')}")
    command = "python -m bench.perf.phases -- " + " ".join(run_args)
    text = render(result, command, machine)
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(result, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
