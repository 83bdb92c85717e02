"""Data parallelism for one run: ``accelerate launch --num_processes 2`` on CPU (gloo) makes the record a
single process makes, within floating-point rounding; only the leader writes."""

import socket
import sys

import pytest

from bench.store import read_record, record_files
from conftest import ROOT, run_cli

ARGS = ["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler", "--lora-dropout", "0"]
RACE = [*ARGS, "--lrs", "1e-3,3e-3,1e-2", "--seeds", "0,1", "--steps", "8"]  # rung legs paused and resumed


def launch(*args, processes=2):
    import subprocess

    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "run_bench.py"), "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def cells(out):
    return {(r["cell"]["vision"], r["train"]["lr"], r["seed"]): r
            for r in (read_record(p) for p in record_files(out / "records")) if r["kind"] == "cell"}


@pytest.mark.slow
def test_two_processes_make_the_one_process_record(tmp_path):
    """A race (rung legs paused, the winners resumed, a second seed) in one process and in two."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli(*RACE, "--out", str(one))
    assert single.returncode == 0, single.stderr[-2000:]
    double = launch(*RACE, "--out", str(two))
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 data-parallel processes" in " ".join(double.stdout.split()) and double.stdout.count("wrote ") == 1  # the leader reports
    a, b = cells(one), cells(two)
    assert a.keys() == b.keys() and {r["status"] for r in a.values()} == {"ok", "raced"}
    for run in a:
        x, y = a[run], b[run]
        assert (x["status"], x["steps_trained"]) == (y["status"], y["steps_trained"])
        assert len(x["losses"]) == len(y["losses"]) and max(abs(p - q) for p, q in zip(x["losses"], y["losses"])) < 1e-4
        assert x["val_curve"] == y["val_curve"]
        if x["status"] == "ok":
            assert [i["prediction"] for i in x["items"]] == [i["prediction"] for i in y["items"]]
            assert (x["val_score"], x["score"]) == (y["val_score"], y["score"]) and y["train_s"] > 0
        assert x["key"] != y["key"]  # rounded differently: its own runs, never mixed with one-process records
    assert len(list(record_files(two / "records"))) == len(list(record_files(one / "records")))  # written once


@pytest.mark.slow
def test_a_batch_that_does_not_split_is_one_line(tmp_path):
    result = launch(*ARGS, "--batch-size", "7", "--out", str(tmp_path / "odd"))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "does not split over 2 processes" in errors[0]
    assert "/bench/" not in result.stderr  # no traceback of ours (the launcher reports its children's exit itself)
