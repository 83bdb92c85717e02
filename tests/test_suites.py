import json

import numpy as np

import pytest
import torch

from bench import suites
from bench.errors import BenchError
from bench.evaluate import evaluate
from bench.metrics import METRICS
from suites.docvqa.generate import generate as docs
from suites.shapes.generate import generate as scenes

shifted = suites.get("shapes-shift").generator()
signs = suites.get("textvqa").generator()
charts = suites.get("chartqa").generator()


def test_registry_reads_the_task_yaml():
    docvqa = suites.get("docvqa")
    assert docvqa.metric == "anls"
    assert dict(docvqa.generation_kwargs)["until"] == ["\n"] and docvqa.val_items > 0
    assert suites.get("shapes").metric == "vqa_accuracy"
    with pytest.raises(BenchError, match="unknown suite 'nope'"):
        suites.get("nope")


@pytest.mark.parametrize("generate", [docs, scenes, shifted, signs, charts])
def test_generators_are_deterministic(generate):
    a = [(it["question"], it["answers"], it["image"].tobytes()) for it in generate(20, seed=3)]
    b = [(it["question"], it["answers"], it["image"].tobytes()) for it in generate(20, seed=3)]
    c = [(it["question"], it["answers"], it["image"].tobytes()) for it in generate(20, seed=4)]
    assert a == b
    assert a != c


def _ink(image) -> np.ndarray:
    return (np.asarray(image.convert("L")) < 128).astype(np.uint8)


def _contains(page: np.ndarray, patch: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(page, patch.shape)
    return bool((windows == patch).all(axis=(-2, -1)).any())


def test_docvqa_answer_is_printed_on_the_page():
    """The asked key and its value are really drawn: their exact ink pattern occurs in the page."""
    from PIL import Image

    from bench.render import draw_text, text_size
    from suites.docvqa.generate import TRACKING

    for item in docs(100, seed=0):
        fields = dict(kv.split("=") for kv in item["key"].split("|")[2].split(";"))
        asked = item["question"].removeprefix("What is the ").removesuffix("?")
        assert fields[asked] == item["answers"][0]
        page = _ink(item["image"])
        for text in (asked, item["answers"][0]):
            mask = Image.new("L", text_size(text, tracking=TRACKING), 255)
            draw_text(mask, (0, 0), text, 0, tracking=TRACKING)
            assert _contains(page, _ink(mask)), (item["question"], text)


@pytest.mark.parametrize("name", ["docvqa", "shapes", "shapes-shift", "textvqa", "chartqa", "shapes-shift-50", "shapes-task"])
def test_prepared_splits_share_no_document(name):
    folder = suites.get(name).prepare(train_items=300, test_items=100, val_items=50)
    read = lambda split: [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
    train, val, test = read("train"), read("val"), read("test")
    assert len(train) == 300 and len(test) == 100 and len(val) >= 50
    docs = [{r["doc"] for r in rows} for rows in (train, val, test)]
    assert not docs[0] & docs[1] and not docs[0] & docs[2] and not docs[1] & docs[2]
    assert all((folder / r["image"]).is_file() for r in train + val + test)
    assert [r["id"] for r in val] == [f"val-{i:06d}" for i in range(len(val))]
    # a second call reuses the cached folder
    assert suites.get(name).prepare(train_items=300, test_items=100, val_items=50) == folder


def _glyphs(text: str, tracking: int) -> np.ndarray:
    from PIL import Image

    from bench.render import draw_text, text_size

    mask = Image.new("L", text_size(text, tracking=tracking), 255)
    draw_text(mask, (0, 0), text, 0, tracking=tracking)
    return _ink(mask)


def _painted(image, color) -> np.ndarray:
    return (np.asarray(image) == np.array(color)).all(axis=-1).astype(np.uint8)


def test_textvqa_answer_is_painted_in_the_scene():
    """The answer's exact glyphs, in one of the sign paints, occur in the scene; the question's
    sign colour is a board in the scene."""
    from suites.textvqa.generate import SIGN_COLORS, TEXT_COLORS, TRACKING

    kinds = set()
    for item in signs(150, seed=0):
        answer = item["answers"][0]
        assert answer == answer.upper() and 2 <= len(answer) <= 4
        glyphs = _glyphs(answer, TRACKING)
        assert any(_contains(_painted(item["image"], c), glyphs) for c in TEXT_COLORS), item["question"]
        if item["qtype"] == "sign":
            color = item["question"].split()[3]
            assert _painted(item["image"], SIGN_COLORS[color][0]).sum() > 40
        kinds.add(item["qtype"])
    assert kinds == {"sign", "shop", "bus"}


def test_chartqa_answer_is_plotted():
    """Asked values are printed on the chart; highest/lowest answers are the printed extremes."""
    from suites.chartqa.generate import INK, TRACKING

    qtypes = set()
    for item in charts(120, seed=0):
        values = dict(kv.split("=") for kv in item["key"].split("|")[1].split(";"))
        ink = _painted(item["image"], INK)
        for category, value in values.items():  # every label and value is drawn
            assert _contains(ink, _glyphs(category, TRACKING)) and _contains(ink, _glyphs(value, TRACKING))
        answer = item["answers"][0]
        if item["qtype"] == "value":
            assert values[item["question"].split()[-1].rstrip("?")] == answer
        else:
            pick = max if item["qtype"] == "highest" else min
            assert answer == pick(values, key=lambda c: int(values[c]))
        qtypes.add(item["qtype"])
    assert qtypes == {"value", "highest", "lowest"}


def test_lm_eval_scores_match_the_metric_on_each_split(tiny):
    suite = suites.get("docvqa")
    folder = suite.prepare(train_items=300, test_items=40, val_items=30)
    for split, n in (("test", 40), ("val", 30)):
        result = evaluate(tiny, tiny.model, suite, folder, torch.device("cpu"), batch_size=16, split=split)
        answers = {json.loads(line)["id"]: json.loads(line)["answers"]
                   for line in (folder / f"{split}.jsonl").read_text().splitlines()}
        assert len(result.items) == n and all(item["id"].startswith(split) for item in result.items)
        for item in result.items:
            assert item["score"] == METRICS["anls"](item["prediction"], answers[item["id"]])
        assert result.score == pytest.approx(sum(i["score"] for i in result.items) / n)


def test_generation_budget_follows_the_answers_in_the_tokenizer(tiny):
    from bench.evaluate import generation_budget

    suite = suites.get("docvqa")
    folder = suite.prepare(train_items=300, test_items=40, val_items=30)
    longest = max(len(tiny.answer_ids(a)) for split in ("train", "val")
                  for a in (json.loads(line)["answers"][0] for line in (folder / f"{split}.jsonl").read_text().splitlines()))
    assert longest == 4  # three digits and the end-of-turn token
    assert generation_budget(tiny, suite, folder) == longest + 2


def test_evaluation_reuses_decoded_images_and_prompts_with_the_same_results(tiny, monkeypatch):
    from bench import evaluate as evaluation

    suite = suites.get("docvqa")
    folder = suite.prepare(train_items=300, test_items=40)
    evaluation._INPUTS.pop(tiny, None)
    first = evaluate(tiny, tiny.model, suite, folder, torch.device("cpu"), batch_size=16)
    cache = evaluation.inputs_of(tiny)
    questions = {json.loads(line)["question"] for line in (folder / "test.jsonl").read_text().splitlines()}
    assert len(cache.images) == 40 and len(cache.prompts) == len(questions)
    decoded = []
    monkeypatch.setattr(tiny, "image_array", lambda image: decoded.append(image) or np.zeros((1,)))
    second = evaluate(tiny, tiny.model, suite, folder, torch.device("cpu"), batch_size=16)
    assert decoded == []  # every test image came from the cache
    assert second.items == first.items
    monkeypatch.undo()

    evaluation._INPUTS.pop(tiny, None)
    monkeypatch.setattr(evaluation, "MAX_CACHED_IMAGE_BYTES", 10 * 64 * 64 * 3)  # room for ten images
    bounded = evaluate(tiny, tiny.model, suite, folder, torch.device("cpu"), batch_size=16)
    assert len(evaluation.inputs_of(tiny).images) == 10
    assert bounded.items == first.items


def test_shapes_shift_keeps_questions_and_changes_pixels():
    """Same scenes and answers as the unstriped shifted style; pixels far from the pretraining look."""
    from suites.shapes.generate import PRETRAINING
    from suites.shapes.generate import generate as styled

    module = __import__("importlib").import_module("suites.shapes-shift.generate")
    plain = list(styled(50, 7, style=module.SHIFTED))
    striped = list(shifted(50, 7))
    assert [(a["question"], a["answers"]) for a in plain] == [(b["question"], b["answers"]) for b in striped]
    originals = list(styled(50, 7, style=PRETRAINING))
    # texture and noise: neighbouring pixels differ more; darker palette and backgrounds
    spread = lambda items: np.mean([np.abs(np.diff(np.asarray(i["image"], dtype=float), axis=1)).mean() for i in items])  # noqa: E731
    mean = lambda items: np.mean([np.asarray(i["image"], dtype=float).mean() for i in items])  # noqa: E731
    assert spread(striped) > spread(originals) and mean(striped) < mean(originals)


def _tiny_generator(n, seed, unused=0, shade=0):
    from PIL import Image

    for i in range(n):
        yield {"image": Image.new("RGB", (4, 4), (i % 250, shade, 0)), "question": f"q{i}", "answers": [str(i)], "key": f"{seed}-{i}"}


def test_records_are_keyed_by_data_content_not_generator_code():
    from bench.suite_data import content_digest, prepare_generated

    sizes = {"train": 5, "test": 3, "val": 2}
    a = prepare_generated("tiny", _tiny_generator, sizes, 0, {"unused": 1})
    b = prepare_generated("tiny", _tiny_generator, sizes, 0, {"unused": 2})
    c = prepare_generated("tiny", _tiny_generator, sizes, 0, {"shade": 9})
    assert a != b  # different recipe, different cache folder...
    assert content_digest(a) == content_digest(b)  # ...but the same data
    assert content_digest(c) != content_digest(a)


def test_graded_visual_shift_keeps_the_questions_and_moves_the_pixels_in_step():
    """strength 0 is the pretraining look, 1 the shapes-shift suite; the questions are the pretraining ones."""
    import importlib

    module = importlib.import_module("suites.shapes-shift.generate")
    levels = {s: list(module.generate(150, 9, strength=s)) for s in (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert all([i["qtype"] for i in items] == [i["qtype"] for i in levels[0.0]] for items in levels.values())
    pixels = lambda items: np.stack([np.asarray(i["image"], dtype=float) for i in items])  # noqa: E731
    brightness = [pixels(items).mean() for items in levels.values()]
    texture = [np.abs(np.diff(pixels(items), axis=2)).mean() for items in levels.values()]
    assert brightness == sorted(brightness, reverse=True) and texture == sorted(texture)
    assert np.array_equal(pixels(levels[1.0]), pixels(list(shifted(150, 9))))
    assert module.style(0.0).colors == module.PRETRAINING.colors and module.style(1.0) == module.SHIFTED
    graded = suites.get("shapes-shift-50")
    assert graded.family == suites.get("shapes-shift").family == "shapes-shift"
    assert dict(graded.generator_options) == {"strength": 0.5} and suites.get("shapes-shift").generator_options == ()
    with pytest.raises(ValueError, match="strength"):
        module.style(1.5)


def test_task_shift_asks_new_questions_of_pretraining_scenes():
    from suites.shapes.generate import QTYPES

    module = __import__("importlib").import_module("suites.shapes-task.generate")
    task = suites.get("shapes-task").generator()
    items = list(task(1200, 5))
    assert {i["qtype"] for i in items} == set(module.NEW_QTYPES)
    answers = [i["answers"][0] for i in items if i["qtype"] == "exists"]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    zero = [i["answers"][0] == "0" for i in items if i["qtype"] == "color_count"]
    assert 0.35 < np.mean(zero) < 0.65  # the answer cannot be guessed as "0"
    half = list(task(400, 5, new_fraction=0.5))
    assert sum(i["qtype"] in module.NEW_QTYPES for i in half) == 200
    assert {i["qtype"] for i in half} - set(module.NEW_QTYPES) == set(QTYPES)
    assert dict(suites.get("shapes-task-50").generator_options) == {"new_fraction": 0.5}
