"""One JSON record per run under ``<out>/records/<suite>/``, written atomically; resume reads them back.

Records are gzip-compressed JSON (``<key>.json.gz``): with per-item predictions for validation and
test they are ~60 KB of text each, ~9 KB compressed, and a published matrix holds hundreds. Plain
``<key>.json`` files (earlier records) are read too.

A record's file name is the run's key (cell, seed and a hash of everything that decides its numbers),
so a rerun of the same command finds finished runs and skips them, and no run can appear twice.
Writes go to a temporary file in the same folder, are flushed to disk and renamed over the target:
a process killed at any moment leaves either the old complete file or the new complete file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

from bench.errors import BenchError

SCHEMA = 2  # 2: validation split (val_score, val_items, val_curve), per-part learning rates
DONE = ("ok", "diverged")  # outcomes a rerun would reproduce; "failed"/"oom" are retried


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """mkstemp creates 0600 files; results are for sharing, so they get the usual 0666 & ~umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_record(path: Path) -> dict | None:
    """A record file (``.json.gz`` or ``.json``); None when it does not parse."""
    try:
        data = Path(path).read_bytes()
        return json.loads(gzip.decompress(data) if str(path).endswith(".gz") else data)
    except (OSError, EOFError, ValueError):
        return None  # cannot happen with atomic writes; treat a foreign broken file as absent


def record_files(folder: Path, pattern: str = "*/") -> list[Path]:
    """Record files under ``folder`` matching ``<pattern><key>.json[.gz]``, sorted."""
    folder = Path(folder)
    return sorted([*folder.glob(f"{pattern}*.json.gz"), *folder.glob(f"{pattern}*.json")])


def encode_record(record: dict) -> bytes:
    """Deterministic bytes (no timestamp in the gzip header): the same record gives the same file."""
    return gzip.compress(json.dumps(record, separators=(",", ":")).encode(), compresslevel=9, mtime=0)


def digest(payload: dict, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:n]


class Store:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.records_dir = self.out / "records"

    def check_writable(self) -> None:
        """Fail before any work if the output folder cannot take files (and create nothing else)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.out)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise BenchError(
                f"output folder {self.out} is not writable ({exc.strerror or exc}); pass --out with a folder you can write to"
            ) from None

    def path(self, suite: str, key: str) -> Path:
        return self.records_dir / suite / f"{key}.json.gz"

    def get(self, suite: str, key: str) -> dict | None:
        for path in (self.path(suite, key), self.records_dir / suite / f"{key}.json"):
            if path.is_file():
                return read_record(path)
        return None

    def is_done(self, suite: str, key: str) -> bool:
        record = self.get(suite, key)
        return record is not None and record.get("status") in DONE

    def put(self, record: dict) -> Path:
        record = {"schema": SCHEMA, **record}
        path = self.path(record["suite"], record["key"])
        atomic_write_bytes(path, encode_record(record))
        path.with_suffix("").unlink(missing_ok=True)  # a plain .json of the same run, written by an earlier version
        return path

    # a racing rung's training state (bench/race.py), saved before its "paused" record

    def paused_path(self, suite: str, key: str) -> Path:
        return self.out / ".paused" / suite / f"{key}.pt"

    def save_paused(self, suite: str, key: str, state: dict) -> None:
        import io

        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.paused_path(suite, key), buffer.getvalue())

    def load_paused(self, suite: str, key: str) -> dict | None:
        import torch

        path = self.paused_path(suite, key)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, EOFError, RuntimeError, ValueError):
            return None

    def drop_paused(self, suite: str, key: str) -> None:
        path = self.paused_path(suite, key)
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def all(self, suite: str | None = None) -> list[dict]:
        if not self.records_dir.is_dir():
            return []
        pattern = f"{suite}/" if suite else "*/"
        return [r for r in map(read_record, record_files(self.records_dir, pattern)) if r is not None]

    def clean_temporaries(self) -> None:
        """Remove partial files a killed process left behind (they never replaced a record)."""
        if self.records_dir.is_dir():
            for tmp in self.records_dir.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
