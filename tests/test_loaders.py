"""Real-data loaders on tiny fixtures of each real format, written with PIL at test time."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from bench import loaders, suites
from bench.errors import BenchError
from bench.suite_data import content_digest, describe, read_split
from tests.conftest import run_cli


def _png(path: Path, shade: int, size=(96, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, 128)).save(path)
    return path


def _jpeg_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (shade, shade, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def textvqa_fixture(root: Path) -> Path:
    """TextVQA layout: one JSON per split, images named by image_id under train_images/."""
    for split, ids in (("train", range(0, 6)), ("val", range(6, 9))):
        data = []
        for i in ids:
            image_id = f"{i:016x}"
            _png(root / "train_images" / f"{image_id}.jpg", 20 * i)
            for q in range(2):
                answers = ["stop"] * 6 + ["stop sign"] * 3 + [f"x{q}"] if q == 0 else ["12"] * 2 + ["twelve"] * 8
                data.append({"question": f"what does sign {i} say?", "image_id": image_id, "image_classes": ["Sign"],
                             "question_id": i * 10 + q, "answers": answers, "set_name": split})
        (root / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps({"dataset_type": split, "dataset_name": "textvqa", "data": data}))
    # The official test split has no answers: it must be skipped, not break the load.
    (root / "TextVQA_0.5.1_test.json").write_text(json.dumps({"dataset_type": "test", "data": [
        {"question": "what?", "image_id": "0000000000000000", "set_name": "test"}]}))
    return root


def docvqa_fixture(root: Path, n_docs: int = 10) -> Path:
    """Official DocVQA JSON: a val split only, image paths relative to the JSON, two questions per page."""
    data = []
    for d in range(n_docs):
        rel = f"documents/page{d}.png"
        _png(root / "val" / rel, 10 * d, size=(120, 160))
        for q in range(2):
            data.append({"questionId": d * 2 + q, "question": f"What is field {q}?", "question_types": ["form"],
                         "image": rel, "docId": d, "ucsf_document_id": "x", "ucsf_document_page_no": "1",
                         "answers": [f"{d}{q}", f"{d}-{q}"], "data_split": "val"})
    (root / "val").mkdir(parents=True, exist_ok=True)
    (root / "val" / "val_v1.0.json").write_text(json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "data": data}))
    return root


def chartqa_fixture(root: Path) -> Path:
    """ChartQA layout: train/ and test/ with <split>_human.json and png/."""
    for split, n in (("train", 8), ("test", 4)):
        rows = []
        for i in range(n):
            name = f"{split}{i}.png"
            _png(root / split / "png" / name, 15 * i)
            rows.append({"imgname": name, "query": f"What is the value of bar {i}?", "label": str(10 + i)})
        (root / split / f"{split}_human.json").write_text(json.dumps(rows))
    return root


def parquet_fixture(root: Path, n: int = 12) -> Path:
    """Hugging Face DocVQA shards: image as {bytes, path}; one labelled split (validation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "questionId": [str(i) for i in range(n)],
        "question": [f"What is the total {i}?" for i in range(n)],
        "answers": [[f"{i}.00", f"${i}"] for i in range(n)],
        "image": [{"bytes": _jpeg_bytes(20 * i), "path": f"doc{i}.jpg"} for i in range(n)],
        "docId": [i // 2 for i in range(n)],
    })
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / "validation-00000-of-00001.parquet", row_group_size=5)
    return root


def _prepare(suite: str, data: Path, limit=None) -> Path:
    return suites.get(suite).prepare(data=data, limit=limit)


def _images(folder: Path, split: str) -> set[str]:
    return {r.image for r in read_split(folder, split)}


def _docs(folder: Path, split: str) -> set[str]:
    return {json.loads(line)["doc"] for line in open(folder / f"{split}.jsonl")}


def test_textvqa_json_uses_the_source_splits_and_keeps_ten_answers(tmp_path):
    folder = _prepare("textvqa", textvqa_fixture(tmp_path / "textvqa"))
    train, val, test = read_split(folder, "train"), read_split(folder, "val"), read_split(folder, "test")
    assert (len(train) + len(val), len(test)) == (12, 6) and len(val) == 2  # validation: one training image, both questions
    assert not _images(folder, "train") & _images(folder, "test")
    assert not _images(folder, "train") & _images(folder, "val") and not _images(folder, "val") & _images(folder, "test")
    assert all(len(r.answers) == 10 for r in train + val + test)
    # answers[0] (the training target) is the most common answer
    assert {r.answers[0] for r in train + val} == {"stop", "twelve"}
    assert "train" in describe(folder) and "textvqa-json" in describe(folder)


def test_docvqa_single_split_is_divided_by_page(tmp_path):
    folder = _prepare("docvqa", docvqa_fixture(tmp_path / "docvqa"))
    train, val, test = read_split(folder, "train"), read_split(folder, "val"), read_split(folder, "test")
    assert len(train) + len(val) + len(test) == 20 and len(test) == 4 and len(val) == 2  # whole pages, both questions
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        assert not _docs(folder, a) & _docs(folder, b)
        assert not _images(folder, a) & _images(folder, b)
    assert all(Path(r.image).is_file() for r in train + val + test)
    # same source, same split (fixed seed); --limit caps each split
    again = _prepare("docvqa", tmp_path / "docvqa")
    assert again == folder and content_digest(again) == content_digest(folder)
    limited = _prepare("docvqa", tmp_path / "docvqa", limit=3)
    assert len(read_split(limited, "train")) == 3 and len(read_split(limited, "test")) == 3
    assert len(read_split(limited, "val")) == 2


def test_chartqa_json_finds_images_in_png_folders(tmp_path):
    folder = _prepare("chartqa", chartqa_fixture(tmp_path / "chartqa"))
    test = read_split(folder, "test")
    assert len(read_split(folder, "train")) + len(read_split(folder, "val")) == 8 and len(test) == 4
    assert test[0].answers == ["10"] and test[0].question == "What is the value of bar 0?"


def test_parquet_images_are_streamed_to_files(tmp_path):
    folder = _prepare("docvqa", parquet_fixture(tmp_path / "hf"))
    train, val, test = read_split(folder, "train"), read_split(folder, "val"), read_split(folder, "test")
    assert len(train) + len(val) + len(test) == 12 and val
    assert not _docs(folder, "train") & _docs(folder, "test") and not _docs(folder, "val") & _docs(folder, "test")
    for row in train + val + test:
        with Image.open(row.image) as im:
            assert im.format == "JPEG" and im.size == (80, 60)
    # the right bytes went to the right row: each row's image shade encodes its question number
    for row in test:
        i = int(row.question.split()[-1].rstrip("?"))
        with Image.open(row.image) as im:
            assert abs(im.convert("RGB").getpixel((40, 30))[0] - 20 * i) <= 3


def _error(suite: str, data: Path, **kw) -> str:
    with pytest.raises(BenchError) as info:
        _prepare(suite, data, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_field_names_file_and_row(tmp_path):
    root = chartqa_fixture(tmp_path / "c")
    path = root / "test" / "test_human.json"
    rows = json.loads(path.read_text())
    del rows[2]["label"]
    path.write_text(json.dumps(rows))
    message = _error("chartqa", root)
    assert "test_human.json row 2" in message and "'label'" in message


def test_broken_image_names_the_row(tmp_path):
    root = textvqa_fixture(tmp_path / "t")
    victim = sorted((root / "train_images").iterdir())[7]
    victim.write_bytes(b"\xff\xd8 not really a jpeg")
    message = _error("textvqa", root)
    assert "row" in message and victim.name in message and "unreadable" in message


def test_missing_image_names_the_row(tmp_path):
    root = docvqa_fixture(tmp_path / "d")
    (root / "val" / "documents" / "page3.png").unlink()
    message = _error("docvqa", root)
    assert "val_v1.0.json row 6" in message and "page3.png" in message


def test_empty_file_and_empty_rows(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert "is empty" in _error("docvqa", empty)
    no_rows = tmp_path / "norows.json"
    no_rows.write_text(json.dumps({"dataset_split": "val", "data": []}))
    assert "has no rows" in _error("docvqa", no_rows)
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [')
    assert "not valid JSON" in _error("docvqa", bad)


def test_format_and_suite_mismatches(tmp_path):
    charts = chartqa_fixture(tmp_path / "c")
    assert "does not read" in _error("textvqa", charts)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.json").write_text(json.dumps({"hello": 1}))
    assert "no TextVQA, DocVQA or ChartQA JSON" in _error("docvqa", nothing)
    with pytest.raises(BenchError, match="generated only"):
        suites.get("shapes").prepare(data=charts)


def test_parquet_missing_column_and_broken_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "p"
    root.mkdir()
    pq.write_table(pa.table({"question": ["q"], "image": [{"bytes": b"x", "path": "a.png"}]}), root / "test-0.parquet")
    assert "no answers column" in _error("docvqa", root)
    pq.write_table(pa.table({"question": ["q", "r", "s"], "answers": [["a"], ["b"], ["c"]], "docId": [1, 2, 3],
                             "image": [{"bytes": _jpeg_bytes(1), "path": "a.jpg"}, {"bytes": b"garbage", "path": "b.jpg"},
                                       {"bytes": _jpeg_bytes(3), "path": "c.jpg"}]}), root / "test-0.parquet")
    message = _error("docvqa", root)
    assert "test-0.parquet row 1" in message and "unreadable" in message


def test_cli_runs_a_real_format_and_refuses_bad_data(tmp_path):
    data = chartqa_fixture(tmp_path / "chartqa")
    out = tmp_path / "out"
    ok = run_cli("--suite", "chartqa", "--data", str(data), "--preset", "smoke", "--targets", "qv", "--vision", "frozen",
                 "--limit", "6", "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    text = (out / "results.md").read_text()
    assert "Data: chartqa (chartqa-json; 6 train / 1 validation / 4 test items)" in text
    # ChartQA's predictions file: image name, query and prediction, in the test split's order
    best = json.loads((out / "submissions" / "chartqa" / "best.json").read_text())
    assert [(e["imgname"], e["query"]) for e in best] == [(f"test{i}.png", f"What is the value of bar {i}?") for i in range(4)]
    assert all(isinstance(e["prediction"], str) for e in best)
    (data / "train" / "png" / "train1.png").write_bytes(b"")
    bad_out = tmp_path / "bad"
    bad = run_cli("--suite", "chartqa", "--data", str(data), "--preset", "smoke", "--out", str(bad_out))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ") and "train1.png" in bad.stderr
    assert "Traceback" not in bad.stderr and not bad_out.exists()
    two = run_cli("--suite", "chartqa,docvqa", "--data", str(data), "--out", str(bad_out))
    assert two.returncode == 2 and "one suite per dataset" in two.stderr and not bad_out.exists()


REAL_DOCVQA = Path(__file__).resolve().parents[2] / "shared" / "real-data" / "docvqa-val-3pages"


@pytest.mark.skipif(not REAL_DOCVQA.is_dir(), reason="the real DocVQA pages are not beside this checkout")
def test_real_docvqa_pages_split_three_ways_and_score_officially(tmp_path):
    """Three real DocVQA validation pages in the official format: one page per split, whole pages only;
    official ANLS on their real answers (the boundary and raw-length rules matter on real strings)."""
    from bench.metrics import anls

    folder = _prepare("docvqa", REAL_DOCVQA)
    splits = {name: read_split(folder, name) for name in ("train", "val", "test")}
    assert sum(len(rows) for rows in splits.values()) == 12
    assert all(len({r.image for r in rows}) == 1 for rows in splits.values())
    assert len({r.image for rows in splits.values() for r in rows}) == 3
    rows = [r for rs in splits.values() for r in rs]
    for row in rows:
        assert anls(row.answers[0], row.answers) == 1.0
        assert anls(f"  {row.answers[0].upper()} ", row.answers) == 1.0  # case and spacing do not count
    page = next(r for r in rows if "2" in r.answers and "page 2" in r.answers)
    assert anls("page2", page.answers) == pytest.approx(1 - 1 / 6)  # nearest answer "page 2": one edit over 6 raw chars
    assert anls("3", page.answers) == 0.0  # NL = 1 against "2"
    assert anls("  3 ", page.answers) == pytest.approx(0.75)  # ...but the raw prediction is 4 long: NL = 1/4
