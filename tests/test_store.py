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


def _dead_pid():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftover_temporaries_are_ignored_and_cleaned(tmp_path):
    """Removed: a dead writer's of this host, and (once untouched for an hour) another host's or an older
    version's without a writer in the name; kept: a live writer's, and recent ones of other hosts."""
    import time

    from bench.store import HOST, PID_NS, STALE_TMP_S

    store = Store(tmp_path)
    store.put({"key": "k", "suite": "s", "status": "ok"})
    folder = store.records_dir / "s"
    names = {
        "dead": f".k2.json.gz~{HOST}~{PID_NS}~{_dead_pid()}~abc.tmp",
        "alive": f".k3.json.gz~{HOST}~{PID_NS}~1~abc.tmp",  # pid 1 lives as long as the machine (or container)
        "other host, recent": f".k4.json.gz~not-{HOST}~{PID_NS}~{_dead_pid()}~abc.tmp",
        "other host, old": f".k5.json.gz~not-{HOST}~{PID_NS}~{_dead_pid()}~abc.tmp",
        "other pid namespace, recent": f".k6.json.gz~{HOST}~1{PID_NS}~{_dead_pid()}~abc.tmp",
        "older version, recent": ".k7.json.abc.tmp",
        "older version, old": ".k8.json.abc.tmp",
    }
    for what, name in names.items():
        (folder / name).write_text('{"key": "k2", "sui')
        if what.endswith(", old"):
            then = time.time() - STALE_TMP_S - 60
            os.utime(folder / name, (then, then))
    paused = store.paused_path("s", "k9").parent / f".k9.pt~{HOST}~{PID_NS}~{_dead_pid()}~abc.tmp"
    adapter = store.out / "adapters" / "s" / f".k9~{HOST}~{PID_NS}~{_dead_pid()}~abc.tmp"
    for path in (paused, adapter / "adapter_model.safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    assert [r["key"] for r in store.all()] == ["k"]
    assert store.clean_temporaries() == 5
    left = {what for what, name in names.items() if (folder / name).exists()}
    assert left == {"alive", "other host, recent", "other pid namespace, recent", "older version, recent"}
    assert not paused.exists() and not adapter.exists()


def test_written_files_are_readable_by_others(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "results.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.md").stat().st_mode) == 0o644


def _writer(path, seconds):
    """Another process writing ``path`` through atomic_write_bytes, pausing between its temporary and the rename."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "import os, sys, time\n"
        "real = os.replace\n"
        f"os.replace = lambda a, b: (time.sleep({seconds}), real(a, b))[1]\n"
        "from bench.store import atomic_write_bytes\n"
        "atomic_write_bytes(sys.argv[1], b'{\"key\": \"k\"}')\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def test_clean_up_at_start_spares_a_writer_in_progress(tmp_path):
    """Defect 1: a starting worker's clean-up deleted the in-flight temporary of a running writer."""
    import time

    store = Store(tmp_path)
    target = store.records_dir / "s" / "k.json"
    target.parent.mkdir(parents=True)
    writer = _writer(target, 3)
    deadline = time.time() + 60
    while not list(target.parent.glob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.02)
    assert list(target.parent.glob(".*.tmp")), "the writer made its temporary"
    store.clean_temporaries()  # a worker starting while the other one writes
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err[-2000:]
    assert json.loads(target.read_text()) == {"key": "k"}
    assert not list(target.parent.glob(".*.tmp"))


def test_a_full_disk_is_one_clear_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    import errno

    from bench.errors import BenchError
    from bench.store import DiskFull, disk_full_reason

    path = tmp_path / "records" / "s" / "r.json.gz"
    atomic_write_text(path, "old")

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as caught:
        atomic_write_text(path, "x" * 3000)
    assert isinstance(caught.value, BenchError) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"cannot write to {path.parent}: no space left on device (this write needs about 2.9 KiB; ")
    assert path.read_text() == "old" and [p.name for p in path.parent.iterdir()] == ["r.json.gz"]
    # native writers (safetensors) give the errno in their message only
    assert disk_full_reason(RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")) == "disk quota exceeded"
    assert disk_full_reason(OSError(errno.EACCES, "Permission denied")) is None


def _schema_1_folder(out):
    """Records as the first version wrote them: plain indented JSON, schema 1, no validation split."""
    common = {"schema": 1, "suite": "shapes", "metric": "vqa_accuracy", "model": "tiny-minicpmv", "data": "shapes-0123456789",
              "machine": {"device": "cpu"}, "versions": {"torch": "2.4.0"}}
    items = [{"id": f"t{i}", "question": "q", "prediction": "red", "answers": ["red"], "score": 1.0} for i in range(48)]
    base = {**common, "key": "base-0123456789", "kind": "base", "status": "ok", "error": None, "cell": None, "seed": None,
            "score": 1.0, "trainable_params": 0, "total_params": 1000, "items": items, "finished_at": "2026-11-01T00:00:00+00:00"}
    cell = {**common, "key": "qv-r4-a8-frozen-s0-0123456789", "kind": "cell", "status": "ok", "error": None,
            "cell": {"targets": "qv", "rank": 4, "alpha": 8, "vision": "frozen"}, "seed": 0,
            "train": {"steps": 6, "batch_size": 8, "lr": 0.002, "lora_dropout": 0.05, "warmup_steps": 1, "weight_decay": 0.0,
                      "max_grad_norm": 1.0, "train_items": 128, "test_items": 48},
            "score": 1.0, "trainable_params": 100, "total_params": 1100, "peak_mem_mib": 500.0, "train_samples_per_s": 10.0,
            "losses": [1.0, 0.5], "items": items, "wall_s": 3.0, "finished_at": "2026-11-01T00:00:01+00:00"}
    folder = out / "records" / "shapes"
    folder.mkdir(parents=True)
    for record in (base, cell):
        (folder / f"{record['key']}.json").write_text(json.dumps(record, indent=1) + "\n")
    return [base, cell]


def test_a_results_folder_of_the_previous_schema_is_read(tmp_path):
    from bench.recommend import find_records
    from bench.store import check_schemas

    old = _schema_1_folder(tmp_path)
    store = Store(tmp_path)
    assert check_schemas(store.records_dir) == {1: 2}
    assert sorted(r["key"] for r in store.all()) == sorted(r["key"] for r in old)
    assert store.is_done("shapes", old[1]["key"]) and store.get("shapes", old[1]["key"]) == old[1]
    assert sorted(r["key"] for r in find_records([tmp_path])) == sorted(r["key"] for r in old)
    store.put({"key": "k", "suite": "shapes", "kind": "cell", "status": "ok"})  # a new run next to them
    assert check_schemas(store.records_dir) == {1: 2, SCHEMA: 1}


@pytest.mark.parametrize("schema", [SCHEMA + 1, None, 0])
def test_records_this_version_cannot_read_are_refused_in_one_line(tmp_path, schema):
    from bench.errors import BenchError
    from bench.recommend import find_records
    from bench.store import check_schemas, encode_record

    record = {"key": "k", "suite": "shapes", "kind": "cell", "status": "ok", "val_score": 0.5, "new_field": [1, 2]}
    if schema is not None:
        record = {"schema": schema, **record}
    path = tmp_path / "records" / "shapes" / "k.json.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_record(record))
    for call, flag in ((lambda: check_schemas(tmp_path / "records"), "--out"), (lambda: find_records([tmp_path]), "--results")):
        with pytest.raises(BenchError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"{path} has ") and message.endswith(f"or pass another {flag}")
        assert (f"record schema {schema}, newer than this version" in message) if schema else ("reads schema 1-2" in message)


def test_a_torn_journal_line_does_not_break_the_study(tmp_path):
    """A worker killed (or out of disk) in the middle of an append leaves a line without its end; the
    next append went on from there, and the study could never be loaded again (JSONDecodeError)."""
    from types import SimpleNamespace

    import optuna

    from bench.study import make_storage

    spec = SimpleNamespace(storage=None, out=tmp_path)
    study = optuna.create_study(study_name="s", storage=make_storage(spec))
    study.enqueue_trial({"x": 1})
    with open(tmp_path / "study.journal", "ab") as fh:  # the append a kill cut short
        fh.write(b'{"op_code":4,"worker_id":"killed","study_id":0,"datetime_st')
    again = optuna.load_study(study_name="s", storage=make_storage(spec))  # another worker goes on
    again.enqueue_trial({"x": 2})
    again.enqueue_trial({"x": 3})
    reread = optuna.load_study(study_name="s", storage=make_storage(spec))
    assert [t.system_attrs["fixed_params"]["x"] for t in reread.get_trials(deepcopy=False)] == [1, 2, 3]
    assert (tmp_path / "study.journal").read_bytes().endswith(b"}\n")



def test_a_record_of_an_earlier_schema_is_not_resumed():
    """At the same key as a run of this matrix, a schema-1 record (no validation score) is made again:
    handing it back as done crashed the race on its missing val_score."""
    from bench.store import SCHEMA, current

    assert current({"schema": 1, "key": "k", "status": "ok"}) is None and current(None) is None
    assert current({"schema": SCHEMA, "key": "k"}) == {"schema": SCHEMA, "key": "k"}
