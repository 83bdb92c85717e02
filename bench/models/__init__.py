"""Model families the harness can drive; ``get_adapter`` picks one by name or by checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

from bench.errors import BenchError
from bench.models.adapter import Example, RoleMap, VLMAdapter
from bench.models.hf import FAMILIES as HF_FAMILIES
from bench.models.hf import HFAdapter
from bench.models.minicpmv import minicpmv_adapter
from bench.models.tiny_minicpmv import TinyMiniCPMVAdapter

FAMILIES = {"tiny-minicpmv": TinyMiniCPMVAdapter}
BUILTIN = {"tiny-minicpmv": None}  # name -> checkpoint folder (None: the family's shipped default)

__all__ = ["Example", "RoleMap", "VLMAdapter", "get_adapter", "FAMILIES"]


def get_adapter(model: str, trust_remote_code: bool = False) -> VLMAdapter:
    """``model`` is a built-in name or a local checkpoint folder whose config names a known family."""
    if model in BUILTIN:
        return FAMILIES[model](BUILTIN[model])
    folder = Path(model)
    if folder.is_dir():
        config = folder / "config.json"
        if not config.is_file():
            raise BenchError(f"model folder {folder} has no config.json; point --model at a checkpoint folder")
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except json.JSONDecodeError as exc:
            raise BenchError(f"{config} is not valid JSON ({exc.msg}); restore the checkpoint's config") from None
        if model_type in FAMILIES:
            return FAMILIES[model_type](folder)
        if model_type in HF_FAMILIES:
            return HFAdapter(folder)
        if model_type == "minicpmv":
            return minicpmv_adapter(folder, trust_remote_code)
        known = ", ".join([*FAMILIES, *HF_FAMILIES, "minicpmv"])
        raise BenchError(f"model folder {folder} has model_type {model_type!r}, which no adapter knows; known: {known}")
    raise BenchError(f"unknown model {model!r}; use one of {', '.join(BUILTIN)} or a local checkpoint folder")
