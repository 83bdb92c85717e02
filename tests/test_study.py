"""Several worker processes on one study: every run exactly once, and a killed worker's run is retried."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

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


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The same matrix run by one process: what the workers' tables must equal."""
    out = tmp_path_factory.mktemp("one-worker") / "out"
    first = _start(out)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-2000:]
    return out


@pytest.mark.parametrize("workers", [2, 4])
def test_local_workers_share_one_study(tmp_path, workers, one_worker):
    """Workers on one --out: every run once, and the tables one process writes for the same matrix
    (every row and every computed figure; timings and memory are measured, so they differ)."""
    from bench.reliability.tables import differences

    out = tmp_path / "out"
    procs = [_start(out) for _ in range(workers)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    _check_complete(out, 4)
    assert differences(one_worker, out, measured=False) == []


def test_table_comparison_can_fail(tmp_path, one_worker):
    """The comparison above sees a changed score, a missing row, a changed verdict; it ignores timings
    only when told to, and the command line always."""
    import shutil

    from bench.reliability.tables import differences

    def variant(name, edit_csv=None, edit_md=None):
        folder = tmp_path / name
        shutil.copytree(one_worker, folder)
        for file, edit in (("results.csv", edit_csv), ("results.md", edit_md)):
            if edit:
                (folder / file).write_text(edit((folder / file).read_text()))
        return folder

    csv_lines = (one_worker / "results.csv").read_text().splitlines()
    header = csv_lines[0].split(",")
    score, peak = header.index("score"), header.index("peak_mem_mib")

    def set_field(col, value):
        def edit(text):
            lines = text.splitlines()
            row = lines[-1].split(",")
            row[col] = value
            return "\n".join([*lines[:-1], ",".join(row)]) + "\n"
        return edit

    assert differences(one_worker, variant("same")) == []
    shuffled = variant("shuffled", edit_csv=lambda t: "\n".join([t.splitlines()[0], *reversed(t.splitlines()[1:])]) + "\n",
                       edit_md=lambda t: t.replace("Command: `", "Command: `python other.py "))
    assert differences(one_worker, shuffled) == [], "row order and the command line do not matter"
    changed_score = variant("score", edit_csv=set_field(score, "0.123"))
    assert differences(one_worker, changed_score, measured=False)
    dropped_row = variant("row", edit_csv=lambda t: "\n".join(t.splitlines()[:-1]) + "\n")
    assert differences(one_worker, dropped_row, measured=False)
    verdict = variant("verdict", edit_md=lambda t: t.replace("not shown different", "better", 1))
    assert "not shown different" in (one_worker / "results.md").read_text()
    assert any(d.startswith("results.md") for d in differences(one_worker, verdict, measured=False))
    memory = variant("memory", edit_csv=set_field(peak, "1.0"),
                     edit_md=lambda t: re.sub(r"memory [\d.]+ MiB", "memory 1 MiB", t, count=1))
    assert differences(one_worker, memory, measured=False) == []
    assert len(differences(one_worker, memory)) == 2


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


def _server(factory):
    """A throwaway database server from bench/reliability/servers.py (what .ci/run installs); skipped, with
    the reason, where none can start."""
    from bench.reliability import servers

    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(factory())
        except servers.Unavailable as exc:
            pytest.skip(str(exc))
        yield url


@pytest.fixture(scope="module")
def postgres_url():
    from bench.reliability import servers

    yield from _server(servers.postgres)


@pytest.fixture(scope="module")
def mariadb_url():
    """MariaDB, whose attribute column is TEXT (64 KiB): the limit every record used to meet."""
    from bench.reliability import servers

    yield from _server(servers.mariadb)


def _machines(tmp_path, url, n, args):
    """``n`` 'machines' (separate output folders) on one database study, as the README runs them."""
    from bench.reliability.workers import run_workers

    outcome = run_workers(url, tmp_path, n, args, timeout=900)
    assert outcome.returncodes == [0] * n, outcome.errors
    assert outcome.executed and not outcome.twice and not outcome.told_twice, "every run executed and told once"
    assert set(outcome.per_worker) <= set(outcome.pids) and sum(outcome.per_worker.values()) == len(outcome.executed)
    assert not outcome.missing_records and len({tuple(k) for k in outcome.record_keys}) == 1, "every record in every folder"
    assert not outcome.table_differences, outcome.table_differences
    assert not outcome.secrets, f"the password leaked into {outcome.secrets}"
    return outcome


def test_two_workers_on_postgresql(tmp_path, postgres_url):
    """Two 'machines' (separate output folders) on one PostgreSQL study: each run once, same tables."""
    outcome = _machines(tmp_path, postgres_url, 2, SMOKE)
    assert len(outcome.executed) == 4


def test_two_workers_on_mysql_with_realistic_records(tmp_path, mariadb_url):
    """MySQL keeps an attribute in a TEXT column (64 KiB), and a record with its per-item predictions is
    larger: 1000 test items here, as a real suite has. Every record must still travel, whole."""
    from bench.reliability.workers import TEXT_LIMIT
    from bench.store import Store

    outcome = _machines(tmp_path, mariadb_url, 2, ["--suite", "shapes", "--preset", "smoke", "--targets", "qv",
                                                   "--test-items", "1000", "--val-items", "200"])
    assert len(outcome.executed) == 2
    assert outcome.largest_record > TEXT_LIMIT and outcome.largest_attr <= TEXT_LIMIT
    for folder in ("machine-1", "machine-2"):
        cells = [r for r in Store(tmp_path / folder).all("shapes") if r["kind"] == "cell"]
        assert len(cells) == 2 and all(len(r["items"]) == 1000 and "prediction" in r["items"][0] for r in cells)


@pytest.mark.soak
@pytest.mark.parametrize("backend", ["postgres_url", "mariadb_url"])
def test_four_workers_soak(tmp_path, backend, request):
    """The short version of `python -m bench.reliability --only workers`: 4 workers, the raced matrix."""
    from bench.reliability.workers import MATRIX

    outcome = _machines(tmp_path, request.getfixturevalue(backend), 4, MATRIX)
    assert len(outcome.per_worker) >= 2, "the work was shared"


def _published_record():
    """A published record of realistic size: 1000 test and 500 validation items with their predictions."""
    import json

    path = ROOT / "results" / "shapes-shift" / "records" / "shapes-shift" / "qk-r8-a16-frozen-s0-7031ea0e1d.json.gz"
    record = read_record(path)
    assert len(record["items"]) >= 1000 and "prediction" in record["items"][0]
    assert len(json.dumps(record)) > 65536
    return record


def _check_payloads(storage):
    """Records (a published one, and an incompressible one that needs several pieces) stored on a trial
    and on the study read back equal from a new connection; no attribute over MySQL's TEXT (64 KiB); a
    record stored whole, as before, still reads."""
    import json
    import random

    import optuna

    from bench import study as study_mod

    published = _published_record()
    rng = random.Random(0)
    noisy = {**published, "items": [{"id": f"test-{i:06d}", "prediction": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=60)),
                                     "score": rng.random()} for i in range(3000)]}
    study = optuna.create_study(study_name="payloads", storage=storage, directions=["maximize"])
    for record in (published, noisy):
        trial = study.ask()
        study_mod.put_payload(trial.set_user_attr, "record", record)
        study.tell(trial, 1.0)
    study_mod.put_payload(study.set_user_attr, "base:shapes-shift:base-x", published)
    old = study.ask()
    old.set_user_attr("record", json.dumps({"key": "old", "score": 0.5}))  # an earlier version's whole record
    study.tell(old, 0.5)

    again = optuna.load_study(study_name="payloads", storage=storage)
    trials = again.get_trials(deepcopy=False)
    assert study_mod.trial_record(trials[0]) == published and study_mod.trial_record(trials[1]) == noisy
    assert trials[1].user_attrs["record"]["pieces"] >= 2
    assert study_mod.trial_record(trials[2]) == {"key": "old", "score": 0.5}
    assert study_mod.get_payload(again.user_attrs, "base:shapes-shift:base-x") == published
    sizes = [len(json.dumps(v).encode()) for a in (again.user_attrs, *(t.user_attrs for t in trials)) for v in a.values()]
    assert max(sizes) < 65535
    return trials


def test_records_travel_in_bounded_pieces(tmp_path):
    """On the default journal storage: the pieces round-trip, and a damaged one is one clear error."""
    from types import SimpleNamespace

    from bench import study as study_mod
    from bench.errors import BenchError

    trials = _check_payloads(study_mod.make_storage(SimpleNamespace(storage=None, out=str(tmp_path))))
    attrs = dict(trials[1].user_attrs)
    piece = next(k for k in attrs if k.startswith("record#") and k.endswith(":1"))
    for broken in ({k: v for k, v in attrs.items() if k != piece}, {**attrs, piece: attrs[piece][:-4] + "AAAA"}):
        with pytest.raises(BenchError, match="attribute 'record' cannot be read"):
            study_mod.get_payload(broken, "record")


def test_tell_bounds_every_attribute(tmp_path):
    """What a worker attaches to a finished trial (bench.study.Worker._tell) fits MySQL's TEXT: the record in
    pieces, a failed run's reason cut (the record keeps it whole)."""
    import json
    from types import SimpleNamespace

    import optuna

    from bench import study as study_mod

    worker = object.__new__(study_mod.Worker)
    worker.session = SimpleNamespace(executed=True)
    worker.spec = SimpleNamespace(memory_budget_mib=None, objectives=("score",))
    worker.study = optuna.create_study(storage=study_mod.make_storage(SimpleNamespace(storage=None, out=str(tmp_path))))
    failed = {**_published_record(), "status": "failed", "error": "ValueError: " + "x" * 100_000}
    worker._tell(worker.study.ask(), failed)
    (trial,) = worker.study.get_trials(deepcopy=False)
    assert trial.state.name == "FAIL" and study_mod.trial_record(trial) == failed
    assert max(len(json.dumps(v).encode()) for v in trial.user_attrs.values()) < 65535


def test_records_travel_through_mysql(mariadb_url):
    """The same on a real MariaDB server, through the plain mysql:// URL the README gives."""
    from bench.reliability.workers import storage

    _check_payloads(storage(mariadb_url))


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
    assert "variant" not in trials[0].params  # plain LoRA only: no variant parameter

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
