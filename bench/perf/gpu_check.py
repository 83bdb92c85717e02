"""The GPU check: what only a GPU can show, in one run of under ten minutes on one H100/H200.

    python -m bench.perf.gpu_check --out results/gpu-check        # needs CUDA
    python -m bench.perf.gpu_check --cpu-dry-run --out /tmp/gc    # the same code path, tiny sizes, on CPU

1. The smoke matrix (with all four vision policies) on CUDA in bf16 for the embedded model and for a tiny random Qwen2-VL checkpoint
   (built offline): every run ok, CUDA peak memory and throughput recorded; the memory model's
   prediction for each of those cells against its ``max_memory_allocated`` (goal: within 10%).
2. Racing on the device: a raced smoke matrix against the exhaustive one; resumed runs must be the
   uninterrupted runs (the CUDA random state is saved and restored at the pause).
   Then every transformers-native family's tiny checkpoint through a short smoke matrix, and two
   data-parallel processes against one (needs two GPUs; skipped on one). The tiny Qwen2-VL trained at three
   ``max_pixels`` settings (bench/perf/resolution.py): CUDA peak beside the memory model at each resolution.
3. Packed runs (bench/packing.py): K = 4 runs packed against the same runs one after another, on the embedded
   model through the harness (seeds; learning rates) and one step on the ~1B model below (goals 0.4 and 0.7).
4. One LoRA training step timed on a synthetic ~1B-parameter Qwen2-VL (random weights, bf16; LoRA
   r=16 on every LLM linear; batch x sequence of realistic length with image tokens): tokens/s,
   CUDA peak memory, and model-FLOPs utilisation. FLOPs are counted as 2 x params x tokens for the
   forward pass and twice that again for the backward (6NT, the usual MFU convention); with LoRA the
   frozen weights' gradients are never computed, so 4NT is the work actually needed and is reported
   next to it.

Writes ``gpu-check.md`` and ``gpu-check.json`` named after the card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def smoke(model: str | None, out: Path, device: str) -> dict:
    cmd = [sys.executable, str(ROOT / "run_bench.py"), "--suite", "docvqa", "--preset", "smoke", "--device", device,
           "--vision", "frozen,resampler,resampler+vpm,vpm-lora",  # CUDA peak memory for every vision policy
           "--save-adapters", "none", "--out", str(out)] + (["--model", model] if model else [])
    shutil.rmtree(out, ignore_errors=True)  # measure afresh: an earlier run's records would be reused
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed", "wall_s": round(wall, 1)}
    df = pd.read_csv(out / "results.csv")
    cells = df[df.kind == "cell"]
    return {"ok": bool((cells.status == "ok").all()), "runs": len(cells), "wall_s": round(wall, 1),
            "memory_kind": sorted(cells.memory_kind.dropna().unique()),
            "peak_mem_mib": [round(float(v), 1) for v in cells.peak_mem_mib],
            "train_samples_per_s": [round(float(v), 1) for v in cells.train_samples_per_s],
            "recorded": bool(cells.peak_mem_mib.notna().all() and (cells.train_samples_per_s > 0).all())}


def race_check(out: Path, device: str) -> dict:
    """Racing's pause and resume on this device: a raced smoke matrix (3 rates x 3 seeds) against the
    same matrix trained exhaustively. Resumed runs must equal uninterrupted ones (CUDA random state
    included), or the race's choices would not be the exhaustive protocol's."""
    from bench.store import Store

    common = [sys.executable, str(ROOT / "run_bench.py"), "--suite", "docvqa", "--preset", "smoke", "--targets", "qv",
              "--lrs", "1e-3,3e-3,1e-2", "--seeds", "0,1,2", "--steps", "8", "--device", device, "--save-adapters", "none"]
    walls, records = {}, {}
    for protocol in ("race", "exhaustive"):
        folder = out / f"race-check-{protocol}"
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        done = subprocess.run([*common, "--protocol", protocol, "--out", str(folder)], capture_output=True, text=True)
        walls[protocol] = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            return {"ok": False, "error": f"{protocol}: " + (done.stderr.strip().splitlines() or ["failed"])[-1]}
        records[protocol] = {r["key"]: r for r in Store(folder).all() if r.get("kind") == "cell"}
    raced = [r for r in records["race"].values() if r["status"] == "ok"]
    same = [r for r in raced if records["exhaustive"].get(r["key"], {}).get("losses") == r["losses"]
            and records["exhaustive"][r["key"]].get("val_score") == r["val_score"]]
    gap = max((abs(records["exhaustive"][r["key"]]["val_score"] - r["val_score"]) for r in raced if r["key"] in records["exhaustive"]), default=None)
    steps = sum(r.get("steps_trained") or 0 for r in records["race"].values())
    return {"ok": len(same) == len(raced), "identical": f"{len(same)} of {len(raced)}", "max_val_gap": gap,
            "race_steps": steps, "exhaustive_steps": sum(r.get("steps_trained") or 0 for r in records["exhaustive"].values()),
            "wall_s": walls}


def families_check(root: Path, out: Path, device: str) -> dict:
    """Every transformers-native family (tiny random checkpoints, tests/hf_families.py) through the smoke
    matrix on this device, in this process (imports paid once): frozen and vpm-lora cells, 16 items."""
    import hf_families

    from bench.cli import main as bench_main
    from bench.store import read_record, record_files

    rows = {}
    for name in sorted(hf_families.FAMILIES):
        folder, runs = root / name, out / f"family-{name}"
        shutil.rmtree(runs, ignore_errors=True)
        start = time.perf_counter()
        try:
            hf_families.save(name, folder)
            code = bench_main(["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,vpm-lora",
                               "--limit", "16", "--device", device, "--save-adapters", "none", "--model", str(folder),
                               "--out", str(runs)])
            cells = [r for r in (read_record(p) for p in record_files(runs / "records")) if r["kind"] == "cell"]
            rows[name] = {"ok": code == 0 and len(cells) == 2 and all(r["status"] == "ok" for r in cells),
                          "errors": [r.get("error") for r in cells if r["status"] != "ok"],
                          "peak_mem_mib": [round(r.get("peak_mem_mib") or 0, 1) for r in cells]}
        except Exception as exc:  # noqa: BLE001 - one family's failure is reported, the others still run
            rows[name] = {"ok": False, "errors": [f"{type(exc).__name__}: {exc}".splitlines()[0]]}
        rows[name]["wall_s"] = round(time.perf_counter() - start, 1)
    return {"ok": all(r["ok"] for r in rows.values()), "families": rows}


def data_parallel_check(out: Path, dry: bool) -> dict:
    """Two data-parallel processes (accelerate launch) against one on the same raced smoke matrix
    (LoRA dropout 0): the records must agree within rounding. Needs two GPUs (or the CPU in a dry run)."""
    import socket

    from bench.store import Store

    gpus = torch.cuda.device_count()
    if not dry and gpus < 2:
        return {"ok": None, "skipped": f"{gpus} GPU(s): two processes need two"}
    device = "cpu" if dry else "cuda"
    args = ["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler", "--lora-dropout", "0",
            "--lrs", "1e-3,3e-3,1e-2", "--seeds", "0,1", "--steps", "8", "--device", device, "--save-adapters", "none"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    records, walls = {}, {}
    for name, head in (("one", [sys.executable]), ("two", launch)):
        folder = out / f"data-parallel-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        done = subprocess.run([*head, str(ROOT / "run_bench.py"), *args, "--out", str(folder)], capture_output=True, text=True)
        walls[name] = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            return {"ok": False, "error": f"{name}: " + (done.stderr.strip().splitlines() or ["failed"])[-1]}
        records[name] = {(r["cell"]["vision"], r["train"]["lr"], r["seed"]): r for r in Store(folder).all() if r.get("kind") == "cell"}
    one, two = records["one"], records["two"]
    gaps = [max(abs(p - q) for p, q in zip(one[k]["losses"], two[k]["losses"])) for k in one if k in two]
    same_scores = sum(one[k].get("val_curve") == two[k].get("val_curve") and one[k].get("score") == two[k].get("score")
                      for k in one if k in two)
    return {"ok": one.keys() == two.keys() and max(gaps, default=1) < 1e-2, "runs": len(one), "max_loss_gap": max(gaps, default=None),
            "same_scores": f"{same_scores} of {len(one)}", "wall_s": walls}


def memory_check(model: str, out: Path, device_type: str) -> dict:
    """The memory model's prediction for each smoke cell against what the run measured (on CUDA:
    ``max_memory_allocated``, which includes the weights, as the estimate does). Goal: within 10%."""
    from bench.memory_model import estimate_on
    from bench.models import get_adapter
    from bench.space import Cell

    csv = out / "results.csv"
    if not csv.is_file():
        return {"ok": False, "error": "no smoke results"}
    adapter = get_adapter(model)
    skeleton = adapter.skeleton()
    size = adapter.weight_dtype(device_type).itemsize
    tokens = adapter.image_tokens() or 0
    batch = 8  # the smoke preset's batch size
    rows = []
    df = pd.read_csv(csv)
    for r in df[(df.kind == "cell") & (df.status == "ok")].itertuples():
        seq = max(1, round(r.train_tokens_per_s / r.train_samples_per_s))  # mean tokens per sequence, measured
        cell = Cell(r.target_set, int(r.rank), float(r.alpha), r.vision_policy, getattr(r, "variant", "lora"))
        e = estimate_on(skeleton, adapter.roles, cell, batch, seq, tokens, size)
        predicted = e.total_bytes / 2**20
        rows.append({"cell": cell.name, "seq": seq, "predicted_mib": round(predicted, 1), "measured_mib": round(float(r.peak_mem_mib), 1),
                     "ratio": round(predicted / float(r.peak_mem_mib), 3) if r.peak_mem_mib else None})
    within = [abs(x["ratio"] - 1) <= 0.10 for x in rows if x["ratio"] is not None]
    return {"ok": bool(rows), "comparable": device_type == "cuda", "cells": rows, "within_10pct": f"{sum(within)} of {len(within)}"}


def resolution_check(folder: Path, device: torch.device, dry: bool) -> dict:
    """The tiny Qwen2-VL trained at three max_pixels settings (bench/perf/resolution.py): on CUDA the
    measured peak allocated memory beside the memory model's estimate at each resolution."""
    from bench.perf.resolution import measure

    try:
        rows = measure(folder, device, resolutions=(4096, 16384) if dry else (16384, 50176, 102400), steps=1 if dry else 3)
    except Exception as exc:  # reported, and the check goes on
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    keep = ("max_pixels", "cell", "visual_tokens", "vision_patches", "measured_mib", "estimate_mib", "samples_per_s", "figure")
    return {"ok": True, "rows": [{k: r[k] for k in keep} for r in rows]}


def synthetic_qwen2_vl(dry: bool):
    """A random Qwen2-VL: ~1.0B parameters (or a toy on --cpu-dry-run)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if dry:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2)
        rope = [2, 3, 3]
    else:
        text = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4)
        vision = dict(depth=16, embed_dim=1024, hidden_size=2048, num_heads=16)
        rope = [16, 24, 24]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=32000, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                                           "mrope_section": rope}, **text),
        vision_config=dict(mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=31000, video_token_id=31001, vision_start_token_id=31002, vision_end_token_id=31003,
    )
    return Qwen2VLForConditionalGeneration(config), config


ALL_LLM_LINEAR = r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)"


def synthetic_inputs(config, batch: int, seq: int, grid: int, device, dtype) -> dict:
    """A batch of random token ids with one image of ``grid`` x ``grid`` patches each (labels = ids)."""
    image_tokens = grid * grid // 4
    ids = torch.randint(0, 30000, (batch, seq), device=device)
    ids[:, 1] = config.vision_start_token_id
    ids[:, 2:2 + image_tokens] = config.image_token_id
    ids[:, 2 + image_tokens] = config.vision_end_token_id
    pixels = torch.randn(batch * grid * grid, 3 * 2 * 14 * 14, device=device, dtype=dtype)
    thw = torch.tensor([[1, grid, grid]] * batch, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_grid_thw": thw,
            "mm_token_type_ids": (ids == config.image_token_id).long(), "labels": ids}


def packing_check(dry: bool, device: torch.device) -> dict:
    """K = 4 packed runs against the same runs one after another: on the embedded model through the
    harness (seeds and learning rates, equivalence included), and one step on the ~1B model."""
    from bench.perf.overheads import embedded_docvqa
    from bench.perf.packing import K, compare, synthetic_step

    start = time.perf_counter()
    try:
        adapter, _, examples = embedded_docvqa(256, device.type)
        embedded = compare(adapter, examples, device, reps=1 if dry else 3, steps=3 if dry else 20)
        del adapter
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with torch.device(device):
            model, config = synthetic_qwen2_vl(dry)
        model = model.to(dtype)
        batch, seq, grid = (1, 96, 8) if dry else (2, 1024, 32)
        big = synthetic_step(model, synthetic_inputs(config, batch, seq, grid, device, dtype), ALL_LLM_LINEAR, K, 2 if dry else 5, device, dtype)
        big.update(batch_per_run=batch, seq=seq, params=sum(p.numel() for p in model.parameters()))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as exc:  # a failure here must not lose the rest of the check
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "wall_s": round(time.perf_counter() - start, 1)}
    return {"ok": True, "embedded": embedded, "one_b": big, "wall_s": round(time.perf_counter() - start, 1),
            "goals": "embedded <= 0.4, ~1B <= 0.7 (packed / sequential)"}


def lora_step(dry: bool, device: torch.device, batch: int, seq: int, grid: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model, config = synthetic_qwen2_vl(dry)
    model = model.to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL_LLM_LINEAR))
    image_tokens, patches = grid * grid // 4, grid * grid
    inputs = synthetic_inputs(config, batch, seq, grid, device, dtype)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = peft_model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    tokens = batch * seq
    llm_params = n_params - n_vision
    forward = 2 * llm_params * tokens + 2 * n_vision * batch * patches
    return {"params": n_params, "vision_params": n_vision, "batch": batch, "seq": seq, "image_tokens": image_tokens,
            "step_s_median": step_s, "tokens_per_s": tokens / step_s, "flops_6nt": 3 * forward, "flops_4nt": 2 * forward,
            "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "loss": float(loss)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    p.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the built-in table")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU; run this on a GPU machine, or pass --cpu-dry-run to check the script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    report = {"card": card, "torch": torch.__version__, "command": "python -m bench.perf.gpu_check " + " ".join(argv or sys.argv[1:])}
    sys.path.insert(0, str(ROOT / "tests"))
    import hf_families

    with tempfile.TemporaryDirectory() as tmp:
        hf_families.save("qwen2_vl", Path(tmp) / "qwen2_vl")
        report["smoke_tiny_minicpmv"] = smoke(None, args.out / "smoke-tiny-minicpmv", device.type)
        report["smoke_tiny_qwen2_vl"] = smoke(str(Path(tmp) / "qwen2_vl"), args.out / "smoke-tiny-qwen2-vl", device.type)
        report["memory_model_tiny_minicpmv"] = memory_check("tiny-minicpmv", args.out / "smoke-tiny-minicpmv", device.type)
        report["memory_model_tiny_qwen2_vl"] = memory_check(str(Path(tmp) / "qwen2_vl"), args.out / "smoke-tiny-qwen2-vl", device.type)
        report["families"] = families_check(Path(tmp), args.out, device.type)
        report["resolution"] = resolution_check(Path(tmp) / "qwen2_vl", device, args.cpu_dry_run)
    report["data_parallel"] = data_parallel_check(args.out, args.cpu_dry_run)
    report["race_vs_exhaustive"] = race_check(args.out, device.type)
    report["packing"] = packing_check(args.cpu_dry_run, device)
    batch, seq, steps = (2, 96, 2) if args.cpu_dry_run else (args.batch, args.seq, args.steps)
    step = lora_step(args.cpu_dry_run, device, batch, seq, grid=8 if args.cpu_dry_run else 32, steps=steps)
    peak = peak_tflops(card, args.peak_tflops)
    achieved = step["flops_6nt"] / step["step_s_median"] / 1e12
    step.update(achieved_tflops_6nt=achieved, achieved_tflops_4nt=step["flops_4nt"] / step["step_s_median"] / 1e12,
                peak_tflops=peak, mfu_6nt=achieved / peak if peak else None,
                mfu_4nt=step["flops_4nt"] / step["step_s_median"] / 1e12 / peak if peak else None)
    report["lora_step_1b"] = step
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = [f"# GPU check: {card}", "", f"Command: `{report['command']}`; torch {torch.__version__}", ""]
    for name in ("smoke_tiny_minicpmv", "smoke_tiny_qwen2_vl"):
        r = report[name]
        lines.append(f"- {name}: ok={r.get('ok')}, memory recorded={r.get('recorded')}, kind={r.get('memory_kind')}, "
                     f"peak MiB {r.get('peak_mem_mib')}, samples/s {r.get('train_samples_per_s')}, wall {r.get('wall_s')} s"
                     + (f", error: {r['error']}" if r.get("error") else ""))
    for name in ("memory_model_tiny_minicpmv", "memory_model_tiny_qwen2_vl"):
        r = report[name]
        lines.append(f"- {name}: predicted / measured peak per smoke cell: "
                     + ", ".join(f"{c['cell']} {c['predicted_mib']:.0f}/{c['measured_mib']:.0f} MiB ({c['ratio']})" for c in r.get("cells", []))
                     + f"; within 10%: {r.get('within_10pct')}" + ("" if r.get("comparable") else " (CPU dry run: RSS, not comparable)"))
    r = report["families"]
    lines.append("- every transformers-native family, smoke (qv x frozen, vpm-lora; 16 items): " + ", ".join(
        f"{name} {'ok' if x['ok'] else 'FAILED ' + '; '.join(map(str, x['errors']))} ({x['wall_s']} s)" for name, x in r["families"].items()))
    r = report["resolution"]
    lines.append("- image resolution, tiny Qwen2-VL, measured / estimated MiB per max_pixels and cell: " + (
        ", ".join(f"{x['max_pixels']} {x['cell']} ({x['visual_tokens']} visual tokens) {x['measured_mib'] or 0:.0f}/{x['estimate_mib']:.0f}"
                  for x in r["rows"]) + f" ({r['rows'][0]['figure']})" if r.get("ok") else f"error: {r.get('error')}"))
    r = report["data_parallel"]
    lines.append("- data parallel, 2 processes vs 1, raced smoke (2 cells x 3 rates x 2 seeds, dropout 0): "
                 + (f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error']}" if r.get("error") else
                    f"same runs {r['ok']}, largest loss gap {r['max_loss_gap']:.1e}, same validation curves and scores "
                    f"{r['same_scores']}; wall {r['wall_s']}"))
    r = report["race_vs_exhaustive"]
    lines.append(f"- racing (pause at the rung, resume) vs exhaustive, smoke qv cells x 3 rates x 3 seeds: raced runs identical to "
                 f"uninterrupted ones: {r.get('identical')} (largest validation gap {r.get('max_val_gap')}); steps "
                 f"{r.get('race_steps')} vs {r.get('exhaustive_steps')}; wall {r.get('wall_s')}"
                 + (f"; error: {r['error']}" if r.get("error") else ""))
    r = report["packing"]
    if r.get("ok"):
        for kind, x in r["embedded"].items():
            lines.append(f"- packed runs, embedded model, K = 4 differing in {kind}: packed / sequential {x['ratio']:.3f} "
                         f"({x['packed_s']:.2f} s vs {x['sequential_s']:.2f} s; goal <= 0.4); largest loss gap {x['loss_gap']:.1e}, weight gap {x['weight_gap']:.1e}")
        b = r["one_b"]
        lines.append(f"- packed runs, synthetic Qwen2-VL {b['params'] / 1e9:.2f}B, K = 4 x batch {b['batch_per_run']} x {b['seq']} tokens, LoRA r16 "
                     f"on every LLM linear: packed step {b['packed_s'] * 1e3:.0f} ms vs 4 sequential steps {b['sequential_s'] * 1e3:.0f} ms = {b['ratio']:.3f} (goal <= 0.7)")
    else:
        lines.append(f"- packed runs: error: {r.get('error')}")
    s = step
    lines += ["", f"- LoRA step, synthetic Qwen2-VL {s['params'] / 1e9:.2f}B params ({s['vision_params'] / 1e6:.0f}M vision), "
              f"batch {s['batch']} x {s['seq']} tokens ({s['image_tokens']} image tokens each): median step {s['step_s_median'] * 1e3:.0f} ms, "
              f"{s['tokens_per_s']:.0f} tokens/s, CUDA peak {s['cuda_peak_gib'] if s['cuda_peak_gib'] is None else round(s['cuda_peak_gib'], 1)} GiB",
              f"- model FLOPs: {s['achieved_tflops_6nt']:.0f} TFLOP/s by 6NT"
              + (f" = MFU {s['mfu_6nt']:.0%} of {peak:.0f}; by 4NT (what LoRA computes) {s['mfu_4nt']:.0%}" if peak else " (no peak known)"), ""]
    (args.out / "gpu-check.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
