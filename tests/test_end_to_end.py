"""run_bench.py as a user runs it: resume, determinism, kill -9."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd

from conftest import ROOT, run_cli

ONE_CELL = ["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--ranks", "4", "--vision", "frozen", "--seeds", "0"]


def records(out):
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*/*.json"))]


def test_smoke_matrix_then_rerun_does_no_training(tmp_path):
    out = tmp_path / "a"
    first = run_cli("--suite", "docvqa", "--preset", "smoke", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    csv1 = (out / "results.csv").read_text()
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4 + 1  # 4 cells x 1 seed + the base model
    assert set(df.status) == {"ok"}
    assert {"suite", "model", "target_set", "rank", "alpha", "vision_policy", "seed", "metric", "score",
            "trainable_params", "peak_mem_mib", "train_samples_per_s", "eval_items_per_s", "train_s", "status"} <= set(df.columns)
    md = (out / "results.md").read_text()
    assert "Best cell" in md and "Base model" in md and "Main effects" in md
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "records").glob("*/*.json")}

    second = run_cli("--suite", "docvqa", "--preset", "smoke", "--out", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "5 of 4 runs" not in second.stdout
    assert "4 of 4 runs already recorded" in second.stdout
    assert "train qv" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "records").glob("*/*.json")} == mtimes
    assert (out / "results.csv").read_text() == csv1


def test_same_cell_same_seed_gives_identical_numbers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        result = run_cli(*ONE_CELL, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
    ra = [r for r in records(a) if r["kind"] == "cell"]
    rb = [r for r in records(b) if r["kind"] == "cell"]
    assert len(ra) == len(rb) == 1
    assert ra[0]["losses"] == rb[0]["losses"]
    assert ra[0]["score"] == rb[0]["score"]
    assert [i["prediction"] for i in ra[0]["items"]] == [i["prediction"] for i in rb[0]["items"]]


def test_kill_minus_9_then_resume(tmp_path):
    out = tmp_path / "k"
    args = [sys.executable, str(ROOT / "run_bench.py"), "--suite", "docvqa", "--preset", "smoke", "--steps", "30",
            "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [r for r in records(out) if r["kind"] == "cell"] if (out / "records").exists() else []
            if done:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no run finished in time")
        time.sleep(1.0)  # well inside the next run's training
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = records(out)  # every file on disk parses: no torn record
    assert 1 <= len([r for r in before if r["kind"] == "cell"]) < 4

    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = records(out)
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 5
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 5 and df.key.is_unique
    assert not list((out / "records").glob("*/.*.tmp"))


def test_saved_adapter_reloads_with_peft_and_predicts_the_same(tmp_path):
    """--save-adapters all: every run's PEFT folder loads onto the base model and gives the recorded answers."""
    import torch
    from peft import PeftModel

    from bench.models import get_adapter
    from bench.suite_data import read_split
    from bench import suites

    out = tmp_path / "saved"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler",
                     "--save-adapters", "all", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    cells = [r for r in records(out) if r["kind"] == "cell"]
    assert len(cells) == 2 and all((out / r["adapter"] / "adapter_config.json").is_file() for r in cells)
    record = next(r for r in cells if r["cell"]["vision"] == "resampler")
    adapter = get_adapter("tiny-minicpmv")
    adapter.load(torch.device("cpu"))
    model = PeftModel.from_pretrained(adapter.model, str(out / record["adapter"])).eval()
    suite = suites.get("docvqa")
    rows = read_split(suite.prepare(128, 48), "test")[:8]
    from PIL import Image

    arrays = [adapter.image_array(Image.open(r.image).convert("RGB")) for r in rows]
    batch = adapter.prompt_batch([adapter.encode_prompt(suite.prompt(r.question)) for r in rows], arrays, torch.device("cpu"))
    with torch.no_grad():
        predictions = adapter.decode(adapter.generate_ids(model, batch, 16))
    recorded = {i["id"]: i["prediction"] for i in record["items"]}
    assert predictions == [recorded[r.id] for r in rows]


def test_save_adapters_best_keeps_one_folder_per_suite(tmp_path):
    out = tmp_path / "best"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    kept = list((out / "adapters" / "docvqa").iterdir())
    cells = [r for r in records(out) if r["kind"] == "cell"]
    assert len(kept) == 1 and kept[0].name in {r["key"] for r in cells}
    assert json.loads((kept[0] / "run.json").read_text())["score"] == max(r["score"] for r in cells)
