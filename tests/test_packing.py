"""Packed runs make the numbers of the same runs trained one after another, and export as normal PEFT adapters."""

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel

from bench.errors import BenchError
from bench.packing import export_weights, load_into, lora_weights, pack, train_packed
from bench.space import Cell, TrainSettings
from bench.train import attach, detach, resolve, train
from suites.shapes.generate import generate
from test_train import fingerprint

SETTINGS = TrainSettings(steps=4, batch_size=4, lr=5e-3, lr_connector=5e-3, lr_vision=5e-3, warmup_steps=1, lora_dropout=0.0)
CELL = Cell("qv", 4, 8.0, "frozen")


@pytest.fixture(scope="module")
def examples(tiny):
    return [tiny.example(f"{it['question']}\nAnswer the question using a single word or phrase.", it["image"], it["answers"][0])
            for it in generate(24, seed=5)]


def sequential(tiny, examples, seed, lr):
    res = resolve(tiny.model, tiny.roles, CELL)
    peft_model = attach(tiny.model, res, CELL, 0.0, seed)
    try:
        result = train(tiny, peft_model, examples, SETTINGS.at(lr), seed, Accelerator(cpu=True))
        weights = lora_weights(peft_model, res.lora)
    finally:
        tiny.model = detach(peft_model)
    return result.losses, weights


@pytest.mark.parametrize("seeds,lrs", [([0, 1], [5e-3, 5e-3]), ([2, 2, 2], [1e-3, 5e-3, 2e-2])], ids=["seeds", "learning-rates"])
def test_packed_runs_equal_sequential_runs(tiny, examples, seeds, lrs):
    before = fingerprint(tiny.model)
    expected = [sequential(tiny, examples, s, lr) for s, lr in zip(seeds, lrs)]
    p = pack(tiny.model, resolve(tiny.model, tiny.roles, CELL), CELL, 0.0, seeds)
    try:
        result = train_packed(tiny, p, examples, SETTINGS, lrs, Accelerator(cpu=True))
        weights = [export_weights(p, k) for k in range(len(seeds))]
    finally:
        tiny.model = p.unpack()
    assert fingerprint(tiny.model) == before  # the base comes back untouched
    assert len(result.losses) == len(seeds)
    for k, (losses, w) in enumerate(expected):
        assert result.losses[k] == pytest.approx(losses, abs=1e-5)
        assert max(float((weights[k][n] - w[n]).abs().max()) for n in w) < 1e-4
        assert max(float((weights[k][n] - w[n]).abs().max()) for n in w if "lora_B" in n) > 0  # it trained
    assert any(not torch.equal(weights[0][n], weights[-1][n]) for n in weights[0])  # each run trained its own adapter


def test_packed_run_exports_a_peft_folder(tiny, examples, tmp_path):
    res = resolve(tiny.model, tiny.roles, CELL)
    p = pack(tiny.model, res, CELL, 0.0, [0, 1])
    try:
        train_packed(tiny, p, examples, SETTINGS, [5e-3, 1e-2], Accelerator(cpu=True))
        weights = export_weights(p, 1)
    finally:
        tiny.model = p.unpack()
    peft_model = attach(tiny.model, res, CELL, 0.0, 1)
    try:
        load_into(peft_model, weights)
        peft_model.save_pretrained(tmp_path / "run1")
    finally:
        tiny.model = detach(peft_model)
    loaded = PeftModel.from_pretrained(tiny.model, tmp_path / "run1")
    try:
        reloaded = lora_weights(loaded, res.lora)
        assert reloaded.keys() == weights.keys()
        assert all(torch.equal(reloaded[n], weights[n]) for n in weights)
    finally:
        tiny.model = loaded.unload()


def test_pack_refuses_cells_that_train_vision(tiny):
    cell = Cell("qv", 4, 8.0, "resampler")
    with pytest.raises(BenchError, match="frozen vision encoder"):
        pack(tiny.model, resolve(tiny.model, tiny.roles, cell), cell, 0.0, [0, 1])


def test_packed_runs_need_one_rate_each(tiny, examples):
    p = pack(tiny.model, resolve(tiny.model, tiny.roles, CELL), CELL, 0.0, [0, 1])
    try:
        with pytest.raises(BenchError, match="one rate per run"):
            train_packed(tiny, p, examples, SETTINGS, [1e-3], Accelerator(cpu=True))
    finally:
        tiny.model = p.unpack()
