"""Trained adapters on disk: one PEFT folder per kept run, loadable with ``PeftModel.from_pretrained``.

``--save-adapters best`` (default) keeps, per suite, the folder of the run with the best validation
score so far (never chosen on test; a new best replaces the old one as soon as it is evaluated, so a long matrix never holds more than one
extra copy of a fully trained vision encoder); ``all`` keeps every run's; ``none`` saves nothing.
Each folder is written under a temporary name and renamed into place, and carries ``run.json``
(the run's key, cell, seed and score) next to peft's ``adapter_config.json`` and weights; for a
transformers-native family also ``lm_eval.sh``, the stock lm-eval command that scores it
(bench/stock_eval.py). ``--export merged`` adds a merged model folder per adapter folder (bench/export.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bench import store

MODES = ("best", "all", "none")


def folder(out: Path, suite: str) -> Path:
    return Path(out) / "adapters" / suite


def _saved(root: Path) -> list[tuple[float, Path]]:
    runs = []
    for meta in root.glob("*/run.json"):
        try:
            runs.append((float(json.loads(meta.read_text())["val_score"]), meta.parent))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return runs


def _adapter_bytes(peft_model) -> int:
    """What the saved folder takes, about: the trained weights (LoRA matrices, fully trained modules)."""
    return sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)


def keep(peft_model, record: dict, out: Path, mode: str, add=None) -> Path | None:
    """Save ``peft_model`` for a finished run if ``mode`` asks for it; returns the folder or None.
    ``add(folder, target)`` writes more files into the folder (its temporary; ``target``: where it will
    be) before it is renamed into place."""
    if mode == "none" or record.get("status") != "ok" or record.get("val_score") is None:
        return None
    root = folder(out, record["suite"])
    previous = _saved(root)
    if mode == "best" and previous and max(score for score, _ in previous) >= record["val_score"]:
        return None

    def fill(tmp: Path) -> None:
        peft_model.save_pretrained(tmp)
        meta = {k: record.get(k) for k in ("key", "suite", "model", "cell", "seed", "train", "val_score", "score", "metric")}
        (tmp / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
        if add is not None:
            add(tmp, root / record["key"])

    # a full disk is not the run's failure: stop, and the run is retried on the next start
    target = write_folder(root, record["key"], fill, lambda: _adapter_bytes(peft_model))
    if mode == "best":
        for _, old in previous:
            if old != target:
                discard(old)
    return target


def write_folder(root: Path, name: str, fill, size) -> Path:
    """``root/name`` as ``fill(tmp)`` writes it into a temporary folder (its writer in its name), renamed into
    place, a folder already there replaced through :func:`discard`: a kill leaves the old folder or the new
    one, never half of one. A full disk stops with one line naming the space ``size()`` needs."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=store.temp_prefix(name), suffix=".tmp", dir=root))
    store._in_flight.add(str(tmp))
    target = root / name
    try:
        fill(tmp)
        store._pause_in_write()
        if target.exists():
            discard(target)
        tmp.rename(target)
    except Exception as exc:
        reason = store.disk_full_reason(exc)
        if reason:
            raise store.disk_full(root, size(), reason) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        store._in_flight.discard(str(tmp))
    return target


def discard(folder: Path) -> None:
    """Delete a saved folder (an adapter's, or its merged model's: bench/export.py) so that a kill at any
    moment leaves it whole or gone: it is renamed to a temporary (its writer in the name) first, which the
    next start removes if the deletion was cut short."""
    aside = folder.parent / f"{store.temp_prefix(folder.name)}{os.urandom(4).hex()}.tmp"
    try:
        folder.rename(aside)
    except FileNotFoundError:  # another worker discarded it first
        return
    shutil.rmtree(aside, ignore_errors=True)
