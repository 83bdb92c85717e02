"""optuna-dashboard reads a results folder's study: `optuna-dashboard <out>/study.journal`."""

import io
import json
from wsgiref.util import setup_testing_defaults

import pytest

from conftest import run_cli

dashboard = pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")


def _get(app, path: str) -> dict:
    environ = {}
    setup_testing_defaults(environ)
    environ.update({"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.errors": io.StringIO()})
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def test_the_dashboard_reads_the_study_journal_of_a_run(tmp_path):
    out = tmp_path / "out"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler",
                     "--save-adapters", "none", "--control", "none", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    # the dashboard's own storage guess for a plain path, as its command line does
    app = dashboard.wsgi(str(out / "study.journal"))
    (study,) = _get(app, "/api/studies")["study_summaries"]
    assert study["directions"] == ["maximize", "minimize", "maximize"]  # score, memory, throughput
    detail = _get(app, f"/api/studies/{study['study_id']}")
    done = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(done) == 2  # one run per cell: the dashboard shows their validation scores and params
    visions = {p["param_external_value"] for t in done for p in t["params"] if p["name"] == "vision"}
    assert visions == {"frozen", "resampler"}
    assert all(len(t["values"]) == 3 and 0.0 <= t["values"][0] <= 1.0 for t in done)
