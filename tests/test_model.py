import shutil

import pytest
import torch

from bench.errors import BenchError
from bench.models import get_adapter
from bench.models.tiny_minicpmv import ASSET_DIR, MINICPMV_ROLES, build_tokenizer, load_checkpoint
from suites.shapes.generate import generate


def test_tokenizer_is_character_level_and_round_trips():
    tok = build_tokenizer()
    text = "What is the QTY?\nAnswer: 42"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id


def test_checkpoint_is_safetensors_only():
    names = {p.name for p in ASSET_DIR.iterdir()}
    assert "model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


def test_module_names_follow_minicpmv(tiny):
    names = {n for n, _ in tiny.model.named_modules()}
    assert {"vpm", "resampler", "llm"} <= names
    assert "llm.model.layers.0.self_attn.q_proj" in names
    assert "vpm.encoder.layers.0.self_attn.q_proj" in names
    import re

    assert any(re.fullmatch(MINICPMV_ROLES.llm_pattern(("q", "v")), n) for n in names)


def test_batched_generation_matches_one_by_one(tiny):
    """Left padding and the KV cache must not change what greedy decoding produces."""
    items = list(generate(6, seed=5))
    prompts = [tiny.prompt_ids(f"{it['question']}\nAnswer the question using a single word or phrase.") for it in items]
    arrays = [tiny.image_array(it["image"]) for it in items]
    batch = tiny.prompt_batch(prompts, arrays, torch.device("cpu"))
    together = tiny.decode(tiny.generate_ids(tiny.model, batch, 8))
    alone = [tiny.decode(tiny.generate_ids(tiny.model, tiny.prompt_batch([p], [a], torch.device("cpu")), 8))[0]
             for p, a in zip(prompts, arrays)]
    assert together == alone


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ASSET_DIR, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(BenchError, match="model.safetensors is missing"):
        load_checkpoint(folder)


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ASSET_DIR, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BenchError, match="cannot be loaded"):
        load_checkpoint(folder)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="unknown model"):
        get_adapter("gpt-17")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(BenchError, match="no adapter knows"):
        get_adapter(str(tmp_path))
