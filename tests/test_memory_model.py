"""The memory model's parameter-side terms are exact: checked against the wrapped model and AdamW's state."""

import pytest
import torch

from bench.memory_model import estimate, measured_state_bytes
from bench.space import Cell
from bench.train import attach, detach, resolve


@pytest.mark.parametrize("cell", [Cell("qv", 4, 8, "frozen"), Cell("all", 8, 16, "resampler"),
                                  Cell("qkvo", 16, 32, "resampler+vpm"), Cell("qk", 8, 16, "vpm-lora"),
                                  # LoRA variants: DoRA adds a trained magnitude per output feature; the others no parameter
                                  Cell("all", 8, 16, "resampler", "dora"), Cell("qk", 8, 16, "vpm-lora", "dora"),
                                  Cell("qv", 4, 8, "vpm-lora", "rslora"), Cell("qkvo", 4, 8, "resampler", "pissa"),
                                  Cell("qv", 4, 8, "vpm-lora", "loraplus")],
                         ids=lambda c: c.name)
def test_parameter_and_optimizer_bytes_are_exact(tiny, cell):
    from bench.measure import count_parameters
    from bench.space import TrainSettings
    from bench.train import make_optimizer
    from suites.shapes.generate import generate

    model = tiny.model
    res = resolve(model, tiny.roles, cell)
    cfg = model.config
    guess = estimate(model, res, cell, batch_size=4, seq_len=80, hidden_size=cfg.text["hidden_size"],
                     llm_layers=cfg.text["num_hidden_layers"])
    peft_model = attach(model, res, cell, 0.0, 0)
    try:
        counted = count_parameters(peft_model)  # what every run records as trainable_params / total_params
        settings = TrainSettings(steps=1, batch_size=4, lr=1e-3, lr_connector=1e-3, lr_vision=1e-3)
        optimizer = make_optimizer(peft_model, tiny.roles, settings)  # the one training uses (LoRA+: its own groups)
        items = list(generate(4, seed=3))
        batch = tiny.train_batch([tiny.example(i["question"], i["image"], i["answers"][0]) for i in items], torch.device("cpu"))
        tiny.forward_loss(peft_model, batch).backward()
        optimizer.step()
        actual = measured_state_bytes(peft_model, optimizer)
    finally:
        tiny.model = detach(peft_model)
    assert guess.trainable_params == actual["trainable_params"] == counted[0]
    assert guess.frozen_params + guess.trainable_params == counted[1]
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


@pytest.mark.parametrize("mode", ["kernel", "sampled"])
def test_cpu_growth_is_the_blocks_own_after_earlier_work_freed_memory(mode, monkeypatch):
    """Memory freed by earlier work stays in the C allocator; a block that reuses it grew all the same
    (a frozen cell right after a vpm-lora cell read 0 MiB growth): it is released before the baseline."""
    from bench import measure

    monkeypatch.setattr(measure, "CPU_PEAK", mode)
    chunks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB on the heap, in pieces below mmap's threshold
    pins = chunks[::16]  # what stays pins the heap, so glibc keeps the freed pieces between them
    del chunks
    with measure.PeakMemory(torch.device("cpu")) as mem:
        block = [bytearray(64 * 1024) for _ in range(1600)]  # 100 MiB
        del block
    del pins
    assert mem.delta_mib > 80, mem.delta_mib
    assert mem.released


@pytest.mark.parametrize("mode", ["kernel", "sampled"])
def test_paused_blocks_are_left_out_of_the_peak(mode, monkeypatch):
    """Validation checkpoints inside training: neither their peak nor what they leave allocated counts."""
    import time

    import numpy as np

    from bench import measure

    monkeypatch.setattr(measure, "CPU_PEAK", mode)
    with measure.PeakMemory(torch.device("cpu")) as mem:
        kept = np.ones((40, 1024, 128))  # 40 MiB, the block's own
        with mem.paused():
            spike = np.ones((160, 1024, 128))  # 160 MiB, freed inside the pause
            time.sleep(0.05)
            del spike
            left = np.ones((30, 1024, 128))  # 30 MiB, left allocated by the pause
        time.sleep(0.05)
    del kept, left
    assert 35 < mem.delta_mib < 55, mem.delta_mib


def test_cuda_peak_is_max_memory_allocated_less_the_paused_blocks(monkeypatch):
    """CUDA keeps ``max_memory_allocated`` (reset at entry); a pause's own peak is left out (a fake allocator:
    no GPU here)."""
    from bench import measure

    class Allocator:
        now = peak = reserved = 0

        def alloc(self, n):
            self.now += n
            self.peak = max(self.peak, self.now)
            self.reserved = max(self.reserved, self.now)

        def reset(self, *_):
            self.peak = self.reserved = self.now

    gpu = Allocator()
    gpu.alloc(500)  # weights, before the block
    for name, fn in {"synchronize": lambda *_: None, "reset_peak_memory_stats": gpu.reset,
                     "memory_allocated": lambda *_: gpu.now, "max_memory_allocated": lambda *_: gpu.peak,
                     "max_memory_reserved": lambda *_: gpu.reserved}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    with measure.PeakMemory(torch.device("cuda")) as mem:
        gpu.alloc(300)  # a training step's peak
        gpu.alloc(-300)
        with mem.paused():
            gpu.alloc(2000)  # validation: generation's KV cache
            gpu.alloc(-2000)
        gpu.alloc(100)
        gpu.alloc(-100)
    assert mem.kind == "cuda_max_allocated"
    assert mem.peak_mib * measure.MIB == 800 and mem.delta_mib * measure.MIB == 300 and mem.baseline_mib * measure.MIB == 500
    with measure.PeakMemory(torch.device("cuda")) as plain:
        gpu.alloc(50)
        gpu.alloc(-50)
    assert plain.peak_mib * measure.MIB == 550
