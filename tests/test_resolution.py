"""Image resolution as a factor: each dynamic-resolution family's own knob (Qwen-VL max_pixels, Idefics3 /
SmolVLM longest_edge, MiniCPM-V max_slice_nums) changes what the processor makes and how many visual tokens
the LLM sees, for training and evaluation batches alike; families without one refuse in one line; the
memory model grows with it; run keys without a resolution stay as they were."""

import json
import shutil
import sys

import pytest
import torch
from PIL import Image

import hf_families
from bench.errors import BenchError
from bench.models import get_adapter

CPU = torch.device("cpu")
IMAGE = Image.new("RGB", (96, 64), (200, 30, 30))  # wider than tall, larger than every tiny checkpoint's default view


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name in ("qwen2_vl", "smolvlm", "idefics3", "minicpmv4_6"):
        hf_families.save(name, root / name)
    # the tiny Idefics3 does not split images (its processor resizes to one 32x32 view); real ones do
    split = root / "idefics3_split"
    shutil.copytree(root / "idefics3", split)
    config = json.loads((split / "processor_config.json").read_text())
    config["image_processor"]["do_image_splitting"] = True
    (split / "processor_config.json").write_text(json.dumps(config))
    return root


def loaded(folder):
    adapter = get_adapter(str(folder))
    adapter.load(CPU)
    return adapter


def batches(adapter):
    """A training batch and an evaluation (prompt) batch of the same image."""
    train = adapter.train_batch([adapter.example("What colour is it?", IMAGE, "red")], CPU)
    prompt = adapter.prompt_batch([adapter.encode_prompt("What colour is it?")], [adapter.image_array(IMAGE)], CPU)
    return train, prompt


def test_qwen2_vl_max_pixels(folders):
    adapter = loaded(folders / "qwen2_vl")
    assert adapter.resolution_knob == "max_pixels" and adapter.default_resolution() == 32 * 32
    merge = adapter.processor.image_processor.merge_size
    seen = {}
    for value in (None, 4096, 16384):
        adapter.set_resolution(value)
        train, prompt = batches(adapter)
        tokens = adapter.visual_tokens(IMAGE)
        # the count read off the prompt agrees with the processor's patch grid, merged 2x2
        assert tokens == int(train["image_grid_thw"].prod()) // merge**2 == int(prompt["image_grid_thw"].prod()) // merge**2
        assert adapter.vision_patches(IMAGE) == int(train["image_grid_thw"].prod()) == train["pixel_values"].shape[0]
        seen[value] = (tokens, train["pixel_values"].shape[0], train["input_ids"].shape[1], prompt["input_ids"].shape[1])
    assert seen[None][0] < seen[4096][0] < seen[16384][0]
    assert seen[16384] == (24, 96, seen[None][2] + 22, seen[None][3] + 22)  # 96x64 fits under 16384 px: 6x4 merged patches
    with torch.no_grad():
        assert torch.isfinite(adapter.forward_loss(adapter.model, batches(adapter)[0]))
    adapter.set_resolution(None)
    assert adapter.visual_tokens(IMAGE) == seen[None][0] and adapter.resolution is None
    # below min_pixels (32*32 here) the minimum follows the knob down: one merged patch, not min_pixels' worth
    adapter.set_resolution(256)
    assert adapter.visual_tokens(IMAGE) == 1
    with pytest.raises(BenchError, match="max_pixels 100 is below one merged patch"):
        adapter.set_resolution(100)
    adapter.set_resolution(None)


def test_qwen2_vl_knob_applies_to_vision_features_and_without_weights(folders):
    """The image processor is the knob's only home: vision features see it, and an adapter that has not
    loaded its weights counts tokens from its processor alone (a setting made before load stays)."""
    fresh = get_adapter(str(folders / "qwen2_vl"))
    fresh.set_resolution(16384)
    assert fresh.visual_tokens(IMAGE) == 24 and getattr(fresh, "model", None) is None
    fresh.load(CPU)
    assert fresh.visual_tokens(IMAGE) == 24
    inputs = fresh.processor.image_processor(images=[IMAGE], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 96


def test_smolvlm_longest_edge(folders):
    adapter = loaded(folders / "smolvlm")
    assert adapter.resolution_knob == "longest_edge" and adapter.default_resolution() == 64
    seen = {}
    for value in (32, None, 128):
        adapter.set_resolution(value)
        train, prompt = batches(adapter)
        tiles = train["pixel_values"].shape[1]
        assert prompt["pixel_values"].shape[1] == tiles
        assert adapter.visual_tokens(IMAGE) == tiles * 4  # 4 image tokens per 32x32 tile (pixel shuffle 2)
        assert adapter.vision_patches(IMAGE) == tiles * 16  # 4x4 patches of 8 px per tile
        seen[value] = (tiles, train["input_ids"].shape[1])
    assert seen[32][0] == 1  # no split: the global view only
    assert seen[32][0] < seen[None][0] < seen[128][0] and seen[32][1] < seen[None][1] < seen[128][1]


def test_idefics3_longest_edge_needs_image_splitting(folders):
    plain = loaded(folders / "idefics3")
    with pytest.raises(BenchError, match="do_image_splitting off, so longest_edge changes nothing") as err:
        plain.set_resolution(128)
    assert "\n" not in str(err.value)
    plain.set_resolution(None)  # the default is always fine
    split = loaded(folders / "idefics3_split")
    split.set_resolution(32)
    small = (split.visual_tokens(IMAGE), batches(split)[0]["pixel_values"].shape[1])
    split.set_resolution(128)
    large = (split.visual_tokens(IMAGE), batches(split)[0]["pixel_values"].shape[1])
    assert small == (4, 1) and large[1] > 1 and large[0] == 4 * large[1]


def test_minicpmv4_6_max_slice_nums(folders):
    adapter = loaded(folders / "minicpmv4_6")
    assert adapter.resolution_knob == "max_slice_nums" and adapter.default_resolution() == 2
    seen = {}
    for value in (1, None, 6):
        adapter.set_resolution(value)
        train, prompt = batches(adapter)
        views = train["target_sizes"].shape[0]  # the global view and each slice
        assert prompt["target_sizes"].shape[0] == views
        assert adapter.vision_patches(IMAGE) == int(train["target_sizes"].prod(-1).sum())
        seen[value] = (views, adapter.visual_tokens(IMAGE))
    assert seen[1][0] == 1 and seen[None][0] == 3 and seen[6][0] > 3
    assert seen[1][1] < seen[None][1] < seen[6][1]


def test_families_without_a_knob_refuse_in_one_line(tiny, folders):
    assert tiny.resolution_knob is None
    tiny.set_resolution(None)  # the default: nothing to do
    with pytest.raises(BenchError) as err:
        tiny.set_resolution(200704)
    message = str(err.value)
    assert "\n" not in message and "tiny-minicpmv has no image-resolution knob" in message
    for named in ("max_pixels (qwen2_vl, qwen2_5_vl, qwen3_vl)", "longest_edge (idefics3, smolvlm)",
                  "max_slice_nums (minicpmv4_6, minicpmv4_7, minicpm_ocr, OpenBMB's minicpmv)"):
        assert named in message
    assert tiny.visual_tokens(IMAGE) == tiny.model.config.query_num  # fixed: every image is resized to 64x64
    hf_families.save("llava", folders / "llava")
    llava = get_adapter(str(folders / "llava"))
    assert llava.resolution_knob is None and llava.visual_tokens(IMAGE) == 16
    with pytest.raises(BenchError, match="has no image-resolution knob"):
        llava.set_resolution(448)


# ------------------------------------------------------------------------------------- OpenBMB


@pytest.fixture(scope="module")
def openbmb(tmp_path_factory):
    from transformers import dynamic_module_utils

    from openbmb_checkpoint import build_checkpoint

    cache = str(tmp_path_factory.mktemp("hf_modules"))  # remote code never goes to the user's HF cache
    saved = dynamic_module_utils.HF_MODULES_CACHE
    dynamic_module_utils.HF_MODULES_CACHE = cache
    try:
        adapter = get_adapter(str(build_checkpoint(tmp_path_factory.mktemp("ckpt") / "minicpmv")), trust_remote_code=True)
        before_load = adapter.visual_tokens(IMAGE)  # slicing is known from config.json alone
        adapter.load(CPU)
        assert adapter.visual_tokens(IMAGE) == before_load
        yield adapter
    finally:
        dynamic_module_utils.HF_MODULES_CACHE = saved
        if cache in sys.path:
            sys.path.remove(cache)


def test_openbmb_max_slice_nums(openbmb):
    assert openbmb.resolution_knob == "max_slice_nums" and openbmb.default_resolution() == 9
    q = openbmb.query_num
    seen = {}
    for value in (1, 2, None):
        openbmb.set_resolution(value)
        batch = openbmb.train_batch([openbmb.example("What colour is it?", IMAGE, "red")], CPU)
        views = len(batch["pixel_values"][0])
        assert len(batch["image_bound"][0]) == views and openbmb.visual_tokens(IMAGE) == views * q
        assert openbmb.vision_patches(IMAGE) == int(batch["tgt_sizes"][0].prod(-1).sum())
        prompt = openbmb.prompt_batch(["What colour is it?"], [openbmb.image_array(IMAGE)], CPU)
        assert len(prompt["pixel_values"][0]) == views
        seen[value] = (views, batch["input_ids"].shape[1])
    assert seen[1][0] == 1 and seen[2][0] == 3 and seen[None][0] == 9  # 96x64 over 28^2 areas: 8 slices + the whole image
    assert seen[1][1] < seen[2][1] < seen[None][1]
    with pytest.raises(BenchError, match="max_slice_nums must be a whole number >= 1"):
        openbmb.set_resolution(0)


# ------------------------------------------------------------------------------------- memory model


def test_memory_estimate_grows_with_max_pixels(folders):
    from bench.memory_model import estimate_for, image_load
    from bench.space import Cell

    adapter = get_adapter(str(folders / "qwen2_vl"))  # the skeleton on the meta device: no weights needed
    rows = {}
    for value in (4096, 16384):
        adapter.set_resolution(value)
        rows[value] = (image_load(adapter, IMAGE),
                       {vision: estimate_for(adapter, Cell("qv", 4, 8, vision), 4, 40, IMAGE, 4)
                        for vision in ("frozen", "resampler+vpm")})
    (small, small_e), (large, large_e) = rows[4096], rows[16384]
    assert small.visual_tokens < large.visual_tokens and small.vision_patches < large.vision_patches
    for vision in small_e:
        assert small_e[vision].activation_bytes < large_e[vision].activation_bytes
        assert small_e[vision].weight_bytes == large_e[vision].weight_bytes  # resolution changes activations only
    # the vision encoder's own term only counts when it trains, and it grows with its patch count
    vision_small = small_e["resampler+vpm"].activation_bytes - small_e["frozen"].activation_bytes
    vision_large = large_e["resampler+vpm"].activation_bytes - large_e["frozen"].activation_bytes
    assert 0 < vision_small < vision_large
    assert vision_large / vision_small == pytest.approx(large.vision_patches / small.vision_patches)


# ------------------------------------------------------------------------------------- spec, keys


def test_resolutions_parse():
    from bench.cli import parser
    from bench.spec import from_args

    spec = from_args(parser().parse_args(["--suite", "shapes", "--preset", "smoke", "--resolutions", "200704, 802816,200704"]))
    assert spec.resolutions == (200704, 802816)
    assert from_args(parser().parse_args(["--suite", "shapes", "--preset", "smoke"])).resolutions == (None,)
    spec = from_args(parser().parse_args(["--suite", "shapes", "--preset", "smoke", "--resolutions", "default,802816"]))
    assert spec.resolutions == (None, 802816)


@pytest.mark.parametrize("value", ["0", "-4", "abc", "2.5", "nan", "200704,inf", ",", "1e5"])
def test_resolutions_refuse_nonsense_in_one_line(value):
    import argparse

    from bench.spec import parse_resolutions

    with pytest.raises(BenchError) as err:
        parse_resolutions(value)
    assert "\n" not in str(err.value) and str(err.value).startswith("--resolutions ")
    from bench import flags

    with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1"):
        flags.resolutions(value)


def test_run_keys_without_a_resolution_are_unchanged():
    from bench.space import PRESETS, TrainSettings

    keys = ["steps", "batch_size", "lr", "lr_connector", "lr_vision", "lora_dropout", "warmup_steps", "weight_decay",
            "max_grad_norm", "train_items", "test_items", "val_items"]
    for preset in PRESETS.values():
        assert list(preset.train.to_dict()) == keys  # as before the option existed, in the same order
        assert preset.train.at(3e-3).to_dict().keys() == preset.train.to_dict().keys()
    settings = TrainSettings(steps=4, batch_size=2, lr=1e-3, lr_connector=3e-4, lr_vision=1e-4)
    assert json.dumps(settings.to_dict(), sort_keys=True) == (
        '{"batch_size": 2, "lora_dropout": 0.05, "lr": 0.001, "lr_connector": 0.0003, "lr_vision": 0.0001, '
        '"max_grad_norm": 1.0, "steps": 4, "test_items": null, "train_items": null, "val_items": null, '
        '"warmup_steps": 10, "weight_decay": 0.0}')
    from dataclasses import replace

    at = replace(settings, resolution=802816)
    assert at.to_dict()["resolution"] == 802816 and at.at(1e-2).resolution == 802816
