"""run_bench.py as a user runs it: resume, determinism, kill -9."""

import json
import signal
import subprocess
import sys
import time

import pandas as pd

from bench.store import read_record, record_files
from conftest import ROOT, run_cli

ONE_CELL = ["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--ranks", "4", "--vision", "frozen", "--seeds", "0"]


def records(out):
    return [read_record(p) for p in record_files(out / "records")]


def test_smoke_matrix_then_rerun_does_no_training(tmp_path):
    out = tmp_path / "a"
    first = run_cli("--suite", "docvqa", "--preset", "smoke", "--out", str(out), env={"LORA_VLM_BENCH_PROGRESS_S": "0"})
    assert first.returncode == 0, first.stderr[-2000:]
    # stdout is a pipe, not a terminal: progress comes as plain lines while it runs, one per finished run here
    lines = [line.split("race: training steps: ")[1] for line in first.stdout.splitlines() if "race: training steps: " in line]
    assert [line.split(" (")[0] for line in lines] == ["6 of 24", "12 of 24", "18 of 24", "24 of 24"], first.stdout[-3000:]
    assert all("elapsed" in line and "remaining" in line for line in lines)
    csv1 = (out / "results.csv").read_text()
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 4 + 1  # 4 cells x 1 seed + the base model
    assert set(df.status) == {"ok"}
    assert {"suite", "model", "target_set", "rank", "alpha", "vision_policy", "seed", "metric", "score", "val_score", "lr",
            "lr_connector", "lr_vision", "chosen", "trainable_params", "peak_mem_mib", "train_samples_per_s", "eval_items_per_s",
            "train_s", "status"} <= set(df.columns)
    md = (out / "results.md").read_text()
    assert "Best cell (validation)" in md and "Base model" in md and "Main effects" in md and "Confidence set of the best" in md
    _items_are_scored_with_official_anls(records(out))
    # generated data has no dataset ids: the predictions file takes the harness's item ids, in DocVQA's shape
    best = json.loads((out / "submissions" / "docvqa" / "best.json").read_text())
    n_items = {len(r["items"]) for r in records(out) if r["kind"] == "cell"}
    assert {len(best)} == n_items and set(best[0]) == {"questionId", "answer"} and best[0]["questionId"].startswith("test-")
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "records").glob("*/*")}

    second = run_cli("--suite", "docvqa", "--preset", "smoke", "--out", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "5 of 4 runs" not in second.stdout
    assert "4 of 4 runs already recorded" in second.stdout
    assert "train qv" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "records").glob("*/*")} == mtimes
    assert (out / "results.csv").read_text() == csv1


def _items_are_scored_with_official_anls(recs):
    """Every per-item score in the records is the official ANLS of the kept prediction, on both splits."""
    from bench.metrics import anls
    from bench.suite_data import cache_root, read_split

    checked = 0
    for r in recs:
        for split, field in (("test", "items"), ("val", "val_items")):
            answers = {row.id: row.answers for row in read_split(cache_root() / r["data"], split)}
            for item in r[field]:
                assert item["score"] == anls(item["prediction"], answers[item["id"]]), (r["key"], item)
                checked += 1
    assert checked >= 5 * 96


def test_learning_rate_grid_and_seeds_choose_on_validation(tmp_path):
    out = tmp_path / "grid"
    result = run_cli(*ONE_CELL[:-1], "0,1", "--lrs", "1e-3,1e-2", "--steps", "4", "--out", str(out), "--protocol", "exhaustive")
    assert result.returncode == 0, result.stderr[-2000:]
    df = pd.read_csv(out / "results.csv")
    cells = df[df.kind == "cell"]
    assert len(cells) == 4 and sorted(set(cells.lr)) == [1e-3, 1e-2] and set(cells.seed) == {0, 1}
    assert ((cells.lr_connector / cells.lr).round(6) == 0.3).all() and ((cells.lr_vision / cells.lr).round(6) == 0.1).all()
    chosen = cells[cells.chosen]
    assert len(chosen) == 2 and chosen.lr.nunique() == 1  # both seeds of the cell at one rate...
    means = cells.groupby("lr").val_score.mean()
    assert means[chosen.lr.iloc[0]] == means.max()  # ...the one with the best mean validation score
    md = (out / "results.md").read_text()
    assert "### Learning rate sweep" in md and "(edge)" in md and "seed noise is not measured" not in md
    recs = [r for r in records(out) if r["kind"] == "cell"]
    assert all(len(r["val_curve"]) == 3 and r["val_curve"][-1] == [4, r["val_score"]] for r in recs)


def test_same_cell_same_seed_gives_identical_numbers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        result = run_cli(*ONE_CELL, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
    ra = [r for r in records(a) if r["kind"] == "cell"]
    rb = [r for r in records(b) if r["kind"] == "cell"]
    assert len(ra) == len(rb) == 1
    assert ra[0]["losses"] == rb[0]["losses"]
    assert ra[0]["score"] == rb[0]["score"] and ra[0]["val_score"] == rb[0]["val_score"]
    assert [i["prediction"] for i in ra[0]["items"]] == [i["prediction"] for i in rb[0]["items"]]
    assert ra[0]["val_items"] == rb[0]["val_items"]


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
    rows = read_split(suite.prepare(128, 48, val_items=48), "test")[:8]
    from PIL import Image

    arrays = [adapter.image_array(Image.open(r.image).convert("RGB")) for r in rows]
    batch = adapter.prompt_batch([adapter.encode_prompt(suite.prompt(r.question)) for r in rows], arrays, torch.device("cpu"))
    with torch.no_grad():
        predictions = adapter.decode(adapter.generate_ids(model, batch, record["max_gen_toks"]))
    recorded = {i["id"]: i["prediction"] for i in record["items"]}
    assert predictions == [recorded[r.id] for r in rows]


def test_save_adapters_best_keeps_one_folder_per_suite(tmp_path):
    out = tmp_path / "best"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    kept = list((out / "adapters" / "docvqa").iterdir())
    cells = [r for r in records(out) if r["kind"] == "cell"]
    assert len(kept) == 1 and kept[0].name in {r["key"] for r in cells}
    assert json.loads((kept[0] / "run.json").read_text())["val_score"] == max(r["val_score"] for r in cells)  # chosen on validation


def test_param_budget_compares_target_sets_at_equal_lora_parameters(tmp_path):
    out = tmp_path / "budget"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qk,all", "--vision", "frozen",
                     "--param-budget", "20000", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--param-budget 20,000: qk r22, all r4" in result.stdout.replace("\n", " ")
    cells = {r["cell"]["targets"]: r for r in records(out) if r["kind"] == "cell"}
    assert cells["qk"]["cell"]["rank"] == 22 and cells["all"]["cell"]["rank"] == 4
    assert all(abs(r["trainable_params"] - 20000) < 1000 for r in cells.values())  # frozen: LLM LoRA only
    assert "param_budget=20000" in (out / "results.md").read_text()


def test_a_raced_grid_makes_the_exhaustive_grids_records_on_fewer_steps(tmp_path):
    """Racing's rung (pause at half the steps, resume the better rates) as a user runs it: the runs it
    finishes are the exhaustive protocol's runs, number for number."""
    grid = [*ONE_CELL[:-1], "0,1", "--lrs", "1e-3,3e-3,1e-2", "--steps", "4"]
    for protocol in ("race", "exhaustive"):
        result = run_cli(*grid, "--out", str(tmp_path / protocol), "--protocol", protocol)
        assert result.returncode == 0, result.stderr[-2000:]
    raced = {r["key"]: r for r in records(tmp_path / "race") if r["kind"] == "cell"}
    full = {r["key"]: r for r in records(tmp_path / "exhaustive") if r["kind"] == "cell"}
    assert sorted(r["status"] for r in raced.values()) == ["ok", "ok", "ok", "raced"]  # 3 rungs, 2 go on, 1 more seed
    assert [r["steps_trained"] for r in raced.values() if r["status"] == "raced"] == [2]
    for key, r in raced.items():
        if r["status"] == "ok":
            assert r["losses"] == full[key]["losses"] and r["val_curve"] == full[key]["val_curve"]
            assert r["val_score"] == full[key]["val_score"] and r["score"] == full[key]["score"]
    md = (tmp_path / "race" / "results.md").read_text()
    assert "### Racing" in md and "stopped at the racing rung" in md
    assert not (tmp_path / "race" / ".paused").exists()  # paused states are removed once decided


def test_lora_variants_are_cells_of_the_matrix(tmp_path):
    """--variants lora,dora: a record per variant, plain LoRA's cell without a variant field (its key as
    before), the variant in results.csv and in the cell names of results.md."""
    out = tmp_path / "variants"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--variants", "lora,dora", "--targets", "qv", "--vision", "frozen",
                     "--seeds", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LoRA variants: lora" in result.stdout and "dora (DoRA" in result.stdout.replace("\n", " ")
    cells = {r["cell"].get("variant", "lora"): r for r in records(out) if r["kind"] == "cell"}
    assert set(cells) == {"lora", "dora"} and all(r["status"] == "ok" for r in cells.values())
    assert "variant" not in cells["lora"]["cell"] and cells["dora"]["cell"]["variant"] == "dora"
    assert cells["lora"]["key"].startswith("qv-r4-a8-frozen-s0-") and cells["dora"]["key"].startswith("qv-r4-a8-frozen-dora-s0-")
    assert cells["dora"]["trainable_params"] > cells["lora"]["trainable_params"]  # DoRA's magnitudes
    df = pd.read_csv(out / "results.csv")
    assert "variant" in df.columns and sorted(df.variant) == ["base", "dora", "lora"]
    md = (out / "results.md").read_text()
    assert "`qv-r4-a8-frozen-dora`" in md and "LoRA variant" in md
