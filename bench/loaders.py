"""Real datasets given with ``--data``: detect the format, validate every row, write a prepared folder.

The result is the same layout the offline generators produce (``train.jsonl`` / ``test.jsonl`` with
image paths + ``COMPLETE``), so training, lm-eval and the records never know where data came from.
Image files are referenced in place, never copied or kept in memory; images stored inside
parquet shards are streamed to files one batch at a time. Each image is decoded once here, within the
pixel limit of bench/images.py, so a broken, truncated or oversized file is reported with its row
before any run starts.

Formats (detected from the files, whatever their names):

- ``textvqa-json``: ``{"data": [{"question", "answers": [10], "image_id", ...}]}``; images
  ``<image_id>.jpg|png`` anywhere under the data folder.
- ``docvqa-json``: ``{"data": [{"questionId", "question", "image", "docId", "answers"}]}``; ``image``
  relative to the JSON file's folder (or the data folder).
- ``chartqa-json``: ``[{"imgname", "query", "label"}]``; images in ``png/`` next to the JSON file.
- ``parquet``: Hugging Face shards with ``question`` (or ``query``), ``answers`` (or ``answer`` /
  ``label``) and ``image`` as ``{bytes, path}``.

Each row keeps the dataset's own question id (DocVQA ``questionId``, TextVQA ``question_id``, ChartQA
image name + query, parquet ``questionId``/``question_id`` columns) as ``source_id``: records carry it
per item and bench/submission.py writes predictions files in the dataset's submission format.

Splits come from the source (a row's ``set_name``, the file's ``dataset_split``, a ``train/`` or
``val/`` folder, a ``train-``/``validation-`` shard name). Train is the train split, test the
validation split (or a labelled test split). With one labelled split only, it is divided with a fixed
seed, whole images at a time, so no image is in both. The harness's own validation split (every
choice looks at it, never at test) is then carved out of train the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1  # of the training items, whole images at a time...
MAX_VAL_ITEMS = 1000  # ...up to this many: enough to choose with, without starving training
SPLIT_SEED = 0
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test"}  # fmt: skip


@dataclass
class Row:
    """One question from a source file. ``image`` is a path, or ``(shard, index)`` inside a parquet file."""

    question: str
    answers: list[str]
    image: Path | tuple[Path, int]
    doc: str  # what identifies the image: rows sharing it never straddle train and test
    split: str | None
    where: str  # "<file> row <n>", for error messages
    source_id: dict | None = None  # the dataset's own question id (bench/submission.py writes it back)


@dataclass
class Source:
    format: str
    files: list[Path]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- detection


def _json_candidates(root: Path) -> list[Path]:
    """JSON files in the folder and its direct subfolders (deeper ones are per-image annotations)."""
    if root.is_file():
        return [root]
    found = sorted(p for p in root.glob("*.json") if not p.name.startswith("."))
    found += sorted(p for p in root.glob("*/*.json") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    return found


def parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    return sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _read_json(path: Path):
    if path.stat().st_size == 0:
        raise BenchError(f"{path} is empty; pass a dataset file with rows (or remove it from the folder)")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix or remove the file") from None
    except UnicodeDecodeError:
        raise BenchError(f"{path} is not UTF-8 text; pass a JSON dataset file") from None


def _json_format(payload) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        first = next((r for r in payload["data"] if isinstance(r, dict)), {})
        if "image_id" in first:
            return "textvqa-json"
        if "questionId" in first or "docId" in first or "image" in first:
            return "docvqa-json"
        if not payload["data"]:
            return "empty"
    if isinstance(payload, list):
        first = next((r for r in payload if isinstance(r, dict)), {})
        if "imgname" in first or "query" in first:
            return "chartqa-json"
        if not payload:
            return "empty"
    return None


def detect(path: Path) -> Source:
    """Which format ``path`` holds, and its files; a one-line error when nothing is recognised."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"--data {path} does not exist; pass a dataset file or folder")
    parquet = parquet_files(path)
    if parquet:
        return Source("parquet", parquet)
    if path.is_file() and path.suffix != ".json":
        raise BenchError(f"--data {path} is neither a .json nor a .parquet file; pass a TextVQA, DocVQA or ChartQA JSON file, parquet shards, or their folder")
    formats: dict[str, list[Path]] = {}
    for candidate in _json_candidates(path):
        kind = _json_format(_read_json(candidate))
        if kind == "empty":
            raise BenchError(f"{candidate} has no rows; pass a dataset file with rows (or remove it from the folder)")
        if kind:
            formats.setdefault(kind, []).append(candidate)
    if not formats:
        raise BenchError(f"--data {path}: no TextVQA, DocVQA or ChartQA JSON and no parquet shards found (JSON is looked for in the folder and its direct subfolders)")
    if len(formats) > 1:
        found = "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in sorted(formats.items()))
        raise BenchError(f"--data {path} mixes formats ({found}); point --data at one dataset")
    (kind, files), = formats.items()
    return Source(kind, files)


# ----------------------------------------------------------------------------- reading


def _split_name(*hints: str | None) -> str | None:
    for hint in hints:
        if not hint:
            continue
        for token in re.split(r"[^a-z]+", str(hint).lower()):
            if token in SPLIT_NAMES:
                return SPLIT_NAMES[token]
    return None


def _need(row, key: str, where: str, kind, fix: str):
    if not isinstance(row, dict):
        raise BenchError(f"{where} is not an object; each row must be a JSON object with {fix}")
    if key not in row or row[key] is None:
        raise BenchError(f"{where} has no {key!r}; each row needs {fix}")
    value = row[key]
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, (str, int, float)) for v in value):
            raise BenchError(f"{where}: {key!r} must be a non-empty list of strings (got {str(value)[:40]!r}); each row needs {fix}")
        return [str(v) for v in value]
    if not isinstance(value, (str, int)) or str(value).strip() == "":
        raise BenchError(f"{where}: {key!r} must be a non-empty string (got {str(value)[:40]!r}); each row needs {fix}")
    return str(value)


class _ImageIndex:
    """File stem -> path for every image under a folder, built on first use (TextVQA names images by id)."""

    def __init__(self, root: Path):
        self.root, self._index = root, None

    def find(self, stem: str) -> Path | None:
        if self._index is None:
            self._index = {}
            for folder, _, names in os.walk(self.root):
                for name in names:
                    p = Path(folder) / name
                    if p.suffix.lower() in IMAGE_SUFFIXES:
                        self._index.setdefault(p.stem, p)
        return self._index.get(stem)


def _labelled(rows: list, key: str) -> bool:
    """A file whose rows carry no answers at all is an unlabelled test split: skipped, not an error."""
    return any(isinstance(r, dict) and r.get(key) not in (None, [], "") for r in rows)


def _read_textvqa(source: Source, root: Path) -> None:
    fix = "question, answers and image_id (TextVQA JSON)"
    index = _ImageIndex(root if root.is_dir() else root.parent)
    for path in source.files:
        payload = _read_json(path)
        if not _labelled(payload["data"], "answers"):
            source.notes.append(f"skipped {path.name}: no answers (an unlabelled split)")
            continue
        file_split = _split_name(payload.get("dataset_split"), payload.get("dataset_type"), path.stem)
        for i, row in enumerate(payload["data"]):
            where = f"{path} row {i}"
            question = _need(row, "question", where, str, fix)
            answers = _need(row, "answers", where, list, fix)
            image_id = _need(row, "image_id", where, str, fix)
            image = index.find(image_id)
            if image is None:
                raise BenchError(f"{where}: image {image_id}.jpg not found under {index.root}; put the TextVQA images folder inside the data folder")
            source.rows.append(Row(question, answers, image, image_id, _split_name(row.get("set_name")) or file_split, where,
                                   _ids(row, ("question_id",))))


def _read_docvqa(source: Source, root: Path) -> None:
    fix = "question, answers and image (DocVQA JSON)"
    base = root if root.is_dir() else root.parent
    for path in source.files:
        payload = _read_json(path)
        if not _labelled(payload["data"], "answers"):
            source.notes.append(f"skipped {path.name}: no answers (an unlabelled split)")
            continue
        split = _split_name(payload.get("dataset_split"), path.stem, path.parent.name)
        for i, row in enumerate(payload["data"]):
            where = f"{path} row {i}"
            question = _need(row, "question", where, str, fix)
            answers = _need(row, "answers", where, list, fix)
            rel = _need(row, "image", where, str, fix)
            image = next((p for p in (path.parent / rel, base / rel) if p.is_file()), None)
            if image is None:
                raise BenchError(f"{where}: image {rel} not found next to {path.name} or under {base}; keep the documents folder where the JSON expects it")
            source.rows.append(Row(question, answers, image, str(row.get("docId", rel)) + "|" + rel, split, where,
                                   _ids(row, ("questionId",))))


def _read_chartqa(source: Source, root: Path) -> None:
    fix = "imgname, query and label (ChartQA JSON)"
    base = root if root.is_dir() else root.parent
    for path in source.files:
        payload = _read_json(path)
        split = _split_name(path.parent.name, path.stem)
        for i, row in enumerate(payload):
            where = f"{path} row {i}"
            question = _need(row, "query", where, str, fix)
            answers = _need(row, "label", where, list, fix)
            name = _need(row, "imgname", where, str, fix)
            candidates = (path.parent / "png" / name, path.parent / name, base / "png" / name, base / name)
            image = next((p for p in candidates if p.is_file()), None)
            if image is None:
                raise BenchError(f"{where}: image {name} not found in {path.parent / 'png'}; keep the png folder next to the JSON file")
            source.rows.append(Row(question, answers, image, f"{split}|{name}", split, where, {"imgname": name, "query": question}))


_QUESTION_COLUMNS = ("question", "query")
ID_COLUMNS = ("questionId", "question_id")  # DocVQA's and TextVQA's (VQA's) question ids


def _ids(row: dict, keys: tuple[str, ...]) -> dict | None:
    """The dataset's own ids of a row (those of ``keys`` it has), for the submission file."""
    ids = {k: row[k] for k in keys if row.get(k) is not None}
    return ids or None
_ANSWER_COLUMNS = ("answers", "answer", "label")


def _read_parquet(source: Source, root: Path) -> None:
    import pyarrow.parquet as pq

    for path in source.files:
        try:
            shard = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise BenchError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]}); re-download or remove it") from None
        names = shard.schema_arrow.names
        q = next((c for c in _QUESTION_COLUMNS if c in names), None)
        a = next((c for c in _ANSWER_COLUMNS if c in names), None)
        missing = [what for what, col in (("question", q), ("answers", a), ("image", "image" if "image" in names else None)) if col is None]
        if missing:
            raise BenchError(f"{path} has no {', '.join(missing)} column (columns: {', '.join(names)}); expected Hugging Face VQA shards with question, answers and image")
        if shard.metadata.num_rows == 0:
            raise BenchError(f"{path} has no rows; remove the empty shard")
        split = _split_name(path.stem, path.parent.name)
        doc_col = next((c for c in ("docId", "image_id", "imgname") if c in names), None)
        id_cols = tuple(c for c in ID_COLUMNS if c in names)
        if not id_cols and "imgname" in names:  # ChartQA shards: the image name and the query are the id
            id_cols = ("imgname", q)
        fix = "question, answers and image (Hugging Face parquet)"
        index = 0
        columns = list(dict.fromkeys([q, a, *([doc_col] if doc_col else []), *id_cols]))
        for batch in shard.iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                where = f"{path} row {index}"
                question = _need(row, q, where, str, fix)
                answers = _need(row, a, where, list, fix)
                doc = f"{path.name}#{row[doc_col]}" if doc_col and row.get(doc_col) is not None else f"{path.name}#{index}"
                ids = _ids(row, id_cols)
                if ids and q in ids:
                    ids["query"] = ids.pop(q)
                source.rows.append(Row(question, answers, (path, index), doc, split, where, ids))
                index += 1


READERS = {"textvqa-json": _read_textvqa, "docvqa-json": _read_docvqa, "chartqa-json": _read_chartqa, "parquet": _read_parquet}


# ----------------------------------------------------------------------------- splitting


def assign_splits(rows: list[Row], notes: list[str]) -> dict[str, list[Row]]:
    """Train = the train split; test = val (else a labelled test split); one split only -> divided by
    image. Validation is carved out of train (whole images, fixed seed)."""
    from bench.suite_data import carve

    by_split: dict[str | None, list[Row]] = {}
    for row in rows:
        by_split.setdefault(row.split, []).append(row)
    test_name = "val" if "val" in by_split else "test" if "test" in by_split else None
    if "train" in by_split and test_name:
        train, test = by_split["train"], by_split[test_name]
        in_test = {r.doc for r in test}
        kept = [r for r in train if r.doc not in in_test]
        if len(kept) < len(train):
            notes.append(f"dropped {len(train) - len(kept)} train rows whose image is also in the {test_name} split")
        train = kept
    else:
        pool = [r for rs in by_split.values() for r in rs]
        docs = sorted({r.doc for r in pool})
        if len(docs) < 3:
            raise BenchError(f"{pool[0].where.rsplit(' row ', 1)[0]}: {len(docs)} image(s) only; train, validation and test "
                             "splits need at least three images")
        random.Random(SPLIT_SEED).shuffle(docs)
        n_test = max(1, round(len(docs) * TEST_FRACTION))
        test_docs = set(docs[:n_test])
        notes.append(f"one labelled split: {n_test} of {len(docs)} images held out for test (seed {SPLIT_SEED})")
        train, test = [r for r in pool if r.doc not in test_docs], [r for r in pool if r.doc in test_docs]
    if len({r.doc for r in train}) < 2:
        raise BenchError(f"{train[0].where.rsplit(' row ', 1)[0] if train else 'the data'}: the training split has fewer than "
                         "two images; a validation split is carved from it, so it needs at least two")
    n_val = max(1, min(MAX_VAL_ITEMS, round(len(train) * VAL_FRACTION)))
    train, val = carve(train, n_val, doc=lambda r: r.doc, seed=SPLIT_SEED)
    notes.append(f"validation: {len(val)} training rows ({len({r.doc for r in val})} images) carved out (seed {SPLIT_SEED})")
    return {"train": train, "val": val, "test": test}


def _limited(rows: list[Row], limit: int | None) -> list[Row]:
    if limit is None or len(rows) <= limit:
        return rows
    picked = random.Random(SPLIT_SEED).sample(range(len(rows)), limit)
    return [rows[i] for i in sorted(picked)]


# ----------------------------------------------------------------------------- preparing


def _verify(path: Path, where: str) -> None:
    """Decoded in full once, within the pixel limit (bench/images.py): a truncated file or a
    decompression bomb is refused here, with its row, before any run starts."""
    from bench import images

    images.check(path, where)


def _hash_file(path: Path, content) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            content.update(chunk)


def _extract_parquet(rows: list[Row], images: Path, prefix: str) -> list[Path]:
    """Stream the rows' image bytes out of their shards to files, one batch in memory at a time."""
    import pyarrow.parquet as pq

    wanted: dict[Path, dict[int, int]] = {}
    for i, row in enumerate(rows):
        shard, index = row.image
        wanted.setdefault(shard, {})[index] = i
    written: list[Path | None] = [None] * len(rows)
    for shard, indices in wanted.items():
        offset = 0
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=64, columns=["image"]):
            for j, value in enumerate(batch.column(0).to_pylist()):
                i = indices.get(offset + j)
                if i is None:
                    continue
                data = value.get("bytes") if isinstance(value, dict) else value
                if not data:
                    raise BenchError(f"{rows[i].where}: the image has no bytes; re-download the shard")
                suffix = Path((value.get("path") if isinstance(value, dict) else None) or "").suffix.lower()
                out = images / f"{prefix}-{i:07d}{suffix if suffix in IMAGE_SUFFIXES else '.png'}"
                out.write_bytes(data)
                written[i] = out
            offset += batch.num_rows
    return written


def _source_fingerprint(source: Source) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in source.files]


def _loader_fingerprint() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def prepare(suite: str, path: Path, accepted: tuple[str, ...], limit: int | None, cache: Path, console=None) -> Path:
    """Validate ``path`` and write (or reuse) its prepared folder under ``cache``."""
    path = Path(path)
    source = detect(path)
    if accepted and source.format not in accepted:
        raise BenchError(f"--data {path} holds {source.format} data, which suite {suite} does not read (it reads {', '.join(accepted)}); pick the matching --suite")
    spec = {"suite": suite, "format": source.format, "files": _source_fingerprint(source), "limit": limit,
            "split_seed": SPLIT_SEED, "loader": _loader_fingerprint()}
    folder = cache / f"{suite}-data-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}"
    from bench.suite_data import content_digest

    if content_digest(folder):
        return folder
    READERS[source.format](source, path)
    if not source.rows:
        raise BenchError(f"--data {path}: no labelled rows (every file was an unlabelled split); pass a split with answers")
    splits = assign_splits(source.rows, source.notes)
    for name, rows in splits.items():
        if not rows:
            raise BenchError(f"--data {path}: the {name} split is empty; add rows or use a dataset with both splits")
    splits = {name: _limited(rows, limit) for name, rows in splits.items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{suite}-data-", dir=folder.parent))
    try:
        (tmp / "images").mkdir()
        content = hashlib.sha256()
        for name in ("test", "train", "val"):
            _write_split(tmp, name, splits[name], content)
        (tmp / "COMPLETE").write_text(json.dumps({**spec, "source": str(path.resolve()), "notes": source.notes,
                                                  "content": content.hexdigest()[:16]}, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not content_digest(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if console is not None:
        for note in source.notes:
            console.print(f"[dim]{path.name}: {note}[/dim]")
    return folder


def _write_split(root: Path, split: str, rows: list[Row], content) -> None:
    parquet = [r for r in rows if isinstance(r.image, tuple)]
    extracted = iter(_extract_parquet(parquet, root / "images", split)) if parquet else None
    with open(root / f"{split}.jsonl", "w") as fh:
        for n, row in enumerate(rows):
            if isinstance(row.image, tuple):
                image = next(extracted)
                rel = str(image.relative_to(root))
            else:
                image = Path(row.image).resolve()
                rel = str(image)
            _verify(image, row.where)
            _hash_file(image, content)
            # answers[0] is the training target: put the most common answer first (TextVQA has ten).
            counts = Counter(row.answers)
            answers = sorted(row.answers, key=lambda a: -counts[a])
            doc = {"id": f"{split}-{n:06d}", "image": rel, "question": row.question, "answers": answers,
                   "qtype": "", "doc": row.doc}
            content.update(json.dumps({k: v for k, v in doc.items() if k != "image"}, sort_keys=True).encode())
            if row.source_id:  # not in the content digest: the same questions and answers are the same data
                doc["source_id"] = row.source_id
            fh.write(json.dumps(doc) + "\n")
