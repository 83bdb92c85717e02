"""Command line: ``python run_bench.py --suite docvqa [--preset default] [overrides]``.

Bad input ends with ``error: <problem>; <fix>`` on stderr and exit status 2, before anything is
written. An interrupted run resumes when the same command is started again.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

# Before anything imports tqdm or the Hugging Face stack: the harness never downloads, and lm-eval's
# tqdm bars would interleave with ours.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from bench import flags
from bench.errors import BenchError
from bench.space import PRESETS, TARGET_SETS, VARIANTS, VISION_POLICIES

EPILOG = """examples:
  python run_bench.py --suite docvqa                      # default: 5 target sets x 4 vision policies x 3 rates x 3 seeds, raced
  python run_bench.py --suite docvqa --protocol exhaustive # the same matrix, every run to the end
  python run_bench.py --suite docvqa --preset smoke       # a first look in under a minute
  python run_bench.py --suite docvqa --targets qk,qv --ranks 4,16 --vision frozen,resampler --seeds 0,1,2 --lrs 1e-3,3e-3
  python run_bench.py --suite docvqa --param-budget 20000  # target sets compared at equal LoRA parameter counts
  python run_bench.py --suite docvqa --targets qv --vision frozen --variants lora,dora,rslora,pissa,loraplus   # LoRA variants
  python run_bench.py --suite docvqa --search optuna --trials 20 --memory-budget 16GiB    # multi-objective search
  python run_bench.py --suite docvqa --search optuna --objectives score --trials 12      # single objective, with pruning
  python run_bench.py --suite textvqa --data ~/data/textvqa --limit 2000   # a real dataset instead of the generator
  python run_bench.py --similarity --data ~/my-images      # how far are my images from pretraining and each suite?
  python run_bench.py --recommend --data ~/my-images --memory-budget 16GiB   # what should I tune?
"""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as the harness's others: one line, ``error: <problem>; <fix>``, exit status 2
    (argparse prints its usage block first and names flags as ``argument --flag:``)."""

    def error(self, message: str):
        named = re.match(r"argument (-[\w-]+)(?:/-[\w-]+)*: (.*)", message, re.S)
        if named:
            message = f"{named.group(1)} {named.group(2)}"
        message = " ".join(message.split())
        if "e.g." not in message:
            message += f"; see {self.prog} --help"
        self.exit(2, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="run_bench.py",
        description="LoRA ablation benchmark for vision-language models: target sets x ranks x vision policies x LoRA variants.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", default="docvqa", help="suite name(s), comma-separated (default: docvqa)")
    p.add_argument("--preset", default="default", help=f"one of {', '.join(PRESETS)} (default: default)")
    p.add_argument("--model", default="tiny-minicpmv", help="built-in model name or local checkpoint folder")
    p.add_argument("--targets", help=f"LoRA target sets: {', '.join(TARGET_SETS)}")
    p.add_argument("--ranks", type=flags.ranks, help="LoRA ranks, e.g. 4,16")
    p.add_argument("--alpha", default="2r", type=flags.alpha_rule, help="alpha rule: 2r (alpha=2*rank, default), r, or a number")
    p.add_argument("--vision", help=f"vision policies: {', '.join(VISION_POLICIES)}")
    p.add_argument("--variants", help=f"LoRA variants, each a factor level of the matrix: {', '.join(VARIANTS)} (default: lora)")
    p.add_argument("--seeds", type=flags.seeds, help="seeds, e.g. 0,1,2")
    p.add_argument("--steps", type=flags.count(1, "200"), help="optimizer steps per run (same for every cell)")
    p.add_argument("--batch-size", type=flags.count(1, "8"), help="training batch size")
    p.add_argument("--lr", type=flags.positive("1e-3"), help="LoRA learning rate (one rate; the fully trained parts keep their ratio to it)")
    p.add_argument("--lrs", type=flags.rates, help="LoRA learning rates every cell runs at, e.g. 1e-3,3e-3,1e-2; each cell is reported at its "
                   "best rate on the validation split (the fully trained parts' rates scale alike)")
    p.add_argument("--lr-connector", type=flags.positive("3e-4"), help="learning rate of the connector when trained fully, at --lr (default: 0.3 x --lr)")
    p.add_argument("--lr-vision", type=flags.positive("1e-4"), help="learning rate of the vision encoder when trained fully, at --lr (default: 0.1 x --lr)")
    p.add_argument("--lora-dropout", type=flags.fraction(low_open=False, high_open=True, example="0.05"), help="LoRA dropout")
    p.add_argument("--resolutions", type=flags.resolutions,
                   help="image resolutions to measure, as values of the model family's own knob (Qwen-VL: max_pixels; "
                        "Idefics3/SmolVLM: longest_edge; MiniCPM-V: max_slice_nums), e.g. 200704,802816; default = the checkpoint's")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass: same numbers, less memory")
    p.add_argument("--train-items", type=flags.counts("250,1000,8000"), help="training items per suite (generated suites); several "
                   "values make it a factor: the same items nested (the 250 are the first 250 of the 1000), each level its own section")
    p.add_argument("--early-stopping", action="store_true", help="validation at 10, 20, 30, 50 and 75%% of training; test scores the best checkpoint")
    p.add_argument("--report-only", action="store_true", help="write results.md/.csv from the runs of this matrix already "
                   "recorded in --out (a stopped or partial matrix); train nothing")
    p.add_argument("--control", help="control suites (or --data-style folders) every tuned run is also scored on, to measure forgetting; "
                   "default: shapes (the embedded model's pretraining-like task) for the embedded model, none for checkpoints; none: off")
    p.add_argument("--test-items", type=flags.count(1, "500"), help="test items per suite (generated suites)")
    p.add_argument("--val-items", type=flags.count(1, "200"), help="validation items per suite, carved from the training pool (generated suites)")
    p.add_argument("--param-budget", type=flags.count(1, "20000"), help="LLM LoRA parameters per cell: each target set gets the rank that "
                   "matches it (the LoRA paper's fixed-budget comparison); replaces --ranks")
    p.add_argument("--protocol", help="race (default): rates raced at half the steps, more seeds only for cells that "
                   "could still be the best (bench/race.py); exhaustive: every cell x rate x seed to the end")
    p.add_argument("--equivalence-margin", type=flags.fraction(low_open=True, high_open=True, example="0.01"), help="differences within +-this (score units) count as equivalent "
                   "when a 90%% interval shows it (TOST; default 0.01)")
    p.add_argument("--data", help="a real dataset (file or folder: TextVQA/DocVQA/ChartQA JSON, or parquet shards) instead of the suite's generator")
    p.add_argument("--limit", type=flags.count(1, "2000"), help="at most N items per split (train and test)")
    p.add_argument("--out", help="results folder (default: results/runs/<preset>, git-ignored)")
    p.add_argument("--storage", help="Optuna storage URL shared by workers on several machines, e.g. postgresql://user@host/db "
                   "(default: a journal file in --out, shared by processes on this machine)")
    p.add_argument("--worker", action="store_true", help="join the study of this matrix in --storage (started elsewhere) and run its trials")
    p.add_argument("--objectives", help="study objectives, comma-separated from score, memory, throughput (default: all three)")
    p.add_argument("--search", help="optuna: let a sampler propose cells (plus lr, LoRA alpha and dropout) instead of running the matrix")
    p.add_argument("--trials", type=flags.count(1, "20"), help="--search: number of trials (default 20)")
    p.add_argument("--memory-budget", type=flags.memory, help="--search: peak-memory constraint, e.g. 16GiB (infeasible trials are never recommended)")
    p.add_argument("--step-budget", type=flags.count(1, "2000"), help="--search: stop proposing trials once this many training steps are spent (pruned trials cost less)")
    p.add_argument("--pruner", help="--search with --objectives score: median (default), hyperband or none")
    p.add_argument("--sampler-seed", type=flags.seed, help="--search: seed of the TPE sampler (default 0)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code shipped inside a checkpoint folder (MiniCPM-V)")
    p.add_argument("--save-adapters", help="best (default: the best run per suite), all or none: PEFT folders under <out>/adapters/")
    p.add_argument("--export", help="merged: also a model folder per saved adapter, LoRA merged in, under <out>/merged/ "
                   "(loads with from_pretrained alone: vLLM, lmms-eval, VLMEvalKit)")
    p.add_argument("--similarity", action="store_true", help="report how far --data's images are from the model's pretraining and from every suite, then exit")
    p.add_argument("--recommend", action="store_true", help="recommend targets, rank and vision policy for --data from benchmark records (--results), then exit")
    p.add_argument("--reference", help="--similarity/--recommend: a folder of images like the model's pretraining data (built in for the embedded model)")
    p.add_argument("--samples", type=flags.count(10, "500"), default=500, help="--similarity/--recommend: images sampled per set (default 500)")
    p.add_argument("--results", nargs="+", help="--recommend: results folders holding records (default: results)")
    p.add_argument("--min-throughput", type=flags.positive("2"), help="--recommend: only configurations that trained at least this many samples/s")
    p.add_argument("--max-forgetting", type=flags.positive("2"), help="--recommend: only configurations that lost at most this "
                   "many points on the control suites (the base model's control score minus the run's; bench/costs.py)")
    p.add_argument("--estimate-for", help="--recommend: a model (checkpoint folder or built-in name) to estimate each configuration's "
                   "peak training memory on, at --batch-size (default 8) x --seq-len; --memory-budget then applies to the estimates")
    p.add_argument("--seq-len", type=flags.count(1, "1024"), help="--recommend --estimate-for: tokens per training sequence, image tokens included (default 1024)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--list", action="store_true", help="list suites, presets, target sets, vision policies and LoRA variants, then exit")
    return p


def list_choices() -> None:
    from bench import suites

    print("suites:", ", ".join(suites.available()))
    for name, preset in PRESETS.items():
        print(f"preset {name}: {preset.about}")
    for name, roles in TARGET_SETS.items():
        print(f"target set {name}: {', '.join(roles)}")
    for name, about in VISION_POLICIES.items():
        print(f"vision policy {name}: {about}")
    for name, about in VARIANTS.items():
        print(f"LoRA variant {name}: {about}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        list_choices()
        return 0
    try:
        if args.similarity:
            from bench import similarity

            return similarity.run(args)
        if args.recommend:
            from bench import recommend

            return recommend.run(args)
        from bench.spec import from_args

        spec = from_args(args)
        from bench.runner import run

        run(spec)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk outside --out (the data cache, a temporary folder): one line too
        from pathlib import Path

        from bench.store import disk_full, disk_full_reason

        reason = disk_full_reason(exc)
        if not reason:
            raise
        folder = Path(exc.filename).parent if exc.filename else Path.cwd()
        print(f"error: {disk_full(folder, None, reason)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are saved; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
