"""What OpenBMB's MiniCPM-V code (2.6, 4.0, 4.5) needs to run under transformers 5 and torch 2.13, applied
from outside: the checkpoint's files are never edited.

Six breakages, each fixed here only where it bites:

1. ``import torchvision`` at the top of the modelling file (never used; torchvision may be absent, or
   its wheel unable to load beside a CPU torch): an empty stand-in module while the code is imported.
2. ``transformers.modeling_attn_mask_utils`` is gone (the vision tower imports
   ``_prepare_4d_attention_mask`` from it; already AutoConfig fails): a one-function shim.
3. 2.6's ``resampler.py`` takes ``List`` from ``from torch.nn.functional import *`` (torch 2.13 no
   longer has it there): ``typing.List`` lent to ``torch.nn.functional`` while the code is imported.
4. The model never calls ``post_init()``, so transformers 5 finds no ``all_tied_weights_keys``: the
   class's ``__init__`` is wrapped to call it when missing.
5. Silently: transformers 5 loads every non-persistent buffer as uninitialised memory and relies on
   ``_init_weights`` to refill it; the resampler's 2D sin-cos table (``pos_embed``, and 4.5's
   ``temporal_pos_embed``) are not refilled, so logits change and training sees no positions. They are
   rebuilt with the resampler's own builder and then checked against sin-cos values computed here.
6. ``apply_chat_template(tokenize=True)`` returns a dict: :func:`chat_ids` reads ``input_ids`` from it.

Everything lent during import (1-3) is taken back afterwards, so nothing else in the process sees it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError

TABLE_TOLERANCE = 1e-4  # float32 sin/cos of the same float32 arguments agree far closer; garbage does not


# ----------------------------------------------------------------------------- 1-3: import-time stand-ins


def _torchvision_stub() -> types.ModuleType:
    module = types.ModuleType("torchvision", "empty stand-in for an unused `import torchvision` (bench/models/minicpmv_compat.py)")
    module.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)

    def __getattr__(name):
        raise AttributeError(f"torchvision is not available here; the harness only stubs the unused import (torchvision.{name})")

    module.__getattr__ = __getattr__
    return module


TORCHVISION_STUB = _torchvision_stub()


def _prepare_4d_attention_mask(mask: torch.Tensor, dtype: torch.dtype, tgt_len: int | None = None) -> torch.Tensor:
    """[batch, keys] mask (1 = attend) -> additive [batch, 1, queries, keys] mask: 0 where attended,
    the dtype's most negative value elsewhere (what transformers 4 returned)."""
    batch, keys = mask.shape
    queries = tgt_len if tgt_len is not None else keys
    blocked = (mask[:, None, None, :] == 0).expand(batch, 1, queries, keys)
    return torch.zeros(blocked.shape, dtype=dtype, device=mask.device).masked_fill(blocked, torch.finfo(dtype).min)


def _mask_utils_shim() -> types.ModuleType:
    module = types.ModuleType("transformers.modeling_attn_mask_utils", "shim for the module transformers 5 removed")
    module.__spec__ = importlib.machinery.ModuleSpec("transformers.modeling_attn_mask_utils", None)
    module._prepare_4d_attention_mask = _prepare_4d_attention_mask
    return module


MASK_UTILS_SHIM = _mask_utils_shim()


def _torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a wheel built for another torch fails in many ways
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


@contextlib.contextmanager
def remote_code_imports():
    """While the block runs, the checkpoint's modules can be imported under transformers 5 / torch 2.13."""
    import torch.nn.functional as F
    from transformers.utils import import_utils

    for check in ("is_torchvision_available", "is_torchvision_v2_available"):  # cached answers stay the truth
        getattr(import_utils, check, lambda: None)()
    lent: list[tuple[str, object]] = []
    if not _torchvision_loads() and "torchvision" not in sys.modules:
        sys.modules["torchvision"] = TORCHVISION_STUB
        lent.append(("sys.modules", "torchvision"))
    if importlib.util.find_spec("transformers.modeling_attn_mask_utils") is None:
        sys.modules["transformers.modeling_attn_mask_utils"] = MASK_UTILS_SHIM
        lent.append(("sys.modules", "transformers.modeling_attn_mask_utils"))
    if not hasattr(F, "List"):
        F.List = typing.List
        lent.append(("functional", "List"))
    try:
        yield
    finally:
        import transformers

        for kind, name in lent:
            if kind == "functional":
                del F.List
            else:
                sys.modules.pop(name, None)
                if name == "transformers.modeling_attn_mask_utils":
                    transformers.__dict__.pop("modeling_attn_mask_utils", None)


# ----------------------------------------------------------------------------- 4: post_init


def ensure_post_init(cls: type) -> None:
    """Wrap ``cls.__init__`` so that an instance without ``all_tied_weights_keys`` gets ``post_init()``."""
    if cls.__dict__.get("_bench_post_init_wrapped"):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
            self._bench_called_post_init = True

    cls.__init__ = __init__
    cls._bench_post_init_wrapped = True


# ----------------------------------------------------------------------------- 5: position tables


def sincos(dim: int, positions: np.ndarray) -> np.ndarray:
    """1D sin-cos code of ``positions`` (any shape) in ``dim`` channels: sines then cosines of
    ``p / 10000^(i / (dim/2))``, in float32 arithmetic as OpenBMB's numpy code does it."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    angles = positions.astype(np.float32)[..., None] * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def expected_table(shape: tuple[int, ...]) -> np.ndarray:
    """The sin-cos values a resampler table of this shape must hold: ``[H, W, D]`` is the 2D table
    (first half codes the column, second half the row), ``[T, D]`` the temporal one."""
    if len(shape) == 3:
        h, w, d = shape
        rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        return np.concatenate([sincos(d // 2, cols), sincos(d // 2, rows)], axis=-1)
    t, d = shape
    return sincos(d, np.arange(t, dtype=np.float32))


TABLES = {"pos_embed": "_set_2d_pos_cache", "temporal_pos_embed": "_set_temporal_pos_cache"}
SIZES = {"pos_embed": "max_size", "temporal_pos_embed": "max_temporal_size"}


def position_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-persistent ``pos_embed`` / ``temporal_pos_embed`` buffer, by its full name."""
    found = {}
    for prefix, module in model.named_modules():
        for name in TABLES:
            if name in getattr(module, "_non_persistent_buffers_set", ()) and isinstance(module._buffers.get(name), torch.Tensor):
                found[f"{prefix}.{name}" if prefix else name] = module._buffers[name]
    return found


def table_errors(model: torch.nn.Module) -> dict[str, float]:
    """Largest distance of each table from its sin-cos values (inf when it holds NaN or inf)."""
    errors = {}
    for name, table in position_tables(model).items():
        got = table.detach().float().cpu().numpy()
        diff = np.abs(got - expected_table(tuple(table.shape)))
        errors[name] = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    return errors


@torch.no_grad()
def refill_tables(model: torch.nn.Module) -> list[str]:
    """Rebuild the tables with the module's own builder (``_set_2d_pos_cache(max_size)``, ...) or,
    without one, with :func:`expected_table`; returns their names."""
    names = []
    for prefix, module in model.named_modules():
        for name, builder in TABLES.items():
            buffer = module._buffers.get(name) if name in getattr(module, "_non_persistent_buffers_set", ()) else None
            if not isinstance(buffer, torch.Tensor):
                continue
            build, size = getattr(module, builder, None), getattr(module, SIZES[name], None)
            if callable(build) and size is not None:
                build(size, buffer.device)
            else:
                buffer.copy_(torch.from_numpy(expected_table(tuple(buffer.shape))).to(buffer.dtype))
            names.append(f"{prefix}.{name}" if prefix else name)
    return names


def verify_tables(model: torch.nn.Module, source) -> dict[str, float]:
    errors = table_errors(model)
    if not errors:
        raise BenchError(f"{source}: found no sin-cos position table (non-persistent pos_embed) in the resampler; "
                         "this is not OpenBMB's MiniCPM-V resampler, use a transformers-native family instead")
    bad = {name: e for name, e in errors.items() if not e <= TABLE_TOLERANCE}
    if bad:
        name, err = next(iter(bad.items()))
        raise BenchError(f"{source}: resampler table {name} is not its sin-cos values after re-filling (max error {err:.3g}); "
                         "its resampler builds positions differently from OpenBMB's, so the harness cannot trust it")
    return errors


# ----------------------------------------------------------------------------- 6: chat template


def chat_ids(tokenizer, messages: list[dict], **kwargs) -> tuple[list[int], bool]:
    """Token ids of a chat, and whether ``apply_chat_template(tokenize=True)`` returned a dict."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(out, Mapping):
        return list(out["input_ids"]), True
    return list(out), False


# ----------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    fixes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "MiniCPM-V compat fixes applied: " + ("; ".join(self.fixes) if self.fixes else "none needed")


def _remote_modules(model: torch.nn.Module) -> list[types.ModuleType]:
    package = type(model).__module__.rpartition(".")[0]
    return [m for n, m in list(sys.modules.items()) if package and n.startswith(package + ".") and m is not None]


def _import_fixes(model: torch.nn.Module) -> list[str]:
    """Which of the import-time stand-ins the checkpoint's modules took."""
    used = []
    modules = _remote_modules(model)
    if any(vars(m).get("torchvision") is TORCHVISION_STUB for m in modules):
        used.append("stubbed the unused `import torchvision`")
    if any(vars(m).get("_prepare_4d_attention_mask") is _prepare_4d_attention_mask for m in modules):
        used.append("shimmed transformers.modeling_attn_mask_utils")
    for m in modules:
        source = Path(getattr(m, "__file__", "") or "")
        text = source.read_text(errors="replace") if source.is_file() else ""
        if vars(m).get("List") is typing.List and "from torch.nn.functional import *" in text \
                and not re.search(r"from typing import[^\n]*\bList\b", text):
            used.append(f"lent typing.List to {source.name}'s `from torch.nn.functional import *`")
            break
    return used


def load(folder: Path, dtype: torch.dtype, refill: bool = True) -> Loaded:
    """AutoModel + AutoTokenizer with ``trust_remote_code``, the fixes applied, the tables verified."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    with remote_code_imports():
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
        if reference is None:
            raise BenchError(f"{folder}/config.json names no AutoModel class in auto_map; restore the checkpoint's config")
        ensure_post_init(get_class_from_dynamic_module(reference, folder))
        model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=True, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    fixes = _import_fixes(model)
    if getattr(model, "_bench_called_post_init", False):
        fixes.append("called the missing post_init()")
    if refill:
        names = refill_tables(model)
        errors = verify_tables(model, folder)
        fixes.append(f"re-filled {', '.join(names)} (sin-cos verified, max error {max(errors.values()):.1g})")
    if getattr(tokenizer, "chat_template", None) and chat_ids(tokenizer, [{"role": "user", "content": "hi"}])[1]:
        fixes.append("read input_ids from apply_chat_template's dict")
    return Loaded(model, tokenizer, fixes)
