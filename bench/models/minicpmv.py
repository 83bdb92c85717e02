"""MiniCPM-V checkpoints (``model_type: minicpmv``): their modelling code ships inside the checkpoint.

Running that code is the user's decision, so loading refuses without ``--trust-remote-code``. The
role map is MiniCPM-V's own (``vpm`` / ``resampler`` / ``llm``), the one the embedded tiny model was
built to share, and batches use the same token-level format as the embedded model (image
placeholder slots filled from ``vpm`` -> ``resampler``; ``forward(input_ids, attention_mask,
pixel_values, labels)`` and ``generate``). OpenBMB's released checkpoints take a different batch
(``forward(data=...)`` with image slices, ``image_bound`` and ``tgt_sizes``); they are detected and
refused with a clear message until that format is implemented.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from bench.errors import BenchError
from bench.models.tiny_minicpmv import MINICPMV_ROLES, TinyMiniCPMVAdapter


class MiniCPMVAdapter(TinyMiniCPMVAdapter):
    family = "minicpmv"
    roles = MINICPMV_ROLES
    loads_bf16_on_cuda = True

    def __init__(self, source: Path, trust_remote_code: bool = False):
        super().__init__(source)
        self.trust_remote_code = trust_remote_code

    def display_name(self) -> str:
        return f"{self.family} ({self.source})"

    def load(self, device: torch.device) -> None:
        if not self.trust_remote_code:
            raise BenchError(f"{self.source} is a MiniCPM-V checkpoint whose model code ships inside it; "
                             "rerun with --trust-remote-code if you trust that code")
        from transformers import AutoModel, AutoTokenizer

        dtype = self._load_dtype(device)
        try:
            model = AutoModel.from_pretrained(self.source, trust_remote_code=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=True)
        except (OSError, ValueError, ImportError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(f"cannot load MiniCPM-V checkpoint {self.source} ({first}); point --model at a complete local folder") from None
        if "data" in inspect.signature(model.forward).parameters:
            raise BenchError(f"{self.source} uses OpenBMB's forward(data=...) batch format (image slices, image_bound, tgt_sizes), "
                             "which this harness does not build yet; use a transformers-native family or the embedded model")
        self.attach(model.to(device).eval(), tokenizer)
