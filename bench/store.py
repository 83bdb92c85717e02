"""One JSON record per run under ``<out>/records/<suite>/``, written atomically; resume reads them back.

A record's file name is the run's key (cell, seed and a hash of everything that decides its numbers),
so a rerun of the same command finds finished runs and skips them, and no run can appear twice.
Writes go to a temporary file in the same folder, are flushed to disk and renamed over the target:
a process killed at any moment leaves either the old complete file or the new complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from bench.errors import BenchError

SCHEMA = 1
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
        return self.records_dir / suite / f"{key}.json"

    def get(self, suite: str, key: str) -> dict | None:
        path = self.path(suite, key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # cannot happen with atomic writes; treat a foreign broken file as absent

    def is_done(self, suite: str, key: str) -> bool:
        record = self.get(suite, key)
        return record is not None and record.get("status") in DONE

    def put(self, record: dict) -> Path:
        record = {"schema": SCHEMA, **record}
        path = self.path(record["suite"], record["key"])
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n")
        return path

    def all(self) -> list[dict]:
        records = []
        if not self.records_dir.is_dir():
            return records
        for path in sorted(self.records_dir.glob("*/*.json")):
            try:
                records.append(json.loads(path.read_text()))
            except json.JSONDecodeError:
                continue
        return records

    def clean_temporaries(self) -> None:
        """Remove partial files a killed process left behind (they never replaced a record)."""
        if self.records_dir.is_dir():
            for tmp in self.records_dir.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
