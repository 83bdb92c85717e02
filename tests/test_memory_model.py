"""The memory model's parameter-side terms are exact: checked against the wrapped model and AdamW's state."""

import pytest
import torch

from bench.memory_model import estimate, measured_state_bytes
from bench.space import Cell
from bench.train import attach, detach, resolve


@pytest.mark.parametrize("cell", [Cell("qv", 4, 8, "frozen"), Cell("all", 8, 16, "resampler"),
                                  Cell("qkvo", 16, 32, "resampler+vpm"), Cell("qk", 8, 16, "vpm-lora")],
                         ids=lambda c: c.name)
def test_parameter_and_optimizer_bytes_are_exact(tiny, cell):
    from suites.shapes.generate import generate

    model = tiny.model
    res = resolve(model, tiny.roles, cell)
    cfg = model.config
    guess = estimate(model, res, cell, batch_size=4, seq_len=80, hidden_size=cfg.text["hidden_size"],
                     llm_layers=cfg.text["num_hidden_layers"])
    peft_model = attach(model, res, cell, 0.0, 0)
    try:
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
        items = list(generate(4, seed=3))
        batch = tiny.train_batch([tiny.example(i["question"], i["image"], i["answers"][0]) for i in items], torch.device("cpu"))
        tiny.forward_loss(peft_model, batch).backward()
        optimizer.step()
        actual = measured_state_bytes(peft_model, optimizer)
    finally:
        tiny.model = detach(peft_model)
    assert guess.trainable_params == actual["trainable_params"]
    assert guess.frozen_params == actual["frozen_params"]
    assert guess.weight_bytes == actual["weight_bytes"]
    assert guess.grad_bytes == actual["grad_bytes"]
    assert guess.optimizer_bytes == actual["optimizer_bytes"]
    assert guess.activation_bytes > 0 and guess.total_bytes > guess.weight_bytes


@pytest.mark.parametrize("mode", ["kernel", "sampled"])
def test_cpu_peak_catches_a_transient_allocation(mode, monkeypatch):
    import time

    import numpy as np

    from bench import measure

    monkeypatch.setattr(measure, "CPU_PEAK", mode)
    with measure.PeakMemory(torch.device("cpu")) as mem:
        block = np.ones((160, 1024, 128))  # 160 MiB, freed before the block ends
        time.sleep(0.05)
        del block
    assert mem.delta_mib > 150
