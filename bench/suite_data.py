"""A suite's data on disk: ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` + ``images/``, prepared once,
cached by content.

Three splits, because every choice the harness makes (learning rate, best cell, pruning, the saved
adapter, the recommendation) must look at data that is then not reported: ``val`` is carved out of the
training pool (whole documents, fixed seed) and ``test`` is only ever reported.

Generated data is written to ``<cache>/<suite>-<hash>/`` where the hash covers the suite, its
generator's source and the sizes and seed, so a changed generator never reuses stale files. The folder
is built under a temporary name and renamed into place, so a killed preparation leaves nothing that
looks complete. lm-eval reads the same folder through :func:`load_split_dataset` (paths, not decoded
images, travel through lm-eval; the model decodes them lazily).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError

SPLITS = ("train", "val", "test")
VAL_SEED = 0  # which training documents become validation documents


def cache_root() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "lora-vlm-bench"))


@dataclass(frozen=True)
class Row:
    id: str
    image: str  # absolute path
    question: str
    answers: list[str]
    qtype: str
    source_id: dict | None = None  # the dataset's own question id, for real data that has one


def read_split(folder: Path, split: str) -> list[Row]:
    path = Path(folder) / f"{split}.jsonl"
    rows = []
    with open(path) as fh:
        for line in fh:
            doc = json.loads(line)
            image = doc["image"] if os.path.isabs(doc["image"]) else str(Path(folder) / doc["image"])
            rows.append(Row(doc["id"], image, doc["question"], list(doc["answers"]), doc.get("qtype", ""), doc.get("source_id")))
    return rows


def load_split_dataset(data_dir: str | None = None, **_metadata):
    """lm-eval ``custom_dataset`` hook: the prepared folder as a ``DatasetDict`` of image paths."""
    import datasets

    if not data_dir:
        raise ValueError("this task reads prepared data: pass metadata={'data_dir': ...} to the TaskManager")
    out = {}
    for split in SPLITS:
        if (Path(data_dir) / f"{split}.jsonl").is_file():
            rows = read_split(Path(data_dir), split)
            docs = [dict(r.__dict__) for r in rows]
            if not any(d["source_id"] for d in docs):  # generated data: no dataset ids, no column
                for d in docs:
                    del d["source_id"]
            out[split] = datasets.Dataset.from_list(docs)
    return datasets.DatasetDict(out)


def generator_fingerprint(generate_fn) -> str:
    """Hash of the generator's source and of the project modules it draws with (another suite's
    generator, bench.render): editing any of them invalidates the cached data."""
    module = inspect.getmodule(generate_fn)
    used = {module.__name__: module}
    for value in vars(module).values():
        source = inspect.getmodule(value)
        if source is not None and source.__name__.split(".")[0] in ("suites", "bench"):
            used[source.__name__] = source
    text = "".join(inspect.getsource(used[name]) for name in sorted(used))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def carve(rows: list, n_val: int, doc, seed: int = VAL_SEED) -> tuple[list, list]:
    """Split a training pool into (train, val) by whole documents, ``n_val`` items or just over.

    ``doc(row)`` names a row's document (its image): a document is never on both sides.
    """
    docs = list(dict.fromkeys(doc(r) for r in rows))
    random.Random(seed).shuffle(docs)
    size: dict[str, int] = {}
    for r in rows:
        size[doc(r)] = size.get(doc(r), 0) + 1
    chosen, count = set(), 0
    for d in docs:
        if count >= n_val:
            break
        chosen.add(d)
        count += size[d]
    return [r for r in rows if doc(r) not in chosen], [r for r in rows if doc(r) in chosen]


def prepare_generated(suite: str, generate_fn, sizes: dict[str, int], seed: int, options: dict | None = None) -> Path:
    """Generate (or reuse) a suite's splits: test first, then a training pool from which ``val`` is
    carved; no document is in two splits."""
    options = options or {}
    spec = {"suite": suite, "sizes": sizes, "seed": seed, "options": options, "generator": generator_fingerprint(generate_fn),
            "val_seed": VAL_SEED}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"{suite}-{digest}"
    if content_digest(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{suite}-", dir=folder.parent))
    try:
        (tmp / "images").mkdir()
        seen: set[str] = set()
        # Test first: training items whose document appears in test are skipped, never the reverse.
        test = _draw(tmp, "test", generate_fn, sizes["test"], seed * 1000, options, seen)
        pool = _draw(tmp, "pool", generate_fn, sizes["train"] + sizes.get("val", 0), seed * 1000 + 1, options, seen)
        train, val = carve(pool, sizes.get("val", 0), doc=lambda r: r["doc"])
        content = hashlib.sha256()
        for split, rows in (("test", test), ("train", train), ("val", val)):
            _write_split(tmp, split, rows, content)
        (tmp / "COMPLETE").write_text(json.dumps({**spec, "content": content.hexdigest()[:16]}, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same folder first
            if not content_digest(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def content_digest(folder: Path) -> str | None:
    """Hash of a prepared folder's questions, answers and pixels (None if not complete).

    Records are keyed by it, not by the generator's source: refactoring a generator without
    changing what it draws keeps earlier results valid, and any change to the data invalidates them.
    """
    try:
        return json.loads((Path(folder) / "COMPLETE").read_text()).get("content")
    except (OSError, ValueError):
        return None


def describe(folder: Path) -> str:
    """Where a prepared folder's data came from, for the reports."""
    meta = json.loads((Path(folder) / "COMPLETE").read_text())
    counts = {split: sum(1 for _ in open(Path(folder) / f"{split}.jsonl")) if (Path(folder) / f"{split}.jsonl").is_file() else 0
              for split in SPLITS}
    sizes = f"{counts['train']} train / {counts['val']} validation / {counts['test']} test items"
    if "format" in meta:
        return f"{Path(meta['source']).name} ({meta['format']}; {sizes})"
    return f"generated (seed {meta['seed']}; {sizes})"


def _draw(root: Path, prefix: str, generate_fn, n: int, seed: int, options: dict, seen: set[str]) -> list[dict]:
    """``n`` items with documents not in ``seen``; images saved as ``images/<prefix>-NNNNNN.png``."""
    rows = []
    stream = generate_fn(n * 2 + 100, seed, **options)
    for item in stream:
        if len(rows) == n:
            break
        key = item.get("key") or hashlib.sha256(item["image"].tobytes()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        rel = f"images/{prefix}-{len(rows):06d}.png"
        item["image"].save(root / rel)
        pixels = hashlib.sha256(f"{item['image'].mode}{item['image'].size}".encode() + item["image"].tobytes()).hexdigest()
        rows.append({"image": rel, "question": item["question"], "answers": item["answers"],
                     "qtype": item.get("qtype", ""), "doc": key, "pixels": pixels})
    if len(rows) < n:
        split = "training" if prefix == "pool" else prefix
        raise BenchError(f"the {split} generator produced only {len(rows)} distinct documents of {n}; lower the size")
    return rows


def _write_split(root: Path, split: str, rows: list[dict], content) -> None:
    """Number the split's rows, move their images to ``images/<split>-NNNNNN.png``, write the jsonl."""
    with open(root / f"{split}.jsonl", "w") as fh:
        for n, drawn in enumerate(rows):
            ident = f"{split}-{n:06d}"
            rel = f"images/{ident}.png"
            if drawn["image"] != rel:
                os.replace(root / drawn["image"], root / rel)
            row = {"id": ident, "image": rel, **{k: drawn[k] for k in ("question", "answers", "qtype", "doc")}}
            content.update(json.dumps(row, sort_keys=True).encode() + drawn["pixels"].encode())
            fh.write(json.dumps(row) + "\n")
