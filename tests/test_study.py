"""Several worker processes on one study: every run exactly once, and a killed worker's run is retried."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.store import read_record, record_files
from tests.conftest import ROOT

SMOKE = ["--suite", "shapes", "--preset", "smoke", "--limit", "24"]


def _trials(out):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:  # the journal file exists before the study is written into it
        return []
    (summary,) = summaries
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)


def _start(out, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "run_bench.py"), *SMOKE, "--out", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def _check_complete(out, n_runs):
    trials = [t for t in _trials(out) if "run" in t.user_attrs]
    runs = {t.user_attrs["run"] for t in trials}
    assert len(runs) == n_runs
    executed = [t.user_attrs["run"] for t in trials if t.user_attrs.get("executed")]
    assert sorted(executed) == sorted(runs), "every run executed exactly once"
    assert {t.user_attrs["run"] for t in trials if t.state.name == "COMPLETE"} == runs, "no holes"
    records = record_files(out / "records" / "shapes", "")
    assert len(records) == n_runs + 1  # + the base model
    for path in records:
        assert read_record(path) is not None
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == n_runs + 2  # header + base + runs
    return csv


@pytest.mark.parametrize("workers", [2, 4])
def test_local_workers_share_one_study(tmp_path, workers):
    out = tmp_path / "out"
    procs = [_start(out) for _ in range(workers)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    tables = {(out / "results.md").read_text()}
    csv = _check_complete(out, 4)
    assert tables and csv


def test_killed_worker_run_is_retried(tmp_path):
    out = tmp_path / "out"
    extra = ["--targets", "qv", "--vision", "frozen,resampler", "--steps", "400"]
    first = _start(out, *extra)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until a trial is training
        time.sleep(1)
        if (out / "study.journal").exists() and any(t.state.name == "RUNNING" and "run" in t.user_attrs for t in _trials(out)):
            time.sleep(3)
            break
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = [t for t in _trials(out) if t.state.name == "RUNNING"]
    assert killed, "the worker was killed mid-run"
    second = _start(out, *extra)
    _, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-2000:]
    trials = _trials(out)
    assert trials[killed[0].number].state.name == "FAIL" and trials[killed[0].number].user_attrs.get("stale")
    _check_complete(out, 2)
    assert not list((out / "records").glob("*/.*.tmp"))


def _pg_bin(name):
    import glob
    import shutil

    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    return found


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (what .ci/run installs); skipped where none can start."""
    import pwd
    import socket

    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine; .ci/run installs them")
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))  # not under pytest's 0700 folder: the server user reads it
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            user = pwd.getpwnam("nobody")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", user.pw_name, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)  # noqa: E731
    made = run(initdb, "-D", str(data), "-A", "trust", "-U", "bench", "--no-sync")
    if made.returncode != 0:
        pytest.skip(f"initdb failed: {made.stderr.strip().splitlines()[-1] if made.stderr.strip() else made.returncode}")
    started = run(pg_ctl, "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                  f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {started.stderr.strip() or started.stdout.strip()}")
    yield f"postgresql://bench:s3cret-pw@127.0.0.1:{port}/postgres"
    run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
    shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql(tmp_path, postgres_url):
    """Two 'machines' (separate output folders) on one PostgreSQL study: each run once, same tables."""
    import optuna

    a, b = tmp_path / "a", tmp_path / "b"
    first = _start(a, "--storage", postgres_url)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        time.sleep(1)
        if optuna.get_all_study_summaries(postgres_url):
            break
    second = _start(b, "--storage", postgres_url, "--worker")
    outs = [p.communicate(timeout=900) for p in (first, second)]
    for p, (out, err) in zip((first, second), outs):
        assert p.returncode == 0, err[-2000:]
        assert "s3cret-pw" not in out + err
    (summary,) = optuna.get_all_study_summaries(postgres_url)
    trials = [t for t in optuna.load_study(study_name=summary.study_name, storage=postgres_url).trials if "run" in t.user_attrs]
    executed = [t.user_attrs["run"] for t in trials if t.user_attrs.get("executed")]
    assert len(executed) == len(set(executed)) == 4
    assert {t.user_attrs["worker"]["pid"] for t in trials if t.user_attrs.get("executed")} <= {first.pid, second.pid}
    assert (a / "results.csv").read_text() == (b / "results.csv").read_text()
    for folder in (a, b):
        assert not any("s3cret-pw" in p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file())


def test_search_respects_budgets_and_constraints(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "search"
    done = run_cli(*SMOKE, "--search", "optuna", "--trials", "3", "--memory-budget", "1MiB", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "results.md").read_text()
    assert "## Search (Optuna)" in text and "Trials: 3;" in text
    assert "No feasible trial" in text  # 1 MiB: every trial is infeasible, none is recommended
    assert (out / "pareto.png").stat().st_size > 1000
    trials = [t for t in _trials(out) if "run" in t.user_attrs]
    assert len(trials) == 3 and all(t.constraints["memory"] > 0 for t in trials)
    assert {"lr", "alpha_ratio", "lora_dropout", "targets", "vision"} <= set(trials[0].params)

    single = tmp_path / "single"
    done = run_cli(*SMOKE, "--search", "optuna", "--objectives", "score", "--trials", "50", "--step-budget", "20",
                   "--steps", "8", "--out", str(single))
    assert done.returncode == 0, done.stderr[-2000:]
    trials = [t for t in _trials(single) if "run" in t.user_attrs]
    used = sum(t.user_attrs["steps_trained"] for t in trials)
    assert used <= 20 and len(trials) >= 2
    for t in trials:
        assert t.state.name in ("COMPLETE", "PRUNED")
        assert t.state.name == "COMPLETE" or t.user_attrs["steps_trained"] < 8


def test_unreachable_storage_is_one_line_without_the_password(tmp_path):
    from tests.conftest import run_cli

    out = tmp_path / "out"
    done = run_cli(*SMOKE, "--storage", "postgresql://u:topsecret@127.0.0.1:1/x", "--out", str(out))
    assert done.returncode == 2 and done.stderr.startswith("error: cannot open --storage")
    assert done.stderr.count("\n") == 1 and "topsecret" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
