"""The frozen vision encoder's outputs, computed once per training batch and reused by later cells.

Cells whose vision policy leaves the encoder untouched (``frozen``, ``resampler``) run it forward on
exactly the same batches: a seed fixes the batch order for every cell (bench.train.batch_order) and
the base weights never change. A profiled default run spent ~6% of its time recomputing it. The
first such cell of a seed computes each step's output as before and stores it; later cells load it,
so their numbers are bit-for-bit those of a run without the cache.

Outputs go to files in a temporary folder, not to memory: the benchmark measures each cell's peak
memory, and a cache in the process would be counted in it. ``MAX_BYTES`` bounds the folder; past it,
steps are computed as usual.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_BYTES = 4 * 2**30


def encoder_is_frozen(vision: str, lora: list[str], full: list[str]) -> bool:
    """True when no LoRA layer and no fully trained module lies inside, or contains, ``vision``."""
    for name in [*lora, *full]:
        if name == vision or name.startswith(f"{vision}.") or vision.startswith(f"{name}."):
            return False
    return True


class VisionCache:
    """One process's cache for one training set; :meth:`clear` when the training examples change."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.folder: Path | None = None
        self.stored: dict[tuple, tuple] = {}  # key -> (file, pixel checksum, output type or None for a tensor)
        self.bytes = 0
        self.hits = self.misses = 0
        self._key = None

    def clear(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self.stored, self.bytes = None, {}, 0

    @contextmanager
    def serving(self, encoder: torch.nn.Module):
        """Route ``encoder``'s forward through the cache while the block runs (training steps only)."""
        original = encoder.forward

        def forward(*args, **kwargs):
            return self._forward(original, args, kwargs)

        encoder.forward = forward
        try:
            yield self
        finally:
            del encoder.forward  # the class's forward again
            self._key = None

    @contextmanager
    def step(self, key: tuple):
        """Mark the forward calls inside as training step ``key`` (seed, batch size, step index)."""
        self._key = key
        try:
            yield
        finally:
            self._key = None

    def _forward(self, original, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if self._key is None or not torch.is_tensor(pixels):
            return original(*args, **kwargs)
        checksum = (tuple(pixels.shape), float(pixels.double().sum()))
        entry = self.stored.get(self._key)
        if entry is not None and entry[1] == checksum:
            self.hits += 1
            path, _, kind = entry
            tensors = load_file(str(path), device=str(pixels.device))
            return tensors["output"] if kind is None else kind(**tensors)
        self.misses += 1
        out = original(*args, **kwargs)
        self._store(self._key, checksum, out)
        return out

    def _store(self, key: tuple, checksum: tuple, out) -> None:
        if key in self.stored:
            return
        if torch.is_tensor(out):
            tensors, kind = {"output": out}, None
        elif hasattr(out, "keys") and all(torch.is_tensor(out[k]) for k in out.keys()):
            tensors, kind = {k: out[k] for k in out.keys()}, type(out)
        else:  # tuples of hidden states and the like: not worth a format
            return
        if any(t.requires_grad for t in tensors.values()):  # something inside trains after all
            return
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.bytes + size > self.max_bytes:
            return
        if self.folder is None:
            _remove_orphans()
            self.folder = Path(tempfile.mkdtemp(prefix=f"bench-vision-{os.getpid()}-"))
            weakref.finalize(self, shutil.rmtree, self.folder, True)  # also at interpreter exit
        path = self.folder / f"{len(self.stored)}.safetensors"
        try:
            save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(path))
        except Exception:  # a full temporary folder (or a file size limit): a cache is no reason to fail the run
            path.unlink(missing_ok=True)
            self.max_bytes = self.bytes  # stop caching; steps are computed as usual
            return
        self.stored[key] = (path, checksum, kind)
        self.bytes += size


def _remove_orphans() -> None:
    """Folders left by processes that were killed (``kill -9`` skips every cleanup)."""
    for folder in Path(tempfile.gettempdir()).glob("bench-vision-*-*"):
        pid = folder.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
