"""transformers-native families: tiny random checkpoints built offline, driven through --model FOLDER."""

import re
from pathlib import Path

import pytest
import torch

import hf_families
from bench.models import get_adapter
from bench.models.hf import FAMILIES
from bench.space import GENERIC_POLICIES, TARGET_SETS, build_cells
from bench.store import read_record, record_files
from bench.train import resolve
from conftest import run_cli

NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name in NAMES:
        hf_families.save(name, root / name)
    return root


@pytest.fixture(scope="module")
def adapters(checkpoints):
    loaded = {}
    for name in NAMES:
        adapter = get_adapter(str(checkpoints / name))
        adapter.load(torch.device("cpu"))
        loaded[name] = adapter
    return loaded


def test_every_family_is_covered_by_a_builder():
    assert set(hf_families.FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("name", NAMES)
def test_role_map_matches_the_model(adapters, name):
    adapter = adapters[name]
    modules = dict(adapter.model.named_modules())
    roles = adapter.roles
    layers = {m.group(0) for n in modules if (m := re.match(roles.llm_layer, n))}
    assert layers, "the LLM layer pattern matches decoder layers"
    for role in [*roles.attention, *roles.mlp]:
        hits = [n for n in modules if re.fullmatch(roles.llm_pattern((role,)), n)]
        assert len(hits) == len(layers) and all(isinstance(modules[n], torch.nn.Linear) for n in hits), role
    vision_linear = [n for n in modules if re.fullmatch(roles.vision_linear, n)]
    assert vision_linear and all(n.startswith(roles.vision + ".") for n in vision_linear)
    assert not any(n.startswith(roles.connector + ".") for n in vision_linear), "the connector is not LoRA'd as vision"
    assert roles.vision in modules and roles.connector in modules
    for cell in build_cells(list(TARGET_SETS), [4], list(GENERIC_POLICIES)):  # minicpmv-recipe: MiniCPM-V only
        resolution = resolve(adapter.model, roles, cell)
        assert all(name in modules for name in resolution.full)


def test_mllama_roles_mean_self_or_cross_attention_and_its_inputs_reach_forward(adapters):
    """Mllama: a decoder layer self-attends or cross-attends to the image; each attention role is that
    layer's projection of either kind (q,v LoRAs both), and the tile/cross-attention inputs reach forward."""
    from PIL import Image

    from bench.space import Cell

    adapter = adapters["mllama"]
    lora = resolve(adapter.model, adapter.roles, Cell("qv", 4, 8, "frozen")).lora
    assert sorted(re.sub(r"^.*?\.\d+\.", "", n) for n in lora) == [
        "cross_attn.q_proj", "cross_attn.v_proj", "self_attn.q_proj", "self_attn.v_proj"]
    image = Image.new("RGB", (48, 32), (200, 30, 30))
    batch = adapter.train_batch([adapter.example("What colour is it?", image, "red")], torch.device("cpu"))
    assert {"aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "pixel_values"} <= set(batch)
    assert batch["pixel_values"].shape[:3] == (1, 1, 1)  # one image, one tile
    other = adapter.train_batch([adapter.example("What colour is it?", Image.new("RGB", (48, 32), (0, 0, 255)), "red")],
                                torch.device("cpu"))
    with torch.no_grad():  # the image reaches the loss through the cross-attention layer
        assert adapter.forward_loss(adapter.model, batch) != adapter.forward_loss(adapter.model, other)
    prompt = adapter.prompt_batch([adapter.encode_prompt("What colour is it?")], [adapter.image_array(image)], "cpu")
    assert {"aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"} <= set(prompt)


@pytest.mark.parametrize("name", ["minicpmv4_6", "glm4v"])
def test_fused_projections_stand_for_each_role_they_compute(adapters, name):
    """MiniCPM-V 4.6's hybrid LLM: a Gated DeltaNet layer computes q, k and v in one in_proj_qkv and has
    an out_proj; GLM-4.1V's MLP computes gate and up in one gate_up_proj. A role LoRAs the module that
    computes it, in every layer; q,v and q,k then differ in the full-attention layers only."""
    from bench.space import Cell

    adapter = adapters[name]
    kinds = lambda targets: sorted({re.sub(r"^.*?\.\d+\.", "", n)  # noqa: E731
                                    for n in resolve(adapter.model, adapter.roles, Cell(targets, 4, 8, "frozen")).lora})
    if name == "minicpmv4_6":
        assert kinds("qv") == ["linear_attn.in_proj_qkv", "self_attn.q_proj", "self_attn.v_proj"]
        assert kinds("qkvo") == ["linear_attn.in_proj_qkv", "linear_attn.out_proj", "self_attn.k_proj",
                                 "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
        assert not any("in_proj_z" in k or "in_proj_a" in k or "in_proj_b" in k for k in kinds("all"))
    else:
        assert kinds("all") == ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.k_proj", "self_attn.o_proj",
                                "self_attn.q_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("name", NAMES)
def test_labels_cover_the_answer_and_end_of_turn_only(adapters, name):
    from PIL import Image

    adapter = adapters[name]
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    examples = [adapter.example("What colour is it?", image, answer) for answer in ("red", "green")]
    batch = adapter.train_batch(examples, torch.device("cpu"))
    for row, answer in enumerate(("red", "green")):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        text = adapter.tokenizer.decode(labelled)
        assert text.strip().startswith(answer) and text.strip() != answer, text  # answer + an end-of-turn token
    loss = adapter.forward_loss(adapter.model, batch)
    assert torch.isfinite(loss)


def test_labels_fall_back_to_the_prompt_s_own_length_when_the_answer_tokenizes_differently_alone(adapters, monkeypatch):
    """Labels are the row's last tokens when the continuation tokenizes the same alone; a BPE merge
    across the prompt/answer boundary makes them differ, and the prompt is then counted on its own."""
    from PIL import Image

    adapter = adapters["qwen2_vl"]
    examples = [adapter.example("What colour is it?", Image.new("RGB", (64, 64), (200, 30, 30)), a) for a in ("red", "green")]
    expected = adapter.train_batch(examples, torch.device("cpu"))["labels"]
    real = adapter.tokenizer.__class__.__call__

    def merged(self, text, *args, **kwargs):  # as if the answer's first characters merged with the prompt's end
        out = real(self, text, *args, **kwargs)
        if isinstance(text, str):
            out["input_ids"] = [0, *out["input_ids"]]
        return out

    monkeypatch.setattr(adapter.tokenizer.__class__, "__call__", merged)
    assert torch.equal(adapter.train_batch(examples, torch.device("cpu"))["labels"], expected)


@pytest.mark.parametrize("name", NAMES)
def test_smoke_matrix_through_model_folder(checkpoints, tmp_path, name, capsys):
    """The same entry point as the command line, in process (one family also as a subprocess below)."""
    from bench.cli import main

    out = tmp_path / "out"
    code = main(["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,vpm-lora",
                 "--limit", "16", "--model", str(checkpoints / name), "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    records = [read_record(p) for p in record_files(out / "records" / "docvqa", "")]
    cells = [r for r in records if r["kind"] == "cell"]
    assert len(cells) == 2 and all(r["status"] == "ok" for r in cells), [r.get("error") for r in cells]
    assert all(r["train"]["steps"] == 6 and len(r["losses"]) == 6 for r in cells)
    assert any(r["kind"] == "base" for r in records)
    assert {r["cell"]["vision"] for r in cells} == {"frozen", "vpm-lora"}
    assert "LoRA on" in capsys.readouterr().out  # the resolution is reported before training


def test_resolution_factor_runs_each_level_as_its_own_section(checkpoints, tmp_path, capsys):
    """--resolutions a,b on a dynamic-resolution family: a section per level, the base model scored at
    each, every run's settings naming its level (and the visual tokens really differing)."""
    from bench.cli import main

    out = tmp_path / "res"
    code = main(["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen", "--steps", "2",
                 "--limit", "16", "--resolutions", "16384,50176", "--model", str(checkpoints / "qwen2_vl"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert {p.name for p in (out / "records").iterdir()} == {"docvqa@res16384", "docvqa@res50176"}
    records = [read_record(p) for p in record_files(out / "records")]
    cells = {r["regime"]["resolution"]: r for r in records if r["kind"] == "cell"}
    assert {k: r["train"]["resolution"] for k, r in cells.items()} == {16384: 16384, 50176: 50176}
    bases = [r for r in records if r["kind"] == "base"]
    assert len({r["key"] for r in bases}) == 2  # the base model at each resolution is its own record


def test_model_folder_from_the_command_line(checkpoints, tmp_path):
    out = tmp_path / "cli"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qk", "--vision", "resampler+vpm",
                     "--limit", "16", "--model", str(checkpoints / "qwen2_vl"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fully trained: model.visual" in result.stdout  # the merger is inside the vision tower: trained once
    assert (out / "results.md").is_file()


def test_folder_without_processor_is_one_line(checkpoints, tmp_path, capsys):
    import shutil

    from bench.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (checkpoints / "llava").iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy(f, broken / f.name)
    assert main(["--suite", "docvqa", "--preset", "smoke", "--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(broken) in err


@pytest.mark.parametrize("name", NAMES)
def test_memory_estimate_from_the_config_alone_equals_the_loaded_model(checkpoints, adapters, name):
    """--recommend --estimate-for builds the model on the meta device: same shapes, same bytes."""
    from bench.memory_model import Shape, estimate_on
    from bench.space import Cell

    skeleton = get_adapter(str(checkpoints / name)).skeleton()
    assert next(skeleton.parameters()).device.type == "meta"
    loaded = adapters[name]
    assert Shape.of(skeleton, loaded.roles) == Shape.of(loaded.model, loaded.roles)
    for cell in (Cell("qv", 8, 16, "frozen"), Cell("all", 16, 32, "resampler+vpm"), Cell("qk", 4, 8, "vpm-lora")):
        assert estimate_on(skeleton, loaded.roles, cell, 2, 64, 16, 2) == estimate_on(loaded.model, loaded.roles, cell, 2, 64, 16, 2)


@pytest.mark.parametrize("name", NAMES)
def test_visual_tokens_are_the_image_placeholders_of_a_prompt(adapters, name):
    """Every family counts the image positions of its own prompts (the memory model's sequence length)
    and its vision encoder's patches; the count is the training batch's own."""
    from PIL import Image

    adapter = adapters[name]
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    tokens = adapter.visual_tokens(image)
    batch = adapter.train_batch([adapter.example("What colour is it?", image, "red")], torch.device("cpu"))
    assert 0 < tokens == int((batch["input_ids"] == adapter._image_token_id()).sum())
    assert adapter.vision_patches(image) > 0
    assert (adapter.resolution_knob is not None) == (FAMILIES[name].resolution is not None)


@pytest.mark.parametrize("name", NAMES)
def test_vision_features_are_the_family_s_own_encoder_per_image(adapters, name):
    """--similarity/--recommend embed images in the user's model: pooled states of its own vision
    encoder after its own preprocessing; an image's features do not depend on its batch."""
    import numpy as np

    adapter = adapters[name]
    rng = np.random.RandomState(0)
    arrays = [rng.randint(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(3)]
    feats = adapter.vision_features(arrays, torch.device("cpu"))
    alone = adapter.vision_features(arrays[1:2], torch.device("cpu"))
    for layer in ("early", "final"):
        assert feats[layer].shape[0] == 3 and torch.isfinite(feats[layer]).all()
        assert torch.allclose(feats[layer][1], alone[layer][0], atol=1e-5)
        assert not torch.allclose(feats[layer][0], feats[layer][2])  # different images, different features


@pytest.mark.parametrize("name", ["qwen2_vl", "minicpmv4_6"])
def test_recommend_in_the_user_s_own_model(checkpoints, tmp_path, name, capsys):
    """A smoke matrix on two suites with a real family, then --recommend on a folder of images in that
    model's features: the recommendation names a configuration that was measured."""
    import itertools
    import json

    from bench.cli import main
    from suites.chartqa.generate import generate
    from suites.shapes.generate import generate as shapes

    if name not in FAMILIES:
        pytest.skip(f"{name} is not a family yet")
    model = str(checkpoints / name)
    out = tmp_path / "bench"
    assert main(["--suite", "shapes,docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler",
                 "--limit", "16", "--model", model, "--out", str(out)]) == 0, capsys.readouterr().err[-2000:]
    mine, reference = tmp_path / "charts", tmp_path / "reference"
    for folder, items in ((mine, generate(12, seed=11)), (reference, shapes(12, seed=5))):
        folder.mkdir()
        for i, item in enumerate(itertools.islice(items, 12)):
            item["image"].save(folder / f"{i:03d}.png")
    rec = tmp_path / "rec"
    capsys.readouterr()
    assert main(["--recommend", "--data", str(mine), "--model", model, "--results", str(out), "--samples", "12",
                 "--reference", str(reference), "--out", str(rec)]) == 0, capsys.readouterr().err[-2000:]
    chosen = json.loads((rec / "recommendation.json").read_text())["recommended"]
    cells = [read_record(p) for p in record_files(out / "records")]
    measured = {(r["cell"]["targets"], r["cell"]["rank"], r["cell"]["vision"]) for r in cells if r["kind"] == "cell"}
    assert (chosen["targets"], chosen["rank"], chosen["vision"]) in measured
    md = (rec / "recommendation.md").read_text()
    assert f"**Recommended: {chosen['targets']} r{chosen['rank']}" in md and name in md and "## Calibration" in md
    sim = tmp_path / "sim"
    assert main(["--similarity", "--data", f"{mine},shapes", "--model", model, "--reference", str(reference),
                 "--samples", "12", "--out", str(sim)]) == 0, capsys.readouterr().err[-2000:]
    md = (sim / "similarity.md").read_text()
    assert f"Image similarity in {name}" in md and "## Distance from pretraining" in md


REAL_DOCVQA = Path(__file__).resolve().parents[2] / "shared" / "real-data" / "docvqa-val-3pages"


@pytest.mark.skipif(not REAL_DOCVQA.is_dir(), reason="the real DocVQA pages are not beside this checkout")
@pytest.mark.parametrize("name", NAMES)
def test_every_family_trains_and_generates_on_a_real_page(adapters, name):
    """A real DocVQA page (grayscale, ~1800x2300) through each family's own preprocessing: resized,
    tiled or sliced as the family does, converted to RGB; a finite loss and an answer."""
    from PIL import Image

    adapter = adapters[name]
    page = max((REAL_DOCVQA / "documents").glob("*.png"), key=lambda p: p.stat().st_size)
    with Image.open(page) as im:
        assert im.mode == "L" and min(im.size) > 1000
    batch = adapter.train_batch([adapter.example("What is the date?", str(page), "1962")], torch.device("cpu"))
    assert torch.isfinite(adapter.forward_loss(adapter.model, batch))
    with Image.open(page) as im:
        array = adapter.image_array(im)
    prompt = adapter.prompt_batch([adapter.encode_prompt("What is the date?")], [array], torch.device("cpu"))
    assert adapter.generate_ids(adapter.model, prompt, 3).shape[0] == 1


@pytest.mark.skipif(not REAL_DOCVQA.is_dir(), reason="the real DocVQA pages are not beside this checkout")
@pytest.mark.parametrize("name", ["qwen2_vl", "llava_onevision", "smolvlm"])  # dynamic resolution, anyres tiles, splitting
def test_smoke_matrix_on_real_pages(checkpoints, tmp_path, name, capsys):
    """The real pages as --data, end to end: one page per split, official-format questions."""
    from bench.cli import main

    out = tmp_path / "out"
    code = main(["--suite", "docvqa", "--data", str(REAL_DOCVQA), "--preset", "smoke", "--targets", "qv",
                 "--vision", "frozen", "--model", str(checkpoints / name), "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    records = [read_record(p) for p in record_files(out / "records" / "docvqa", "")]
    cells = [r for r in records if r["kind"] == "cell"]
    assert len(cells) == 1 and cells[0]["status"] == "ok", [r.get("error") for r in cells]
    assert len(cells[0]["items"]) >= 1 and "val_score" in cells[0]
