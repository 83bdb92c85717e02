"""One JSON record per run under ``<out>/records/<suite>/``, written atomically; resume reads them back.

Records are gzip-compressed JSON (``<key>.json.gz``): with per-item predictions for validation and
test they are ~60 KB of text each, ~9 KB compressed, and a published matrix holds hundreds. Plain
``<key>.json`` files (earlier records) are read too.

A record's file name is the run's key (cell, seed and a hash of everything that decides its numbers),
so a rerun of the same command finds finished runs and skips them, and no run can appear twice.
Writes go to a temporary file in the same folder, are flushed to disk and renamed over the target:
a process killed at any moment leaves either the old complete file or the new complete file.
A temporary's name says who writes it (``.<name>~<host>~<pid namespace>~<pid>~<random>.tmp``), so a
starting worker removes only those whose writer is gone, never one that another worker is writing.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from bench.errors import BenchError

SCHEMA = 2  # 2: validation split (val_score, val_items, val_curve), per-part learning rates
# Record schemas this version reads. 1 (plain JSON, before the validation split): test scores only; its
# runs' keys differ from schema 2's (the training settings gained the split), so they are never resumed
# or tabled with a matrix, and the recommender says it ignores them; bench.rescore reads them.
READS = (1, 2)
DONE = ("ok", "diverged")  # outcomes a rerun would reproduce; "failed"/"oom" are retried


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ temporaries and their writers


def _pid_namespace() -> str:
    """Containers sharing a hostname (and a volume) each number their processes from 1: a pid only means
    something within its pid namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
PID_NS = _pid_namespace()
STALE_TMP_S = 3600.0  # a temporary untouched this long has no writer (other hosts', or from an older version)
PAUSE_ENV = "BENCH_TEST_PAUSE_IN_WRITE"  # test hook: seconds to sleep between the temporary's fsync and its rename
_TMP_NAME = re.compile(r"^\.(?P<name>.+)~(?P<host>[^~]*)~(?P<ns>\d*)~(?P<pid>\d+)~[^~]*\.tmp$")
_in_flight: set[str] = set()  # this process's temporaries being written now


def temp_prefix(name: str) -> str:
    """The start of a temporary's name for ``name``: who writes it (host, pid namespace, pid)."""
    return f".{name}~{HOST}~{PID_NS}~{os.getpid()}~"


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def writer_gone(tmp: Path, now: float | None = None) -> bool:
    """Whether nobody can still be writing the temporary ``tmp``: its writer was a process of this
    host (and pid namespace) that has exited (or whose pid now belongs to a younger process); any
    other temporary (another host's, or an older version's without a writer in its name) once it has
    been left untouched for STALE_TMP_S."""
    try:
        mtime = tmp.stat().st_mtime
    except FileNotFoundError:
        return False
    old = (now or time.time()) - mtime > STALE_TMP_S
    m = _TMP_NAME.match(tmp.name)
    if m is None or m["host"] != HOST or m["ns"] != PID_NS:
        return old
    pid = int(m["pid"])
    if pid == os.getpid():
        return str(tmp) not in _in_flight
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    started = _process_started(pid)
    return started is not None and started > mtime + 1.0  # the pid was reused after the writer died


# ------------------------------------------------------------------ disk full

DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file size limit"}


def current(record: dict | None) -> dict | None:
    """A record a matrix may resume or table: one of an earlier schema lacks what it chooses on (a
    validation score), so at the same key the run is made again and its new record replaces that one."""
    return record if record is not None and record.get("schema", SCHEMA) >= SCHEMA else None


class DiskFull(BenchError):
    """A write failed for lack of space: nothing was half-written, and the run is retried on the next start."""


def disk_full_reason(exc: BaseException | None) -> str | None:
    """Why ``exc`` (or an exception it was raised from) says the disk is full, or None. Libraries
    that write from native code (safetensors) report the errno only in their message: ``(os error 28)``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return DISK_FULL[exc.errno]
        m = re.search(r"os error (\d+)", str(exc))
        if m and int(m[1]) in DISK_FULL:
            return DISK_FULL[int(m[1])]
        exc = exc.__cause__ or exc.__context__
    return None


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def disk_full(folder: Path, needed: int | None, reason: str) -> DiskFull:
    """The one-line error: the folder, the space the write needed (when known), the space left, what to do."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{_size(shutil.disk_usage(probe).free)} free there"
    except OSError:
        free = "free space unknown"
    need = f"this write needs about {_size(needed)}; " if needed is not None else ""
    return DiskFull(f"cannot write to {folder}: {reason} ({need}{free}); free some "
                    f"space (or raise the quota, or the file size limit: ulimit -f) and run the same command again: finished runs are "
                    f"kept and the unfinished one is retried")


def _pause_in_write() -> None:
    """The soak tests' hook (bench/reliability/kill.py): a write that lasts, so a kill -9 can land inside it."""
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """mkstemp creates 0600 files; results are for sharing, so they get the usual 0666 & ~umask.
    A full disk (or quota, or file size limit) raises :class:`DiskFull` and leaves no temporary."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        _in_flight.add(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        _pause_in_write()
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = disk_full_reason(exc) if isinstance(exc, Exception) else None
        if reason:
            raise disk_full(path.parent, len(data), reason) from None
        raise
    finally:
        if tmp is not None:
            _in_flight.discard(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def assemble_sections(title: str, names: list[str], folder: Path) -> str:
    """A report made of section files ``<folder>/<name>.md`` (those present, in ``names``' order) under
    ``title``: benchmarks and soak runs rerun one section at a time (bench.perf, bench.reliability)."""
    parts = [title]
    for name in names:
        path = folder / f"{name}.md"
        if path.is_file():
            parts.append(path.read_text())
    return "\n".join(parts)


def read_record(path: Path) -> dict | None:
    """A record file (``.json.gz`` or ``.json``); None when it does not parse."""
    try:
        data = Path(path).read_bytes()
        return json.loads(gzip.decompress(data) if str(path).endswith(".gz") else data)
    except (OSError, EOFError, ValueError):
        return None  # cannot happen with atomic writes; treat a foreign broken file as absent


_SCHEMA_AT_START = re.compile(rb'^\{\s*"schema"\s*:\s*(\d+)\s*,')


def record_schema(path: Path) -> int | None | str:
    """A record file's schema, from its first bytes (records start with it): an int, None for a file that
    does not parse or is no record (no ``kind``), or ``"none"`` for a record without one."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as fh:
            head = fh.read(64)
    except (OSError, EOFError):
        return None
    m = _SCHEMA_AT_START.match(head)
    if m:
        return int(m[1])
    record = read_record(path)
    if not isinstance(record, dict) or "kind" not in record:
        return None
    schema = record.get("schema")
    return schema if isinstance(schema, int) and not isinstance(schema, bool) else "none"


def schema_error(path: Path, schema, where: str) -> BenchError:
    """Why this version cannot read a results folder, and what to do (``where``: the flag naming it)."""
    if isinstance(schema, int) and schema > SCHEMA:
        return BenchError(f"{path} has record schema {schema}, newer than this version of bench reads (schema "
                          f"{READS[0]}-{SCHEMA}); update bench (git pull) to use these results, or pass another {where}")
    what = "no record schema" if schema == "none" else f"record schema {schema}, which no version of bench wrote"
    return BenchError(f"{path} has {what} (this version reads schema {READS[0]}-{SCHEMA}); move it out of the "
                      f"results folder, or pass another {where}")


def check_schemas(records_dir: Path, where: str = "--out") -> dict[int, int]:
    """How many records of each schema ``records_dir`` (``<results>/records``) holds; a BenchError
    naming the first record this version cannot read (a newer schema, or none)."""
    counts: dict[int, int] = {}
    for path in record_files(records_dir):
        schema = record_schema(path)
        if schema is None:
            continue  # unreadable or not a record: ignored, as every reader does
        if schema not in READS:
            raise schema_error(path, schema, where)
        counts[schema] = counts.get(schema, 0) + 1
    return counts


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

    TEMPORARIES = (".*.tmp", "records/*/.*.tmp", ".paused/*/.*.tmp", "adapters/*/.*", "merged/*/.*")  # adapters/, merged/: temporary folders

    def clean_temporaries(self) -> int:
        """Remove partial files and adapter folders that killed processes left behind (they never replaced
        anything); a temporary whose writer may still be at work stays. Returns how many were removed."""
        now, removed = time.time(), 0
        for pattern in self.TEMPORARIES:
            for tmp in self.out.glob(pattern):
                if pattern.startswith(("adapters/", "merged/")) and not tmp.is_dir():
                    continue
                if writer_gone(tmp, now):
                    if tmp.is_dir() and not tmp.is_symlink():
                        shutil.rmtree(tmp, ignore_errors=True)
                    else:
                        tmp.unlink(missing_ok=True)
                    removed += 1
        return removed


# ------------------------------------------------------------------ the study's journal


def journal_backend(path: Path):
    """Optuna's journal file for local workers, whose every append starts on a line of its own.

    Optuna appends each batch of log lines under a lock. A worker killed (or out of disk) in the middle
    of an append leaves a line without its end; readers skip such a last line, but the next append
    went on from it, and the study could never be loaded again. Here each append, under the lock,
    first cuts such a torn tail: nobody else can be writing it (the lock is held), and no reader has
    applied it (it never ended)."""
    from optuna.storages.journal import JournalFileBackend

    class Journal(JournalFileBackend):
        def append_logs(self, logs: list[dict]) -> None:
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
            self._lock.acquire()
            try:
                _cut_torn_tail(Path(self._file_path))
                with open(self._file_path, "ab") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                self._lock.release()

    return Journal(str(path))


def _cut_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline; returns the bytes cut."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            chunk = fh.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        fh.truncate(end)
        fh.flush()
        os.fsync(fh.fileno())
        return size - end

