import json
import os

import pytest

from bench.store import SCHEMA, Store, atomic_write_text, read_record


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "r.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_text(path, "old")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_store_round_trip_and_done_status(tmp_path):
    store = Store(tmp_path)
    store.put({"key": "qv-s0-abc", "suite": "docvqa", "status": "ok", "score": 0.5})
    store.put({"key": "qk-s0-abc", "suite": "docvqa", "status": "failed", "score": None})
    store.put({"key": "qkv-s0-abc", "suite": "docvqa", "status": "diverged", "score": None})
    assert store.is_done("docvqa", "qv-s0-abc")
    assert not store.is_done("docvqa", "qk-s0-abc")  # failures are retried
    assert store.is_done("docvqa", "qkv-s0-abc")  # divergence is deterministic: not retried
    assert not store.is_done("docvqa", "missing")
    assert {r["key"] for r in store.all()} == {"qv-s0-abc", "qk-s0-abc", "qkv-s0-abc"}
    assert read_record(store.path("docvqa", "qv-s0-abc"))["schema"] == SCHEMA


def test_records_are_compressed_deterministic_and_old_plain_files_still_read(tmp_path):
    store = Store(tmp_path)
    record = {"key": "k", "suite": "s", "status": "ok", "items": [{"id": f"t{i}", "prediction": "12", "score": 1.0} for i in range(500)]}
    first = store.put(record).read_bytes()
    assert store.put(record).read_bytes() == first  # no timestamp in the gzip header
    assert len(first) < len(json.dumps(record)) / 5
    legacy = store.records_dir / "s" / "old.json"
    legacy.write_text(json.dumps({"key": "old", "suite": "s", "status": "ok", "schema": 1}))
    assert store.is_done("s", "old") and {r["key"] for r in store.all()} == {"k", "old"}
    store.put({"key": "old", "suite": "s", "status": "ok"})  # rewritten: the plain file gives way to the compressed one
    assert not legacy.exists() and store.get("s", "old")["schema"] == SCHEMA


def test_leftover_temporaries_are_ignored_and_cleaned(tmp_path):
    store = Store(tmp_path)
    store.put({"key": "k", "suite": "s", "status": "ok"})
    partial = store.records_dir / "s" / ".k2.json.abc.tmp"
    partial.write_text('{"key": "k2", "sui')
    assert [r["key"] for r in store.all()] == ["k"]
    store.clean_temporaries()
    assert not partial.exists()


def test_written_files_are_readable_by_others(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "results.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.md").stat().st_mode) == 0o644
