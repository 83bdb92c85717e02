"""Faults a worker meets in the field: declared dead by another worker, a full disk, a results folder
of another record schema. Each is injected into run_bench.py run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from bench.store import SCHEMA, read_record, record_files
from tests.conftest import ROOT

ONE_RUN = ["--suite", "shapes", "--preset", "smoke", "--limit", "24", "--targets", "qv", "--vision", "frozen"]


def _run(out, *args, prelude="", env=None, matrix=ONE_RUN):
    """run_bench.py in a fresh interpreter, after ``prelude`` (the fault's injection)."""
    code = prelude + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "run_bench.py"), *matrix, *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "400", **(env or {})})


def _trials(out):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)


# Another worker (its own storage handle) takes this one for dead, as a stalled heartbeat or a pid clash
# makes it do, and fails its trial while the run is training.
DECLARED_DEAD = """
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from bench import runner

real = runner.Session.run
def run(self, *args, **kwargs):
    storage = JournalStorage(JournalFileBackend(str(self.spec.out / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    other = optuna.load_study(study_name=summary.study_name, storage=storage)
    for t in other.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "run" in t.user_attrs and not t.user_attrs.get("retry_of") and t.number == 0:
            storage.set_trial_user_attr(t._trial_id, "stale", True)
            other.tell(t.number, state=TrialState.FAIL)
    return real(self, *args, **kwargs)
runner.Session.run = run
"""


@pytest.mark.parametrize("mode", [[], ["--search", "optuna", "--objectives", "score", "--trials", "1"]], ids=["matrix", "search"])
def test_worker_wrongly_declared_dead_keeps_its_result_and_goes_on(tmp_path, mode):
    """Defect 2: the healthy worker's final tell raised UpdateFinishedTrialError (and in a search its
    pruner report failed the run); its result must be kept, one line said, and the study completed."""
    out = tmp_path / "out"
    done = _run(out, *mode, prelude=DECLARED_DEAD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    said = [line for line in done.stdout.splitlines() if "another worker" in line]
    assert len(said) == 1 and "kept" in said[0], done.stdout[-3000:]
    cells = [r for r in map(read_record, record_files(out / "records")) if r["kind"] == "cell"]
    assert [r["status"] for r in cells] == ["ok"]
    trials = [t for t in _trials(out) if "run" in t.user_attrs]
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs.get("stale")
    # a retry (the search's; a race plans from the records) completes from the kept record without training again
    assert all(t.state.name == "COMPLETE" and t.user_attrs["executed"] is False for t in trials[1:])
    assert "ok" in (out / "results.csv").read_text()


# A file size limit (``ulimit -f``) makes every write past it fail with EFBIG, as a full disk fails with
# ENOSPC; SIGXFSZ, which would kill the process first, is ignored as shells and containers often do.
FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""

# The disk fills up just as the run's record is written (the base model's record still fits).
RECORD_ENOSPC = """
import errno, os
real = os.fsync
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if "/records/" in path and "/.base-" not in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = fsync
"""

BIG_ADAPTER = ["--suite", "shapes", "--preset", "smoke", "--limit", "24", "--targets", "all", "--vision", "resampler"]


def _leftovers(out):
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".write-test")]


@pytest.mark.parametrize("fault", ["adapter", "record"])
def test_disk_full_stops_in_one_line_and_the_run_is_retried(tmp_path, fault):
    """Defect 4: a full disk while saving the adapter recorded a finished run as "failed"; one while
    writing its record escaped as a traceback. Now: one line naming the folder and the space needed,
    exit 2, nothing half-written, the run neither failed nor done, and trained on the next start."""
    out = tmp_path / "out"
    if fault == "adapter":  # the adapter (~500 KB here) is the first file of --out past 64 KB this run writes (the
        # frozen encoder's cached outputs in /tmp are bigger: the cache gives up, and the run goes on without it)
        done = _run(out, prelude=FILE_SIZE_LIMIT.format(limit=64 * 1024), matrix=BIG_ADAPTER)
        folder, reason = out / "adapters" / "shapes", "file too large"
    else:
        done = _run(out, prelude=RECORD_ENOSPC, matrix=BIG_ADAPTER)
        folder, reason = out / "records" / "shapes", "no space left on device"
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: cannot write to {folder}: {reason}"), done.stderr
    assert "this write needs about " in done.stderr and " free there" in done.stderr
    assert "run the same command again" in done.stderr
    records = [read_record(p) for p in record_files(out / "records")]
    assert [r["kind"] for r in records] == ["base"]  # the run is not recorded: neither failed nor done
    assert not _leftovers(out)
    assert not [p for p in (out / "adapters").rglob("*") if p.is_dir() and p.parent.name == "shapes" and p.name.startswith(".")] \
        if (out / "adapters").exists() else True

    again = _run(out, matrix=BIG_ADAPTER)
    assert again.returncode == 0, again.stderr[-3000:]
    cells = [r for r in map(read_record, record_files(out / "records")) if r["kind"] == "cell"]
    assert [r["status"] for r in cells] == ["ok"]
    trials = [t for t in _trials(out) if "run" in t.user_attrs]
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs.get("stale")  # the first start's: left to a retry
    assert [t.user_attrs.get("executed") for t in trials[1:]] == [True]  # the second start trained it
    assert (out / "adapters" / "shapes" / cells[0]["key"] / "adapter_model.safetensors").is_file()
    assert not _leftovers(out)


def test_results_folder_of_another_schema_is_read_or_refused(tmp_path):
    """Records carry their schema: a folder of the previous one (1, before the validation split) is run
    into, its records kept untouched; one with records this version cannot read is refused in one line
    before anything loads or is written."""
    from bench.store import encode_record
    from tests.test_store import _schema_1_folder

    out = tmp_path / "old"
    old = _schema_1_folder(out)
    before = {p: p.read_bytes() for p in (out / "records").rglob("*.json")}
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "holds 2 record(s) of an earlier record schema" in done.stdout
    assert {p: p.read_bytes() for p in (out / "records").rglob("*.json")} == before
    assert len((out / "results.csv").read_text().splitlines()) == 3  # header, base, the one run: not the old ones
    assert {r["key"] for r in map(read_record, record_files(out / "records"))} >= {r["key"] for r in old}

    newer = tmp_path / "newer"
    path = newer / "records" / "shapes" / "k.json.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(encode_record({"schema": SCHEMA + 1, "key": "k", "suite": "shapes", "kind": "cell", "status": "ok"}))
    done = _run(newer)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr == (f"error: {path} has record schema {SCHEMA + 1}, newer than this version of bench reads (schema 1-{SCHEMA}); "
                           "update bench (git pull) to use these results, or pass another --out\n")
    assert [p for p in newer.rglob("*") if p.is_file()] == [path]  # nothing written


@pytest.mark.soak
def test_kill_9_soak_short(tmp_path):
    """The kill soak of bench/reliability/kill.py, short: 3 kills of one of two workers on a 6-run matrix
    (one aimed inside a record's write); nothing lost, nothing duplicated, every file parses."""
    from bench.reliability.kill import run_soak

    matrix = ["--suite", "shapes", "--preset", "smoke", "--limit", "24", "--protocol", "exhaustive", "--targets", "qv",
              "--vision", "frozen,resampler", "--seeds", "0,1,2"]
    result = run_soak(tmp_path / "out", kills=3, seed=1, pause_s=1.0, matrix=matrix, timeout_s=900)
    assert len(result.kills) == 3 and not result.finished_early
    assert [k.aimed for k in result.kills].count("record") == 1  # one waited for a record's write
    assert result.runs == 6 and result.lost == [] and result.duplicated == []
    assert result.unparsed == [] and result.temporaries == [] and result.files > 6
    assert result.exit_codes == [0, 0]


def test_a_kill_while_an_adapter_folder_is_replaced_leaves_no_half_folder(tmp_path, monkeypatch):
    """--save-adapters best deletes the previous best's folder file by file; a kill in the middle left a
    folder without its config or weights among the kept adapters. Deleted folders are first renamed to
    a temporary (its writer in the name), which the next start removes."""
    from pathlib import Path

    from bench import adapters
    from bench.store import Store

    class Model:
        def save_pretrained(self, path):
            (Path(path) / "adapter_config.json").write_text("{}")
            (Path(path) / "adapter_model.safetensors").write_bytes(b"weights")

        def parameters(self):
            return iter(())

    def record(key, val):
        return {"key": key, "suite": "s", "status": "ok", "val_score": val}

    first = adapters.keep(Model(), record("a", 0.5), tmp_path, "best")
    real = adapters.shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process is gone
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
        if files:
            files[0].unlink()
            raise KeyboardInterrupt("kill -9")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(adapters.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        adapters.keep(Model(), record("b", 0.9), tmp_path, "best")
    monkeypatch.setattr(adapters.shutil, "rmtree", real)
    kept = [p for p in (tmp_path / "adapters" / "s").iterdir() if not p.name.startswith(".")]
    for folder in kept:
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "run.json"}, folder
    assert [p.name for p in kept] == ["b"] and not first.exists()
    Store(tmp_path).clean_temporaries()  # the next start
    assert [p.name for p in (tmp_path / "adapters" / "s").iterdir()] == ["b"]


# The generated data cache lies outside --out (BENCH_CACHE_DIR): a full disk there while a suite is
# generated is the same one line, and the cache keeps no half-made folder.
CACHE_FULL = """
import errno, os
import bench.suite_data as sd
def full(folder, *a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "test.jsonl"))
sd._write_split = full
"""


def test_disk_full_in_the_data_cache_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    result = _run(tmp_path / "out", prelude=CACHE_FULL, env={"BENCH_CACHE_DIR": str(cache)})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: cannot write to ") and "no space left" in lines[0].lower(), lines[0]
    assert not [p for p in cache.rglob("*") if p.is_dir() and p.name.startswith(".")]  # no half-made folder
