"""Image sets and their vision-encoder features, cached per (model, image set).

An image set is whatever similarity compares: a suite's images, the user's folder or dataset, or a
sample of the model's pretraining distribution. Features are the model's own vision encoder's
mean-pooled hidden states (an early and the final layer), L2-normalised, computed once per (model
weights, image set, sample) and kept as ``.npz`` under the cache, so repeated calls are instant.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.errors import BenchError
from bench.images import check as check_image
from bench.images import open_rgb
from bench.loaders import IMAGE_SUFFIXES
from bench.store import atomic_write_bytes
from bench.suite_data import cache_root, content_digest, read_split

FEATURES_VERSION = 1  # bump when the pooling or normalisation changes


@dataclass(frozen=True)
class ImageSet:
    name: str
    origin: str  # where the images came from, for the reports
    key: str  # identifies the sampled content (with the model's fingerprint, the cache key)
    load: Callable[[], Iterable[Image.Image]]  # the images in RGB, decoded one at a time (embed takes a batch at a time)


def _sample(items: list, n: int, seed: int) -> list:
    return sorted(random.Random(seed).sample(items, n)) if len(items) > n else list(items)


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def _open_each(paths: list[Path], where: str) -> Iterator[Image.Image]:
    """The files as RGB, one at a time (bench/images.py): a damaged, truncated or oversized file ends
    the set with a one-line error naming it, never a silent gap in the sample."""
    for path in paths:
        yield open_rgb(path, where)


def from_paths(name: str, origin: str, paths: list[Path], n: int, seed: int, check: str | None = None) -> ImageSet:
    """``check``: decode every sampled file now, errors prefixed with it (the user's own folders are
    refused before the model loads)."""
    chosen = _sample(sorted(paths), n, seed)
    if check:
        for path in chosen:
            check_image(path, check)
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in chosen]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:20]
    return ImageSet(name, f"{origin}; {len(chosen)} of {len(paths)} images", key, lambda: _open_each(chosen, name))


def from_prepared(name: str, folder: Path, n: int, seed: int, split: str = "test") -> ImageSet:
    """A prepared suite folder (generated or loaded from --data): its ``split`` images."""
    rows = read_split(folder, split)
    images = sorted({r.image for r in rows})
    chosen = _sample(images, n, seed)
    key = f"{content_digest(folder)}-{split}-{n}-{seed}"
    origin = f"{folder.name} {split} split; {len(chosen)} of {len(images)} images"
    return ImageSet(name, origin, key, lambda: _open_each([Path(p) for p in chosen], name))


def from_images(name: str, origin: str, images: list[Image.Image]) -> ImageSet:
    digest = hashlib.sha256()
    for im in images:
        digest.update(f"{im.mode}{im.size}".encode() + im.tobytes())
    return ImageSet(name, origin, digest.hexdigest()[:20], lambda: images)


def _suite_folder(suite_name: str, n: int, prepared: str | None) -> Path:
    """The folder a suite's benchmark records name when it is still prepared in the cache, otherwise a
    fresh sample of its generator (same distribution, same seed)."""
    from bench import suites

    if prepared and content_digest(cache_root() / prepared):
        return cache_root() / prepared
    suite = suites.get(suite_name)
    if prepared and "-data-" in prepared:
        raise BenchError(f"suite {suite_name}'s records were measured on a dataset ({prepared}) that is no longer prepared "
                         f"in {cache_root()}; rerun that benchmark with its --data (it re-prepares the folder)")
    return suite.prepare(train_items=1, test_items=max(n, 1), val_items=0)


def suite_images(suite_name: str, n: int, seed: int = 0, prepared: str | None = None) -> ImageSet:
    """A suite's test images."""
    return from_prepared(suite_name, _suite_folder(suite_name, n, prepared), n, seed)


def resolve(text: str, n: int, seed: int = 0) -> ImageSet:
    """``--data`` for similarity: a suite name, a folder of images (searched recursively), or a
    dataset the loaders read (parquet shards carry their images inside)."""
    from bench import loaders, suites

    if text in suites.available():
        return suite_images(text, n, seed)
    path = Path(text).expanduser()
    if not path.exists():
        raise BenchError(f"--data {text} is neither a suite ({', '.join(suites.available())}) nor an existing path; "
                         "pass a folder of images or a suite name")
    if path.is_dir():
        paths = _image_files(path)
        if paths:
            return from_paths(path.name, str(path), paths, n, seed, check=f"--data {text}")
    if not loaders.parquet_files(path):
        raise BenchError(f"--data {text} holds no images (png/jpg/webp/...) and no parquet shards; point it at a folder of images")
    folder = loaders.prepare("data", path, (), None, cache_root())
    return from_prepared(path.name, folder, n, seed, split="train")


def reference_images(adapter, reference: str | None, n: int, seed: int = 0) -> ImageSet | None:
    """The pretraining reference: ``--reference DIR`` when given, else the family's own sample (or None)."""
    if reference:
        path = Path(reference).expanduser()
        paths = _image_files(path) if path.is_dir() else []
        if not paths:
            raise BenchError(f"--reference {reference} is not a folder of images; pass images representative of the model's pretraining")
        return from_paths("pretraining", f"--reference {path}", paths, n, seed, check=f"--reference {reference}")
    images = adapter.pretraining_reference(n, seed)
    if images is None:
        return None
    return from_images("pretraining", f"{adapter.family} pretraining generator (held-out seeds); {len(images)} images", images)


# ------------------------------------------------------------------------------------------- text


@dataclass(frozen=True)
class TextSet:
    """Questions with their first answer, one string each: where a task sits in the LLM's token space."""

    name: str
    key: str
    texts: tuple[str, ...]


def _texts(name: str, rows, n: int, seed: int, key: str) -> TextSet:
    texts = [f"{r.question} {r.answers[0]}" for r in sorted(rows, key=lambda r: r.id)]
    return TextSet(name, f"{key}-{n}-{seed}", tuple(_sample(texts, n, seed)))


def suite_texts(suite_name: str, n: int, seed: int = 0, prepared: str | None = None) -> TextSet:
    """A suite's test questions and answers (the same folder as :func:`suite_images`)."""
    folder = _suite_folder(suite_name, n, prepared)
    return _texts(suite_name, read_split(folder, "test"), n, seed, f"{content_digest(folder)}-test")


def data_texts(text: str, n: int, seed: int = 0) -> TextSet | None:
    """``--data``'s questions and answers: a suite, or a dataset the loaders read; None for a folder of
    images alone (nothing to say about its task)."""
    from bench import loaders, suites

    if text in suites.available():
        return suite_texts(text, n, seed)
    path = Path(text).expanduser()
    try:
        loaders.detect(path)
    except BenchError:  # no annotations: images only
        return None
    folder = loaders.prepare("data", path, (), None, cache_root())
    return _texts(path.name, read_split(folder, "train"), n, seed, f"{content_digest(folder)}-train")


def reference_texts(adapter, n: int, seed: int = 0) -> TextSet | None:
    """Questions and answers like the model's pretraining, when the family can make them (else None)."""
    texts = adapter.pretraining_questions(n, seed)
    if texts is None:
        return None
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:20]
    return TextSet("pretraining", key, tuple(texts))


@torch.no_grad()
def embed_texts(adapter, text_set: TextSet) -> np.ndarray:
    """(n, d) L2-normalised mean token embeddings of the texts in the base model's LLM (cached like images)."""
    path = _cache_file(adapter, "texts", text_set.key, prefix="text-", suffix=".npy")
    if path.is_file():
        return np.load(path)
    device = next(adapter.model.parameters()).device
    feats = torch.nn.functional.normalize(adapter.text_features(list(text_set.texts), device).float(), dim=-1).cpu().numpy()
    buffer = io.BytesIO()
    np.save(buffer, feats)
    atomic_write_bytes(path, buffer.getvalue())
    return feats


def _cache_file(adapter, kind: str, key: str, prefix: str = "", suffix: str = ".npz") -> Path:
    """Where the features of one (model weights, ``kind`` of set, set key) are kept."""
    key = json.dumps({"model": adapter.fingerprint(), kind: key, "v": FEATURES_VERSION}, sort_keys=True)
    return cache_root() / "features" / f"{prefix}{hashlib.sha256(key.encode()).hexdigest()[:24]}{suffix}"


@torch.no_grad()
def embed(adapter, image_set: ImageSet, batch_size: int = 64) -> dict[str, np.ndarray]:
    """``{"early": (n, d), "final": (n, d)}`` L2-normalised features of the base model's vision encoder."""
    path = _cache_file(adapter, "images", image_set.key)
    if path.is_file():
        with np.load(path) as cached:
            return {k: cached[k] for k in cached.files}
    images = iter(image_set.load())
    device = next(adapter.model.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {}
    while batch := list(islice(images, batch_size)):  # one batch of decoded images in memory at a time
        arrays = [adapter.image_array(im) for im in batch]
        feats = adapter.vision_features(arrays, device)
        for layer, x in feats.items():
            chunks.setdefault(layer, []).append(torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy())
    out = {layer: np.concatenate(parts) for layer, parts in chunks.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    atomic_write_bytes(path, buffer.getvalue())
    return out
