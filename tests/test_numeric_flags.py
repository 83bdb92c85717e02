"""Every numeric flag of run_bench.py refuses nonsense (0 where meaningless, negative, not a number,
NaN, infinity, a fraction where a count is due) with one line naming the flag and its valid range, exit
status 2, before anything is written. ``--search optuna --trials 0`` used to run 20 trials."""

import pytest

from conftest import run_cli

COUNT = ["0", "-3", "abc", "2.5", "nan", "inf", ""]  # a whole number >= 1
RATE = ["0", "-1e-3", "abc", "nan", "inf", "-inf"]  # a number > 0
SEED = ["-1", "abc", "1.5", "nan", "4294967296"]  # a whole number in [0, 2**32 - 1]

# flag -> (bad values, the range the message must name)
FLAGS = {
    "--steps": (COUNT, ">= 1"),
    "--batch-size": (COUNT, ">= 1"),
    "--train-items": (COUNT, ">= 1"),
    "--test-items": (COUNT, ">= 1"),
    "--val-items": (COUNT, ">= 1"),
    "--limit": (COUNT, ">= 1"),
    "--trials": (COUNT, ">= 1"),
    "--step-budget": (COUNT, ">= 1"),
    "--param-budget": (COUNT, ">= 1"),
    "--seq-len": (COUNT, ">= 1"),
    "--samples": (["0", "9", "-5", "abc", "nan", "2.5"], ">= 10"),
    "--sampler-seed": (SEED, "[0, 4294967295]"),
    "--lr": (RATE, "> 0"),
    "--lr-connector": (RATE, "> 0"),
    "--lr-vision": (RATE, "> 0"),
    "--min-throughput": (RATE, "> 0"),
    "--lora-dropout": (["-0.1", "1", "1.5", "nan", "inf", "abc"], "[0, 1)"),
    "--equivalence-margin": (["0", "1", "-0.5", "nan", "inf", "abc"], "(0, 1)"),
    "--ranks": (["0", "-4", "abc", "4,nan", "4,2.5", "inf"], ">= 1"),
    "--seeds": (["-1", "abc", "1.5", "0,nan", "4294967296"], "[0, 4294967295]"),
    "--lrs": (["0", "-1e-3", "abc", "nan", "1e-3,inf"], "> 0"),
    "--resolutions": (["0", "-4", "abc", "2.5", "200704,nan", "inf"], ">= 1"),
    "--alpha": (["0", "-2", "nan", "inf", "abc", "0r", "nanr", "-1r", "infr"], "> 0"),
    "--memory-budget": (["0GiB", "-1GiB", "abc", "nanGiB", "infGiB", "16XB", "0"], "> 0"),
}
CASES = [(flag, value) for flag, (values, _) in FLAGS.items() for value in values]


@pytest.mark.parametrize("flag, value", CASES, ids=[f"{f}={v}" for f, v in CASES])
def test_numeric_flag_refuses_nonsense(tmp_path, flag, value):
    out = tmp_path / "out"
    # --search optuna: the flags that apply to a search are read too (a refusal must not depend on it).
    extra = ["--search", "optuna"] if flag in ("--trials", "--step-budget", "--sampler-seed") else []
    result = run_cli("--suite", "shapes", "--preset", "smoke", *extra, f"{flag}={value}", "--out", str(out), timeout=90)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), result.stderr[-2000:]
    assert FLAGS[flag][1] in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_good_values_still_parse():
    """The same parser accepts sensible values of every flag above (nothing runs: parse only)."""
    from bench.cli import parser

    args = parser().parse_args([
        "--steps", "4", "--batch-size", "2", "--train-items", "8", "--test-items", "8", "--val-items", "4", "--limit", "10",
        "--trials", "3", "--step-budget", "30", "--param-budget", "20000", "--seq-len", "512", "--samples", "10",
        "--sampler-seed", "0", "--lr", "1e-3", "--lr-connector", "3e-4", "--lr-vision", "1e-4", "--min-throughput", "0.5",
        "--lora-dropout", "0", "--equivalence-margin", "0.02", "--ranks", "4,16", "--seeds", "0,1", "--lrs", "1e-3,3e-3",
        "--alpha", "16", "--memory-budget", "1.5GB", "--resolutions", "200704,default"])
    assert (args.steps, args.trials, args.samples, args.lr, args.lora_dropout) == (4, 3, 10, 1e-3, 0.0)
    assert (args.ranks, args.seeds, args.lrs, args.alpha, args.memory_budget) == ("4,16", "0,1", "1e-3,3e-3", "16", "1.5GB")
    assert args.resolutions == "200704,default"
    for alpha in ("2r", "r", "0.5r", "8"):
        assert parser().parse_args(["--alpha", alpha]).alpha == alpha


def test_trials_default_is_twenty_and_zero_is_not():
    """The cause of the silent 20: ``args.trials or 20`` took 0 for "not given"."""
    import argparse

    from bench.cli import parser
    from bench.errors import BenchError
    from bench.spec import from_args

    args = parser().parse_args(["--suite", "shapes", "--preset", "smoke", "--search", "optuna"])
    assert from_args(args).trials == 20
    with pytest.raises(BenchError, match="--trials"):
        from_args(argparse.Namespace(**{**vars(args), "trials": 0}))
