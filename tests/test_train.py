import hashlib

import pytest
import torch
from accelerate import Accelerator

from bench.errors import BenchError
from bench.models.adapter import RoleMap
from bench.space import Cell, TrainSettings
from bench.train import attach, batch_order, detach, resolve, train
from suites.shapes.generate import generate

SETTINGS = TrainSettings(steps=4, batch_size=4, lr=5e-3, lr_connector=5e-3, lr_vision=5e-3, warmup_steps=1)


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def examples(tiny):
    return [tiny.example(f"{it['question']}\nAnswer the question using a single word or phrase.", it["image"], it["answers"][0])
            for it in generate(32, seed=11)]


def run_cell(tiny, examples, cell, seed=0):
    from accelerate.utils import set_seed

    set_seed(seed)
    res = resolve(tiny.model, tiny.roles, cell)
    peft_model = attach(tiny.model, res, cell, 0.05, seed)
    try:
        result = train(tiny, peft_model, examples, SETTINGS, seed, Accelerator(cpu=True))
        batch = tiny.prompt_batch([e.prompt_ids for e in examples[:8]], [e.pixels for e in examples[:8]], torch.device("cpu"))
        answers = tiny.decode(tiny.generate_ids(peft_model, batch, 6))
    finally:
        tiny.model = detach(peft_model)
    return result, answers


def test_resolution_per_target_set(tiny):
    layers = tiny.model.llm.config.num_hidden_layers
    expected = {"qk": 2, "qv": 2, "qkv": 3, "qkvo": 4, "all": 7}
    for targets, per_layer in expected.items():
        res = resolve(tiny.model, tiny.roles, Cell(targets, 4, 8, "frozen"))
        assert len(res.lora) == per_layer * layers
        assert all(n.startswith("llm.") for n in res.lora)
        assert res.full == []
    qk = resolve(tiny.model, tiny.roles, Cell("qk", 4, 8, "frozen")).lora
    assert not any("v_proj" in n or "o_proj" in n for n in qk)


def test_resolution_per_vision_policy(tiny):
    assert resolve(tiny.model, tiny.roles, Cell("qv", 4, 8, "resampler")).full == ["resampler"]
    assert resolve(tiny.model, tiny.roles, Cell("qv", 4, 8, "resampler+vpm")).full == ["resampler", "vpm"]
    res = resolve(tiny.model, tiny.roles, Cell("qv", 4, 8, "vpm-lora"))
    assert res.full == ["resampler"]
    assert any(n.startswith("vpm.") for n in res.lora)


def test_target_set_matching_nothing_is_an_error(tiny):
    broken = RoleMap(vision="vpm", connector="resampler", llm_layer=r"decoder\.block\.\d+",
                     attention={"q": "q", "k": "k", "v": "v", "o": "o"}, mlp={"gate": "g", "up": "u", "down": "d"},
                     vision_linear=r"vpm\..*q_proj")
    with pytest.raises(BenchError, match="matches no module"):
        resolve(tiny.model, broken, Cell("qk", 4, 8, "frozen"))


def test_trainable_parameters_follow_the_policy(tiny, examples):
    lora_only, _ = run_cell(tiny, examples, Cell("qv", 4, 8, "frozen"))
    with_resampler, _ = run_cell(tiny, examples, Cell("qv", 4, 8, "resampler"))
    resampler = sum(p.numel() for p in tiny.model.resampler.parameters())
    assert with_resampler.trainable_params == lora_only.trainable_params + resampler


def test_runs_do_not_leak_into_the_base_model_or_each_other(tiny, examples):
    before = fingerprint(tiny.model)
    first, first_answers = run_cell(tiny, examples, Cell("all", 4, 8, "resampler+vpm"))
    assert fingerprint(tiny.model) == before
    other, _ = run_cell(tiny, examples, Cell("qv", 8, 16, "vpm-lora"), seed=3)
    assert fingerprint(tiny.model) == before
    again, again_answers = run_cell(tiny, examples, Cell("all", 4, 8, "resampler+vpm"))
    assert fingerprint(tiny.model) == before
    assert first.losses == again.losses
    assert first_answers == again_answers
    assert first.losses != other.losses


def test_seed_changes_lora_init_and_data_order(tiny, examples):
    a, _ = run_cell(tiny, examples, Cell("qv", 4, 8, "frozen"), seed=0)
    b, _ = run_cell(tiny, examples, Cell("qv", 4, 8, "frozen"), seed=1)
    assert a.losses != b.losses
    assert batch_order(32, 4, 4, 0) == batch_order(32, 4, 4, 0)
    assert batch_order(32, 4, 4, 0) != batch_order(32, 4, 4, 1)


def test_nan_loss_stops_the_run_as_diverged(tiny, examples):
    from bench.train import Diverged

    bad = TrainSettings(steps=3, batch_size=4, lr=float("inf"), lr_connector=float("inf"), lr_vision=float("inf"), warmup_steps=1)
    cell = Cell("qv", 4, 8, "frozen")
    res = resolve(tiny.model, tiny.roles, cell)
    before = fingerprint(tiny.model)
    peft_model = attach(tiny.model, res, cell, 0.0, 0)
    try:
        with pytest.raises(Diverged, match="loss is nan"):
            train(tiny, peft_model, examples, bad, 0, Accelerator(cpu=True))
    finally:
        tiny.model = detach(peft_model)
    assert fingerprint(tiny.model) == before


def test_gradient_checkpointing_gives_the_same_losses(tiny, examples):
    """Recomputing activations changes memory, not numbers (and it is switched off again afterwards)."""
    from transformers import PreTrainedModel

    cell = Cell("all", 4, 8, "resampler+vpm")
    res = resolve(tiny.model, tiny.roles, cell)
    losses = {}
    for checkpointing in (False, True):
        settings = TrainSettings(steps=4, batch_size=8, lr=1e-3, lr_connector=1e-3, lr_vision=1e-3, warmup_steps=1, lora_dropout=0.0,
                                 gradient_checkpointing=checkpointing)
        peft_model = attach(tiny.model, res, cell, 0.0, 0)
        try:
            losses[checkpointing] = train(tiny, peft_model, examples, settings, 0, Accelerator(cpu=True)).losses
        finally:
            tiny.model = detach(peft_model)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny.model.modules() if isinstance(m, PreTrainedModel))
    assert "gradient_checkpointing" not in TrainSettings(steps=1, batch_size=1, lr=1.0, lr_connector=1.0, lr_vision=1.0).to_dict()


def test_frozen_vision_encoder_is_served_from_the_cache_with_identical_numbers(tiny, examples):
    """Cells that leave the encoder frozen share its outputs per (seed, batch, step): later cells load
    them, and their losses and trained weights are bit-for-bit those of an uncached run."""
    from accelerate.utils import set_seed

    from bench.vision_cache import VisionCache, encoder_is_frozen

    def run(cell, cache):
        set_seed(0)
        res = resolve(tiny.model, tiny.roles, cell)
        use = cache if encoder_is_frozen(tiny.roles.vision, res.lora, res.full) else None
        peft_model = attach(tiny.model, res, cell, 0.05, 0)
        try:
            result = train(tiny, peft_model, examples, SETTINGS, 0, Accelerator(cpu=True), vision_cache=use)
            trained = fingerprint(peft_model)
        finally:
            tiny.model = detach(peft_model)
        return result.losses, trained

    frozen, resampler = Cell("qv", 4, 8, "frozen"), Cell("all", 8, 16, "resampler")
    plain = {c: run(c, None) for c in (frozen, resampler)}
    cache = VisionCache()
    try:
        assert run(frozen, cache) == plain[frozen]
        assert (cache.misses, cache.hits) == (SETTINGS.steps, 0)
        assert run(resampler, cache) == plain[resampler]  # a later cell, served from the cache
        assert (cache.misses, cache.hits) == (SETTINGS.steps, SETTINGS.steps)
        run(Cell("qv", 4, 8, "vpm-lora"), cache)  # trains inside the encoder: never served
        run(Cell("qv", 4, 8, "resampler+vpm"), cache)
        assert (cache.misses, cache.hits) == (SETTINGS.steps, SETTINGS.steps)
        folder = cache.folder
        assert folder.is_dir() and len(list(folder.iterdir())) == SETTINGS.steps
    finally:
        cache.clear()
    assert not folder.exists()
    assert "forward" not in vars(tiny.model.get_submodule(tiny.roles.vision))  # unpatched after training

    bounded = VisionCache(max_bytes=0)  # nothing fits: every step computes
    assert run(frozen, bounded) == plain[frozen] and bounded.hits == 0 and bounded.folder is None


def test_encoder_is_frozen_follows_the_policy(tiny):
    from bench.vision_cache import encoder_is_frozen

    frozen = {v: encoder_is_frozen(tiny.roles.vision, *(lambda r: (r.lora, r.full))(resolve(tiny.model, tiny.roles, Cell("qv", 4, 8, v))))
              for v in ("frozen", "resampler", "resampler+vpm", "vpm-lora")}
    assert frozen == {"frozen": True, "resampler": True, "resampler+vpm": False, "vpm-lora": False}
    assert not encoder_is_frozen("model.visual", [], ["model.visual.merger"])  # Qwen: the merger sits inside


def test_each_part_trains_at_its_own_rate(tiny):
    """LoRA matrices, the connector and the vision encoder get their own AdamW groups and rates."""
    from bench.train import param_groups

    settings = TrainSettings(steps=1, batch_size=1, lr=1e-2, lr_connector=1e-3, lr_vision=1e-4)
    for vision, parts in (("frozen", {"lora"}), ("resampler", {"lora", "connector"}),
                          ("resampler+vpm", {"lora", "connector", "vision"}), ("vpm-lora", {"lora", "connector"})):
        cell = Cell("qv", 4, 8, vision)
        peft_model = attach(tiny.model, resolve(tiny.model, tiny.roles, cell), cell, 0.0, 0)
        try:
            groups = {g["part"]: g for g in param_groups(peft_model, tiny.roles, settings)}
            assert set(groups) == parts, vision
            rates = {"lora": 1e-2, "connector": 1e-3, "vision": 1e-4}
            assert all(g["lr"] == rates[p] for p, g in groups.items())
            names = {id(p): n for n, p in peft_model.named_parameters()}
            assert all("lora_" in names[id(p)] for p in groups["lora"]["params"])  # vpm-lora's vision LoRA too
            if "connector" in groups:
                assert all(".resampler." in names[id(p)] for p in groups["connector"]["params"])
            if "vision" in groups:
                assert all(".vpm." in names[id(p)] and "lora_" not in names[id(p)] for p in groups["vision"]["params"])
            trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
            assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable
        finally:
            tiny.model = detach(peft_model)


def test_checkpoints_run_with_the_clock_paused(tiny, examples, monkeypatch):
    import time

    from bench import measure

    skipped = [0.0]  # each checkpoint moves the clock an hour forward
    monkeypatch.setattr(measure.time, "perf_counter", lambda: time.monotonic() + skipped[0])

    def checkpoint(step, model):
        seen.append((step, model.training))
        skipped[0] += 3600.0

    seen = []
    cell = Cell("qv", 4, 8, "frozen")
    peft_model = attach(tiny.model, resolve(tiny.model, tiny.roles, cell), cell, 0.0, 0)
    try:
        result = train(tiny, peft_model, examples, SETTINGS, 0, Accelerator(cpu=True), checkpoints=(2, 3),
                       on_checkpoint=checkpoint)
    finally:
        tiny.model = detach(peft_model)
    assert seen == [(2, False), (3, False)]  # evaluated in eval mode, after those steps
    assert 0 < result.train_s < 3600  # the checkpoints' two hours are not training time


def test_parameter_budget_gives_each_target_set_its_rank(tiny):
    from bench.train import lora_params_per_rank, ranks_for_budget

    per_rank = {t: lora_params_per_rank(tiny.model, tiny.roles, t) for t in ("qk", "qv", "qkvo", "all")}
    assert per_rank["qk"] < per_rank["qkvo"] < per_rank["all"]
    budget = 8 * per_rank["qkvo"]
    ranks = ranks_for_budget(tiny.model, tiny.roles, list(per_rank), budget)
    assert ranks["qkvo"] == 8 and ranks["qk"] > 8 > ranks["all"] >= 1
    for t, r in ranks.items():  # each within half a rank step of the budget
        assert abs(r * per_rank[t] - budget) <= per_rank[t] / 2 + 1e-9
    cell = Cell("qk", ranks["qk"], 2 * ranks["qk"], "frozen")
    peft_model = attach(tiny.model, resolve(tiny.model, tiny.roles, cell), cell, 0.0, 0)
    try:
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    finally:
        tiny.model = detach(peft_model)
    assert lora == ranks["qk"] * per_rank["qk"]


def test_a_paused_and_resumed_run_is_the_uninterrupted_run(tiny, examples):
    """Racing's rungs (bench/race.py) rely on it: same losses, same weights, bit for bit, though other
    runs (and their random draws) happen in between."""
    import dataclasses

    from accelerate.utils import set_seed

    settings = dataclasses.replace(SETTINGS, steps=6, lora_dropout=0.1)
    cell = Cell("qv", 4, 8, "resampler+vpm")  # LoRA, a fully trained connector and encoder: all kinds of state
    res = resolve(tiny.model, tiny.roles, cell)

    def leg(pause_at=None, resume=None):
        set_seed(3)
        peft_model = attach(tiny.model, res, cell, settings.lora_dropout, 3)
        try:
            result = train(tiny, peft_model, examples, settings, 3, Accelerator(cpu=True), pause_at=pause_at, resume=resume)
            weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        finally:
            tiny.model = detach(peft_model)
        return result, weights

    whole, whole_weights = leg()
    first, _ = leg(pause_at=3)
    assert first.state is not None and first.state["step"] == 3 and len(first.losses) == 3
    torch.rand(1000)  # another run's draws in between
    rest, rest_weights = leg(resume=first.state)
    assert rest.state is None
    assert rest.losses == whole.losses
    assert all(torch.equal(rest_weights[n], whole_weights[n]) for n in whole_weights)
