"""Merged model folders (``--export merged``), for tools that load a checkpoint but no adapter (vLLM,
lmms-eval, VLMEvalKit): ``AutoModelForImageTextToText.from_pretrained(folder)`` and
``AutoProcessor.from_pretrained(folder)`` alone load the run's model.

One per saved adapter, under ``<out>/merged/<suite>/<run key>/`` beside ``<out>/adapters/<suite>/<run key>/``:
the base checkpoint reloaded on the CPU in the dtype the run's weights had, the saved adapter folder loaded
onto it (``PeftModel.from_pretrained``) and merged (``merge_and_unload``: LoRA added into the weights, the
fully trained connector / encoder copies in place of the originals), then the base checkpoint's
processor, tokenizer and chat-template files beside it, with the run's image-resolution setting when it had
one. Built from the saved folder, not from the model in training: what is exported is what was saved, and
the shared base model is never touched. Written under a temporary name and renamed into place; a merged
folder whose adapter folder is gone (``--save-adapters best`` replaced it) is removed.

Transformers-native families only: the embedded model is the harness's own class, and OpenBMB's MiniCPM-V
code loads only with the harness's fixes (bench/models/minicpmv_compat.py); both are refused up front.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bench import adapters
from bench.errors import BenchError

MODES = ("merged",)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")
WRITTEN = ("config.json", "generation_config.json")  # the merged model's own, from save_pretrained


def folder(out: Path, suite: str) -> Path:
    return Path(out) / "merged" / suite


def check(model: str, trust_remote_code: bool = False) -> None:
    """Refuse ``--export merged`` in one line for a model whose merged folder from_pretrained could not load."""
    from bench.models import get_adapter
    from bench.models.hf import HFAdapter
    from bench.models.tiny_minicpmv import TinyMiniCPMVAdapter

    adapter = get_adapter(model, trust_remote_code)
    if isinstance(adapter, HFAdapter):
        return
    why = ("the harness's own model class" if type(adapter) is TinyMiniCPMVAdapter
           else "a MiniCPM-V checkpoint whose shipped code loads only with the harness's fixes")
    raise BenchError(f"--export merged writes folders that from_pretrained loads alone, and {model} is {why}; "
                     "use a transformers-native checkpoint (--model FOLDER), or drop --export and load "
                     "<out>/adapters/ onto the model with PeftModel.from_pretrained")


def write(adapter, saved: Path, out: Path, suite: str) -> Path:
    """The merged folder of the adapter folder ``saved`` (a finished run's), for ``adapter``'s checkpoint."""
    made = []  # the merged model, once built: its size is what a full disk must make room for

    def fill(tmp: Path) -> None:
        made.append(merged_model(adapter, saved))
        made[0].save_pretrained(tmp)
        copy_processor(adapter.source, tmp)
        keep_resolution(adapter, tmp)

    # a full disk is not the run's failure, as for the adapter folder
    target = adapters.write_folder(folder(out, suite), saved.name, fill,
                                   lambda: sum(p.numel() * p.element_size() for p in made[0].parameters()) if made else None)
    prune(out, suite)
    return target


def merged_model(adapter, saved: Path):
    """The base checkpoint with the adapter folder ``saved`` merged in, on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    dtype = adapter.model.get_input_embeddings().weight.dtype  # the run's: fp32 on the CPU, bf16 on GPUs with it
    base = AutoModelForImageTextToText.from_pretrained(adapter.source, dtype=dtype)
    return PeftModel.from_pretrained(base, saved).merge_and_unload()


def copy_processor(source: Path, dest: Path) -> None:
    """Every file of the base checkpoint but its weights and model config: processor, tokenizer, chat
    template, and whatever else a loader of that family reads (the merged model wrote its own config)."""
    weights = {p for pattern in WEIGHT_FILES for p in Path(source).glob(pattern)}
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path not in weights and path.name not in WRITTEN:
            shutil.copy2(path, dest / path.name)


def keep_resolution(adapter, dest: Path) -> None:
    """The run's image-resolution setting (``--resolutions``) in the copied image-processor config: the
    merged model sees images as it was trained and scored on them. Nothing to do at the checkpoint's own."""
    knob = adapter.spec.resolution
    if knob is None or adapter.resolution is None:
        return
    field = "size" if knob.key else knob.name
    value = adapter.processor.image_processor.to_dict()[field]  # as the processor serialises it
    for name, section in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = dest / name
        config = json.loads(path.read_text()) if path.is_file() else {}
        settings = config.get(section) if section else config
        if settings:
            settings[field] = value
            path.write_text(json.dumps(config, indent=2) + "\n")
            return
    raise BenchError(f"cannot carry {knob.name} {adapter.resolution} into the merged folder: {adapter.source} has no "
                     "image-processor config (processor_config.json or preprocessor_config.json) to set it in")


def prune(out: Path, suite: str) -> None:
    """Remove merged folders whose adapter folder is gone (a better run replaced it)."""
    kept = adapters.folder(out, suite)
    for merged in folder(out, suite).glob("[!.]*"):
        if merged.is_dir() and not (kept / merged.name).is_dir():
            adapters.discard(merged)
