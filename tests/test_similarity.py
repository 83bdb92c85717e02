"""Distribution similarity: the estimators against hand-written formulas, then the tiny model's features."""

import itertools
import math

import numpy as np
import pytest

from bench import features, suites
from bench.similarity import classifier_auc, compare, kid, median_distance, mmd2, pooled_bandwidth
from conftest import run_cli


def naive_mmd2(x, y, kernel):
    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_and_kid_match_the_textbook_formulas():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9, 3)), rng.normal(0.5, 1, size=(7, 3))
    z = np.concatenate([x[np.sort(np.random.default_rng(0).choice(9, 7, replace=False))], y])
    h = pooled_bandwidth(x, y)  # both sets pooled in equal shares: symmetric, whatever their sizes
    assert h == median_distance(z)
    pairs = sorted(np.linalg.norm(a - b) for a, b in itertools.combinations(z, 2))
    assert h == pytest.approx(pairs[(len(pairs) - 1) // 2])  # the lower median (torch's)
    rbf = lambda a, b: math.exp(-np.sum((a - b) ** 2) / (2 * h * h))  # noqa: E731
    cubic = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    assert mmd2(x, y) == pytest.approx(naive_mmd2(x, y, rbf), rel=1e-9)
    assert kid(x, y) == pytest.approx(naive_mmd2(x, y, cubic), rel=1e-9)
    assert mmd2(x, y) == pytest.approx(mmd2(y, x), rel=1e-12)


def test_comparison_is_symmetric():
    """A bandwidth from one side made docvqa->shapes-shift 1.24 but shapes-shift->docvqa 0.64."""
    x, y = gaussians(3, 0.7)
    assert compare(x, y).mmd2 == pytest.approx(compare(y, x).mmd2, rel=1e-12)


def gaussians(seed, shift, n=150, d=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d))
    x[:, 0] += shift
    return {"final": x, "early": x}, {"final": y, "early": y}


def test_same_distribution_is_same_and_a_shift_is_detected():
    same = [compare(*gaussians(seed, 0.0)) for seed in range(5)]
    assert sum(c.same for c in same) >= 4
    assert all(abs(c.mmd2) < 0.02 for c in same)
    assert all(c.low <= c.mmd2 <= c.high for c in same)
    shifted = compare(*gaussians(0, 1.0))
    assert not shifted.same and shifted.p_value < 0.01
    assert shifted.low > max(c.high for c in same)
    assert shifted.auc > 0.7 > max(c.auc for c in same)


def test_classifier_auc_separable_sets():
    x, y = gaussians(1, 10.0, n=40)
    assert classifier_auc(x["final"], y["final"]) > 0.99


# ------------------------------------------------------------------------------ the tiny model's features


@pytest.fixture(scope="module")
def feats(tiny):
    def get(name, n, seed=0):
        if name == "pretraining":
            return features.embed(tiny, features.reference_images(tiny, None, n, seed))
        return features.embed(tiny, features.suite_images(name, n, seed))

    return get


def test_two_samples_of_the_pretraining_generator_are_the_same(feats):
    results = [compare(feats("pretraining", 200, seed), feats("pretraining", 200, 100 + seed), seed=seed) for seed in range(4)]
    assert sum(r.same for r in results) >= 3, [r.p_value for r in results]
    assert all(abs(r.mmd2) < 0.02 for r in results)


def test_distance_from_pretraining_orders_the_suites(feats):
    """shapes (held-out pretraining scenes) is indistinguishable; the shifted suites are far.

    Measured with the shipped model (200 images, pooled bandwidth): shapes -0.001, docvqa 0.51,
    shapes-shift 0.74: the encoder sees shapes-shift's noise, stripes and dark palette as a bigger
    change than documents.
    """
    ref = feats("pretraining", 300)
    shapes = compare(feats("shapes", 300), ref)
    shift = compare(feats("shapes-shift", 300), ref)
    docs = compare(feats("docvqa", 300), ref)
    assert shapes.same and abs(shapes.mmd2) < 0.02
    assert not shift.same and not docs.same
    assert shapes.high < docs.low and shapes.high < shift.low
    assert docs.high < shift.low


def test_two_axes_tell_a_visual_shift_from_a_task_shift(tiny, feats):
    """shapes-shift asks the pretraining questions of new-looking scenes; shapes-task asks new questions of
    pretraining scenes. Images see only the first, questions and answers only the second."""
    def text(name):
        texts = features.reference_texts(tiny, 300) if name == "pretraining" else features.suite_texts(name, 300)
        return features.embed_texts(tiny, texts)

    from bench.similarity import compare_samples

    ref, ref_text = feats("pretraining", 300), text("pretraining")
    visual = {name: compare(feats(name, 300), ref) for name in ("shapes-shift", "shapes-task", "shapes-shift-50")}
    task = {name: compare_samples(text(name), ref_text) for name in ("shapes-shift", "shapes-task", "shapes-task-50")}
    # shapes-task's scenes are pretraining's (a question that needs, say, a coded object selects its scene,
    # so not exactly: MMD^2 0.004 at 300 images)
    assert not visual["shapes-shift"].same and abs(visual["shapes-task"].mmd2) < 0.02
    assert visual["shapes-task"].high < visual["shapes-shift-50"].low < visual["shapes-shift-50"].high < visual["shapes-shift"].low
    assert task["shapes-shift"].same and not task["shapes-task"].same
    assert task["shapes-shift"].high < task["shapes-task-50"].low < task["shapes-task-50"].high < task["shapes-task"].low


def test_scores_are_stable_across_sample_sizes(feats):
    ref = feats("pretraining", 1000)
    by_n = {n: compare(feats("docvqa", n), ref) for n in (200, 500, 1000)}
    for a, b in itertools.permutations(by_n.values(), 2):
        assert a.low <= b.mmd2 <= a.high, {n: (c.low, c.mmd2, c.high) for n, c in by_n.items()}


def test_features_are_cached_per_model_and_image_set(tiny, tmp_path):
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 10, 200)).save(tmp_path / f"{i}.png")
    image_set = features.resolve(str(tmp_path), 100)
    first = features.embed(tiny, image_set)
    assert first["final"].shape == (6, 128)
    assert np.allclose(np.linalg.norm(first["final"], axis=1), 1, atol=1e-5)
    calls = []
    cached = features.ImageSet(image_set.name, image_set.origin, image_set.key, lambda: calls.append(1) or [])
    again = features.embed(tiny, cached)
    assert not calls and np.array_equal(again["final"], first["final"])


# --------------------------------------------------------------------------------------------- the CLI


def test_similarity_cli_writes_tables(tmp_path):
    images = tmp_path / "mine"
    images.mkdir()
    from suites.chartqa.generate import generate

    for i, item in enumerate(itertools.islice(generate(30, seed=7), 30)):
        item["image"].save(images / f"{i}.png")
    out = tmp_path / "out"
    result = run_cli("--similarity", "--data", f"{images},shapes", "--samples", "30", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    md = (out / "similarity.md").read_text()
    assert "## Distance from pretraining" in md and "## Distance from each suite" in md
    assert "## Task distance from pretraining" in md and "no questions (images only)" in md  # the folder has no questions
    import pandas as pd

    table = pd.read_csv(out / "similarity.csv")
    mine = table[(table.data == "mine") & (table.against == "pretraining")].iloc[0]
    shapes = table[(table.data == "shapes") & (table.against == "pretraining")].iloc[0]
    assert mine.verdict == "different" and mine.mmd2 > shapes.mmd2
    assert set(table[table.data == "mine"].against) == {"pretraining", *suites.available()}


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "neither a suite"),
    (lambda p: p.mkdir(), "holds no images"),
    (lambda p: (p.mkdir(), (p / "a.png").write_bytes(b"not a png")), "a.png is unreadable"),
])
def test_bad_data_is_one_line(tmp_path, capsys, setup, message):
    """In process (the same main() the script calls; the subprocess path is covered above)."""
    from bench.cli import main

    data = tmp_path / "data"
    setup(data)
    out = tmp_path / "out"
    assert main(["--similarity", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_similarity_needs_data(capsys):
    from bench.cli import main

    assert main(["--similarity"]) == 2
    assert "--similarity needs --data" in capsys.readouterr().err
