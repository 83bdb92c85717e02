"""Predictions files in each dataset's submission format, from the per-item predictions of the records.

DocVQA's evaluation server takes a JSON list of ``{"questionId", "answer"}``; TextVQA's (like VQA's) a
list of ``{"question_id", "answer"}``; ChartQA has no server, and its authors' evaluation reads the image
name, the query and the prediction. Items of real data carry the dataset's own ids (``source_id``, kept
by bench/loaders.py); generated items have none, and take the harness's item id in the same place, so a
file has the same shape either way.

``<out>/submissions/<suite>/<run key>.json`` for every finished run, and ``best.json`` for the best cell
on validation (its best seed on validation): pure functions of the records, rewritten with the tables.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.store import atomic_write_text

KINDS = {"docvqa-json": "docvqa", "textvqa-json": "textvqa", "chartqa-json": "chartqa"}  # a suite's data format -> file kind
BEST = "best.json"


def kind(items: list[dict], data_formats: tuple[str, ...] = ()) -> str:
    """``docvqa``, ``textvqa``, ``chartqa`` or ``plain``: from the dataset's ids when the items have them
    (parquet shards of any suite), else from the suite's own format."""
    ids = next((item["source_id"] for item in items if item.get("source_id")), None)
    if ids:
        if "questionId" in ids:
            return "docvqa"
        if "question_id" in ids:
            return "textvqa"
        if "imgname" in ids:
            return "chartqa"
    return next((KINDS[f] for f in data_formats if f in KINDS), "plain")


def entries(items: list[dict], kind_: str, questions: dict[str, str] | None = None) -> list[dict]:
    """One submission entry per item, in the order of the items. ``questions`` (item id -> question)
    fills ChartQA's query for items without the dataset's ids."""
    out = []
    for item in items:
        ids, prediction = item.get("source_id") or {}, item["prediction"]
        if kind_ == "docvqa":
            out.append({"questionId": ids.get("questionId", item["id"]), "answer": prediction})
        elif kind_ == "textvqa":
            out.append({"question_id": ids.get("question_id", item["id"]), "answer": prediction})
        elif kind_ == "chartqa":
            query = ids.get("query", (questions or {}).get(item["id"]))
            out.append({"imgname": ids.get("imgname", item["id"]), "query": query, "prediction": prediction})
        else:
            out.append({"id": item["id"], "answer": prediction})
    return out


def dumps(rows: list[dict]) -> str:
    """A JSON list, one entry per line (diffable, and still one ``json.load``)."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def _questions(data: str | None) -> dict[str, str]:
    from bench.suite_data import cache_root, read_split

    folder = cache_root() / data if data else None
    if folder is None or not (folder / "test.jsonl").is_file():
        return {}
    return {row.id: row.question for row in read_split(folder, "test")}


def best_run(runs: list[dict]) -> dict | None:
    """Of a cell's runs, the one with the best validation score (the lowest seed on a tie)."""
    done = [r for r in runs if r.get("status") == "ok" and r.get("items")]
    return min(done, key=lambda r: (-r["val_score"], r["seed"])) if done else None


def write_all(records: list[dict], judged: dict, out: Path) -> list[Path]:
    """Every finished run's file and each suite's ``best.json``; returns the paths written."""
    from bench import suites

    written = []
    for section in sorted({r["suite"] for r in records if r.get("kind") == "cell"}):
        runs = [r for r in records if r["suite"] == section and r.get("kind") == "cell" and r.get("status") == "ok" and r.get("items")]
        if not runs:
            continue
        try:
            formats = suites.get(section.split("@")[0]).data_formats
        except Exception:  # a suite no longer in the registry: its ids decide, or the plain file
            formats = ()
        kind_ = kind(runs[0]["items"], formats)
        questions = _questions(runs[0].get("data")) if kind_ == "chartqa" else None
        folder = Path(out) / "submissions" / section
        for r in runs:
            written.append(folder / f"{r['key']}.json")
            atomic_write_text(written[-1], dumps(entries(r["items"], kind_, questions)))
        verdict = judged.get(section)
        best = best_run(verdict.best.runs) if verdict is not None and verdict.best is not None else None
        if best is not None:
            written.append(folder / BEST)
            atomic_write_text(written[-1], dumps(entries(best["items"], kind_, questions)))
    return written
