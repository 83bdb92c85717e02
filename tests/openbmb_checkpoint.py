"""A tiny checkpoint folder in OpenBMB's MiniCPM-V layout, built on the project's own stand-in code
(tests/openbmb_standin/): config.json with auto_map, the modelling files, safetensors weights and a
character-level ChatML tokenizer with MiniCPM-V's special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

STANDIN = Path(__file__).resolve().parent / "openbmb_standin"
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", "<slice>", "</slice>",
            "<image_id>", "</image_id>"]
WORDS = ["system", "user", "assistant"]  # single tokens, as in Qwen's vocabulary
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]  # id 0 is a real character, as Qwen's "!" is
# Qwen2-style ChatML with a default system turn (whose text contains "assistant" outside a turn header)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, tie_word_embeddings=False, query_num=4,
             slice_config={"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 28},
             vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "image_size": 112, "patch_size": 14})


def build_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(CHARACTERS + SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS])
    core.add_tokens([AddedToken(w, normalized=False) for w in WORDS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  extra_special_tokens=SPECIALS[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    from safetensors.torch import save_model
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from bench.models.minicpmv_compat import remote_code_imports

    folder = Path(folder)
    folder.mkdir(parents=True)
    for path in STANDIN.glob("*.py"):
        shutil.copy(path, folder / path.name)
    tok = build_tokenizer()
    tok.save_pretrained(folder)
    config = {
        "model_type": "minicpmv", "architectures": ["StandInMiniCPMV"],
        "auto_map": {"AutoConfig": "configuration_standin.StandInConfig", "AutoModel": "modeling_standin.StandInMiniCPMV"},
        "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "batch_vision_input": True,
        **SIZES, **overrides,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    with remote_code_imports():
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        cls = get_class_from_dynamic_module("modeling_standin.StandInMiniCPMV", folder)
        torch.manual_seed(seed)
        model = cls(cfg)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
