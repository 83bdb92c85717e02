"""Dataset ids through to predictions files in each dataset's submission format."""

import json
from pathlib import Path

import pytest

from bench import submission
from bench.store import read_record, record_files
from bench.suite_data import cache_root, read_split
from tests.conftest import run_cli
from tests.test_loaders import REAL_DOCVQA, _prepare, chartqa_fixture, docvqa_fixture, parquet_fixture, textvqa_fixture

ITEMS = [{"id": "test-000000", "prediction": "12", "score": 1.0}, {"id": "test-000001", "prediction": "no", "score": 0.0}]


def test_the_file_kind_comes_from_the_dataset_ids_else_from_the_suite_format():
    assert submission.kind([{**ITEMS[0], "source_id": {"questionId": 7}}]) == "docvqa"
    assert submission.kind([{**ITEMS[0], "source_id": {"question_id": 7}}], ("docvqa-json",)) == "textvqa"
    assert submission.kind([{**ITEMS[0], "source_id": {"imgname": "a.png", "query": "q"}}]) == "chartqa"
    assert submission.kind(ITEMS, ("chartqa-json", "parquet")) == "chartqa"
    assert submission.kind(ITEMS) == "plain"


def test_entries_use_the_dataset_ids_and_fall_back_to_the_item_ids():
    items = [{**ITEMS[0], "source_id": {"questionId": 49153}}, ITEMS[1]]
    assert submission.entries(items, "docvqa") == [{"questionId": 49153, "answer": "12"}, {"questionId": "test-000001", "answer": "no"}]
    assert submission.entries(ITEMS, "textvqa")[1] == {"question_id": "test-000001", "answer": "no"}
    chart = submission.entries(ITEMS, "chartqa", {"test-000000": "How many bars?"})
    assert chart[0] == {"imgname": "test-000000", "query": "How many bars?", "prediction": "12"}
    assert submission.entries(ITEMS, "plain")[0] == {"id": "test-000000", "answer": "12"}
    assert json.loads(submission.dumps(submission.entries(ITEMS, "docvqa"))) == submission.entries(ITEMS, "docvqa")


@pytest.mark.parametrize("suite, fixture, key", [
    ("docvqa", docvqa_fixture, "questionId"), ("textvqa", textvqa_fixture, "question_id"),
    ("chartqa", chartqa_fixture, "imgname"), ("docvqa", parquet_fixture, "questionId")])
def test_prepared_rows_keep_the_dataset_ids(tmp_path, suite, fixture, key):
    folder = _prepare(suite, fixture(tmp_path / "data"))
    rows = [r for split in ("train", "val", "test") for r in read_split(folder, split)]
    assert all(r.source_id and key in r.source_id for r in rows)
    assert len({json.dumps(r.source_id, sort_keys=True) for r in rows}) == len(rows)  # one id per question
    if key == "imgname":
        assert all(r.source_id["query"] == r.question for r in rows)


def _run_and_check(tmp_path, suite: str, data: Path, key: str) -> list[dict]:
    out = tmp_path / "out"
    result = run_cli("--suite", suite, "--data", str(data), "--preset", "smoke", "--targets", "qv", "--vision", "frozen",
                     "--limit", "8", "--save-adapters", "none", "--control", "none", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [read_record(p) for p in record_files(out / "records")]
    (run,) = [r for r in records if r["kind"] == "cell" and r["status"] == "ok"]
    folder = out / "submissions" / suite
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{run['key']}.json", "best.json"])
    best = json.loads((folder / "best.json").read_text())
    assert best == json.loads((folder / f"{run['key']}.json").read_text())
    data_dir = cache_root() / run["data"]
    test = read_split(data_dir, "test")
    assert [e[key] for e in best] == [r.source_id[key] for r in test]  # the dataset's ids, in the test split's order
    answer = "prediction" if key == "imgname" else "answer"
    assert [e[answer] for e in best] == [i["prediction"] for i in run["items"]]
    assert [i["source_id"] for i in run["items"]] == [r.source_id for r in test]  # the records carry them per item
    return best


@pytest.mark.parametrize("suite, fixture, key", [("docvqa", docvqa_fixture, "questionId"), ("textvqa", textvqa_fixture, "question_id"),
                                                 ("docvqa", parquet_fixture, "questionId")])
def test_a_run_writes_official_submission_files_with_the_dataset_ids(tmp_path, suite, fixture, key):
    best = _run_and_check(tmp_path, suite, fixture(tmp_path / "data"), key)
    assert set(best[0]) == {key, "answer"}


@pytest.mark.skipif(not REAL_DOCVQA.is_dir(), reason="the real DocVQA pages are not beside this checkout")
def test_real_docvqa_pages_give_their_own_question_ids(tmp_path):
    best = _run_and_check(tmp_path, "docvqa", REAL_DOCVQA, "questionId")
    official = {row["questionId"] for row in json.loads((REAL_DOCVQA / "val_v1.0.json").read_text())["data"]}
    assert best and all(isinstance(e["questionId"], int) and e["questionId"] in official for e in best)
