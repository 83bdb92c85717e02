"""LoRA variants as a factor of the matrix: plain LoRA's keys unchanged, each variant really applied
through peft, the shared base model handed back intact."""

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from bench import train as train_mod
from bench.errors import BenchError
from bench.space import LORAPLUS_LR_RATIO, PRESETS, VARIANTS, Cell, TrainSettings, build_cells
from bench.train import attach, detach, resolve, train
from suites.shapes.generate import generate
from test_train import fingerprint

SETTINGS = TrainSettings(steps=2, batch_size=4, lr=5e-3, lr_connector=1e-3, lr_vision=5e-4, warmup_steps=1, lora_dropout=0.0)
IDENTITY = {"suite": "docvqa", "data": "abc123", "model": "tiny-minicpmv:0000", "device": "cpu", "precision": "no", "max_gen_toks": 16}




# ------------------------------------------------------------------------------------ keys and names


def test_plain_lora_cells_keep_their_names_dicts_and_keys():
    """Digests computed before variants existed: plain LoRA's records are found again, not retrained."""
    from bench.runner import SuiteRun
    from bench.store import digest

    cell = Cell("qv", 8, 16.0, "frozen")
    assert cell.variant == "lora" and cell == Cell("qv", 8, 16.0, "frozen", "lora")
    assert cell.to_dict() == {"targets": "qv", "rank": 8, "alpha": 16.0, "vision": "frozen"}
    assert cell.name == "qv-r8-a16-frozen"
    assert digest(cell.to_dict()) == "568390271d"
    sr = SuiteRun(None, Path("."), dict(IDENTITY))
    assert sr.key(None, cell, 0, PRESETS["smoke"].train) == "qv-r8-a16-frozen-s0-cb4d4c2394"
    assert sr.key(None, Cell("all", 4, 8.0, "vpm-lora"), 2, PRESETS["default"].train.at(3e-3)) == "all-r4-a8-vpm-lora-s2-f2eceb32bc"
    assert Cell.from_dict(cell.to_dict()) == cell  # a record made before variants reads back as plain LoRA


def test_variant_cells_are_named_and_keyed_apart():
    from bench.runner import SuiteRun

    sr = SuiteRun(None, Path("."), dict(IDENTITY))
    keys = set()
    for variant in VARIANTS:
        cell = Cell("qv", 8, 16.0, "frozen", variant)
        assert Cell.from_dict(cell.to_dict()) == cell
        if variant != "lora":
            assert cell.name == f"qv-r8-a16-frozen-{variant}" and cell.to_dict()["variant"] == variant
        keys.add(sr.key(None, cell, 0, PRESETS["smoke"].train))
    assert len(keys) == len(VARIANTS)


def test_records_without_a_variant_are_plain_lora_everywhere():
    from bench import race, verdict

    record = {"kind": "cell", "suite": "docvqa", "seed": 0, "train": {"lr": 1e-3},
              "cell": {"targets": "qv", "rank": 8, "alpha": 16.0, "vision": "frozen"}}
    dora = {**record, "cell": {**record["cell"], "variant": "dora"}}
    assert verdict.cell_key(record)[-1] == "lora" and verdict.cell_name(verdict.cell_key(record)) == "qv-r8-a16-frozen"
    assert verdict.cell_name(verdict.cell_key(dora)) == "qv-r8-a16-frozen-dora"
    assert set(race._lookup([record, dora])) == {(Cell("qv", 8, 16.0, "frozen"), 1e-3, 0), (Cell("qv", 8, 16.0, "frozen", "dora"), 1e-3, 0)}


def test_the_matrix_crosses_variants_with_the_other_factors():
    cells = build_cells(["qk", "qv"], [4], ["frozen", "resampler"], "2r", ["lora", "dora", "lora"])
    assert len(cells) == 2 * 2 * 2 and len({c.name for c in cells}) == len(cells)
    assert [c.variant for c in cells[:2]] == ["lora", "dora"]  # variants vary fastest
    assert build_cells(["qv"], [4], ["frozen"]) == [Cell("qv", 4, 8.0, "frozen")]  # default: plain LoRA only
    assert all(p.variants == ("lora",) for p in PRESETS.values())
    with pytest.raises(BenchError, match="unknown LoRA variant 'qlora'; choose from lora, dora, rslora, pissa, loraplus"):
        build_cells(["qv"], [4], ["frozen"], "2r", ["qlora"])
    with pytest.raises(BenchError, match="--variants is empty"):
        build_cells(["qv"], [4], ["frozen"], "2r", [])


@pytest.mark.parametrize("value,message", [("lora,qlora", "unknown LoRA variant 'qlora'; choose from lora, dora"),
                                           (",", "--variants is empty; give at least one value, e.g. --variants lora,dora")])
def test_spec_refuses_bad_variants_in_one_line(value, message, tmp_path):
    from bench.cli import parser
    from bench.spec import from_args

    args = parser().parse_args(["--preset", "smoke", "--device", "cpu", "--variants", value, "--out", str(tmp_path / "out")])
    with pytest.raises(BenchError, match=message) as exc:
        from_args(args)
    assert "\n" not in str(exc.value)


def test_spec_expands_variants():
    from bench.cli import parser
    from bench.spec import from_args

    spec = from_args(parser().parse_args(["--preset", "smoke", "--device", "cpu", "--targets", "qv", "--vision", "frozen",
                                          "--variants", "lora,pissa,loraplus"]))
    assert [c.name for c in spec.cells] == ["qv-r4-a8-frozen", "qv-r4-a8-frozen-pissa", "qv-r4-a8-frozen-loraplus"]
    plain = from_args(parser().parse_args(["--preset", "smoke", "--device", "cpu"]))
    assert {c.variant for c in plain.cells} == {"lora"}


# ------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def examples(tiny):
    return [tiny.example(f"{it['question']}\nAnswer the question using a single word or phrase.", it["image"], it["answers"][0])
            for it in generate(8, seed=11)]


def _lora_layers(peft_model, resolution):
    inner = peft_model.base_model.model
    return {name: inner.get_submodule(name) for name in resolution.lora}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_trains_with_vision_lora_and_hands_the_base_back(tiny, examples, variant, monkeypatch):
    """vpm-lora (LoRA in the LLM and inside the vision encoder, the connector trained fully) with each
    variant: a couple of steps, the variant visibly in effect, the base model intact afterwards."""
    from accelerate.utils import set_seed

    cell = Cell("qv", 4, 8.0, "vpm-lora", variant)
    res = resolve(tiny.model, tiny.roles, cell)
    assert any(n.startswith("vpm.") for n in res.lora) and any(n.startswith("llm.") for n in res.lora)
    before = fingerprint(tiny.model)
    originals = {n: tiny.model.get_submodule(n).weight.detach().clone() for n in res.lora}
    used, real = [], train_mod.make_optimizer  # the optimizer train() builds

    def spy(*args):
        used.append(real(*args))
        return used[-1]

    monkeypatch.setattr(train_mod, "make_optimizer", spy)
    set_seed(0)
    peft_model = attach(tiny.model, res, cell, 0.0, 0)
    try:
        layers = _lora_layers(peft_model, res)
        for name, layer in layers.items():
            assert bool(layer.use_dora["default"]) == (variant == "dora"), name
            assert bool(layer.use_rslora["default"]) == (variant == "rslora"), name
            expected = cell.alpha / math.sqrt(cell.rank) if variant == "rslora" else cell.alpha / cell.rank
            assert layer.scaling["default"] == pytest.approx(expected)
            if variant == "dora":  # a trained magnitude per output feature
                magnitude = layer.lora_magnitude_vector["default"].weight
                assert magnitude.requires_grad and magnitude.shape == (layer.out_features,)
            else:
                assert "default" not in layer.lora_magnitude_vector
            b = layer.lora_B["default"].weight
            base = layer.get_base_layer().weight
            if variant == "pissa":  # A, B from the top singular vectors; the base keeps the residual
                assert b.abs().sum() > 0
                assert not torch.equal(base, originals[name])
                rebuilt = base + layer.scaling["default"] * b @ layer.lora_A["default"].weight
                assert torch.allclose(rebuilt, originals[name], atol=1e-5)
            else:
                assert torch.count_nonzero(b) == 0 and torch.equal(base, originals[name])
        result = train(tiny, peft_model, examples, SETTINGS, 0, Accelerator(cpu=True))
        assert len(result.losses) == SETTINGS.steps and all(math.isfinite(x) for x in result.losses)
        (optimizer,) = used
        names = {id(p): n for n, p in peft_model.named_parameters()}
        groups = {g["part"]: {**g, "lr": g["initial_lr"]} for g in optimizer.param_groups}  # the schedule's base rates
        assert groups["connector"]["lr"] == SETTINGS.lr_connector  # the fully trained connector keeps its rate
        assert all(".resampler." in names[id(p)] for p in groups["connector"]["params"])
        if variant == "loraplus":  # B at LORAPLUS_LR_RATIO x A's rate (peft's create_loraplus_optimizer)
            assert set(groups) == {"lora_A", "lora_B", "connector"}
            assert groups["lora_A"]["lr"] == SETTINGS.lr and groups["lora_B"]["lr"] == SETTINGS.lr * LORAPLUS_LR_RATIO == 16 * SETTINGS.lr
            assert all("lora_A" in names[id(p)] for p in groups["lora_A"]["params"])
            assert all("lora_B" in names[id(p)] for p in groups["lora_B"]["params"])
            assert {names[id(p)].split(".")[2] for p in groups["lora_B"]["params"]} == {"llm", "vpm"}  # vision LoRA too
        else:
            assert set(groups) == {"lora", "connector"} and groups["lora"]["lr"] == SETTINGS.lr
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable
        if variant == "pissa":
            _reloads_on_the_untouched_base(peft_model, tiny, examples)
    finally:
        tiny.model = detach(peft_model)
    assert fingerprint(tiny.model) == before  # PiSSA's rewritten weights restored bit for bit


def _reloads_on_the_untouched_base(peft_model, tiny, examples):
    """A saved PiSSA adapter loads onto a freshly loaded base with ``PeftModel.from_pretrained`` (peft repeats
    the deterministic SVD there) and gives the trained model's outputs."""
    import tempfile

    from peft import PeftModel

    from bench.models import get_adapter

    fresh = get_adapter("tiny-minicpmv")
    fresh.load(torch.device("cpu"))
    batch = tiny.train_batch(examples[:4], torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        peft_model.eval()
        peft_model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(fresh.model, folder).eval()
        assert tiny.forward_loss(loaded, batch).item() == pytest.approx(tiny.forward_loss(peft_model, batch).item(), rel=1e-5)


def test_plain_lora_optimizer_is_the_one_it_was(tiny):
    """Plain LoRA (and every variant but loraplus) trains with the AdamW groups of bench.train.param_groups."""
    from bench.train import make_optimizer, param_groups

    cell = Cell("all", 4, 8.0, "resampler+vpm")
    peft_model = attach(tiny.model, resolve(tiny.model, tiny.roles, cell), cell, 0.0, 0)
    try:
        opt = make_optimizer(peft_model, tiny.roles, SETTINGS)
        expected = param_groups(peft_model, tiny.roles, SETTINGS)
        assert [(g["part"], g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups] == \
               [(g["part"], g["lr"], [id(p) for p in g["params"]]) for g in expected]
        assert isinstance(opt, torch.optim.AdamW)
    finally:
        tiny.model = detach(peft_model)


def test_packing_refuses_variants_it_does_not_implement(tiny):
    from bench.packing import pack

    cell = Cell("qv", 4, 8.0, "frozen", "dora")
    with pytest.raises(BenchError, match="plain LoRA"):
        pack(tiny.model, resolve(tiny.model, tiny.roles, cell), cell, 0.0, [0, 1])


# ------------------------------------------------------------------------------------ search


@pytest.mark.parametrize("variants", [("lora",), ("lora", "dora", "pissa")])
def test_search_proposes_a_variant_only_when_several_are_given(variants):
    from types import SimpleNamespace

    import optuna

    from bench import study as study_mod

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = object.__new__(study_mod.Worker)
    worker.spec = SimpleNamespace(cells=build_cells(["qv"], [4], ["frozen"], "2r", variants), train=SETTINGS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        cell, _ = worker.propose(trial)
        assert ("variant" in trial.params) == (len(variants) > 1)
        seen.add(cell.variant)
        study.tell(trial, 0.0)
    assert seen <= set(variants) and (len(seen) > 1) == (len(variants) > 1)
    cell = Cell("qv", 4, 8.0, "frozen", variants[-1])
    params = worker._params(cell, SETTINGS)
    assert ("variant" in params) == (len(variants) > 1)
    study.enqueue_trial(params)  # the matrix: an enqueued run's variant comes back from its params
    trial = study.ask()
    assert worker._suggest(trial)[3] == cell.variant
