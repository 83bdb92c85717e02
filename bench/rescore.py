"""Score kept predictions again with the suites' current metrics: check published records, or repair them.

    python -m bench.rescore results/docvqa            # rewrite every record whose scores differ
    python -m bench.rescore results/docvqa --check    # change nothing; exit 1 if any item score differs

Every record keeps its per-item predictions, so a corrected metric (ANLS as the official code
computes it, say) needs no retraining. Answers come from the prepared data folder the record names
(``data``), which must be in the cache: a generated suite is prepared again with the record's sizes
when it is not; a ``--data`` dataset must be prepared by rerunning its benchmark. Files are rewritten
atomically, and tables are not: rerun the benchmark command to rebuild them from the records.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import suites
from bench.errors import BenchError
from bench.metrics import METRICS
from bench.store import Store, check_schemas, read_record, record_files
from bench.suite_data import cache_root, content_digest, read_split

SPLIT_FIELDS = (("test", "items", "score"), ("val", "val_items", "val_score"))


def _data_folder(record: dict) -> Path:
    folder = cache_root() / record["data"]
    if content_digest(folder):
        return folder
    train = record.get("train") or {}
    if "-data-" not in record["data"]:
        suite = suites.get(record.get("task") or record["suite"])  # a data-regime section's own suite
        rebuilt = suite.prepare(train.get("train_items"), train.get("test_items"), val_items=train.get("val_items"))
        if rebuilt.name == record["data"]:
            return rebuilt
    raise BenchError(f"{record['key']}: its data folder {record['data']} is not in {cache_root()}; rerun its benchmark "
                     "command (it prepares the folder again) and then rescore")


def rescore(record: dict, answers: dict) -> tuple[dict, int]:
    """The record with every kept prediction scored again; returns it and how many item scores changed."""
    metric = METRICS[record["metric"]]
    changed, out = 0, dict(record)
    for split, field, total in SPLIT_FIELDS:
        if not record.get(field):
            continue
        items = []
        for item in record[field]:
            score = float(metric(item["prediction"], answers[split][item["id"]]))
            changed += score != item["score"]
            items.append({**item, "score": score})
        out[field] = items
        out[total] = sum(i["score"] for i in items) / len(items)
    return out, changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rescore", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="results folders (their records/ are read)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if any item score differs")
    args = p.parse_args(argv)
    try:
        total_items = total_changed = 0
        for folder in args.folders:
            if not (folder / "records").is_dir():
                raise BenchError(f"{folder} has no records/ folder; pass a folder written by run_bench.py")
            check_schemas(folder / "records", "folder")
            store, answers = Store(folder), {}
            for path in record_files(folder / "records"):
                record = read_record(path)
                if record is None or not record.get("items"):
                    continue
                if record["data"] not in answers:
                    data = _data_folder(record)
                    answers[record["data"]] = {split: {r.id: r.answers for r in read_split(data, split)}
                                               for split, _, _ in SPLIT_FIELDS if (data / f"{split}.jsonl").is_file()}
                new, changed = rescore(record, answers[record["data"]])
                total_items += sum(len(record.get(f) or []) for _, f, _ in SPLIT_FIELDS)
                total_changed += changed
                if changed:
                    print(f"{path.relative_to(folder)}: {changed} item score(s) differ; test {record.get('score')} -> {new.get('score')}")
                    if not args.check:
                        store.put(new)
        verb = "differ" if args.check else "rescored"
        print(f"{total_changed} of {total_items} item scores {verb}")
        return 1 if args.check and total_changed else 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
