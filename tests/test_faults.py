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


def _run(out, *args, prelude="", env=None):
    """run_bench.py in a fresh interpreter, after ``prelude`` (the fault's injection)."""
    code = prelude + "\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "run_bench.py"), *ONE_RUN, *args, "--out", str(out)],
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
