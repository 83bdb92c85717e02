"""Bad and awkward image files, through ``run_bench.py --data`` and ``--similarity --data``: each is
refused in one line naming the file (exit 2, no traceback, nothing written) or converted to the RGB
the models take (16-bit scaled rather than clipped, transparency on white rather than black)."""

import numpy as np
import pytest
from PIL import Image

from bench.reliability import bad_images
from conftest import run_cli

SMALL = ["--preset", "smoke", "--targets", "qv", "--vision", "frozen"]


def _one_line_refusal(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _nothing_prepared(cache):
    left = [p.name for p in cache.glob("*")] if cache.exists() else []
    assert not [name for name in left if "-data-" in name], left  # neither a prepared folder nor its temporary


@pytest.mark.parametrize("kind", ["truncated JPEG", "truncated PNG", "20000 x 20000 page",
                                  "decompression bomb (header: 100000 x 100000)"])
def test_data_with_a_bad_image_is_refused_in_one_line(tmp_path, kind):
    data = tmp_path / "chartqa"
    victim = bad_images.chartqa_dataset(data, {"train3": kind})["train3"]
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_cli("--suite", "chartqa", "--data", str(data), *SMALL, "--out", str(out), env={"BENCH_CACHE_DIR": str(cache)})
    line = _one_line_refusal(result, victim.name, "train_human.json row 3")
    if "20000" in kind or "bomb" in kind:
        assert "pixels" in line and "BENCH_MAX_IMAGE_PIXELS" in line and "100,000,000" in line
    assert not out.exists()
    _nothing_prepared(cache)


@pytest.mark.parametrize("kind", ["truncated JPEG", "decompression bomb (header: 100000 x 100000)", "zero-byte"])
def test_similarity_with_a_bad_image_is_refused_in_one_line(tmp_path, kind):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (40, 30), (20 * i, 10, 200)).save(folder / f"{i}.png")
    victim = bad_images.write(kind, folder, "zz-bad")
    out = tmp_path / "out"
    _one_line_refusal(run_cli("--similarity", "--data", str(folder), "--samples", "20", "--out", str(out)), victim.name)
    assert not out.exists()


def _expected(kind: str) -> dict:
    """Pixels the RGB image must have: (x, y) -> colour."""
    if kind == "16-bit grayscale":
        ramp = np.linspace(0, 65535, 96).round()
        return {(x, 10): (round(ramp[x] / 257),) * 3 for x in (0, 10, 48, 80, 95)}
    if kind in ("palette with transparency", "grayscale + alpha (LA)", "RGBA, transparent page"):
        return {(2, 2): (255, 255, 255), (40, 30): (0, 0, 0)}  # the page white, the ink black
    if kind == "grayscale (L)":
        return {(5, 5): (200, 200, 200)}
    if kind == "CMYK JPEG":
        return {(5, 5): (255, 55, 55)}
    raise KeyError(kind)


@pytest.mark.parametrize("kind", list(bad_images.CONVERTED))
def test_awkward_modes_become_the_rgb_the_models_take(tmp_path, kind, tiny):
    """Every way the harness opens an image file: evaluation (lm-eval hands paths), the similarity
    image sets, and the model's own array conversion."""
    from bench import evaluate, features

    path = bad_images.write(kind, tmp_path, "img")
    opened = {"evaluate": evaluate._open(str(path)),
              "features": next(iter(features.from_paths("x", "x", [path], 10, 0).load()))}
    for where, image in opened.items():
        assert image.mode == "RGB", where
        for (x, y), colour in _expected(kind).items():
            got = image.getpixel((x, y))
            assert max(abs(a - b) for a, b in zip(got, colour)) <= 2, (where, (x, y), got, colour)
    with Image.open(path) as raw:
        array = tiny.image_array(raw)  # the adapter's own conversion, given an image in the file's mode
    assert array.dtype == np.uint8 and array.shape[-1] == 3
    assert np.abs(array.astype(int) - tiny.image_array(opened["evaluate"]).astype(int)).max() <= 2


def test_data_of_awkward_modes_runs(tmp_path):
    """A dataset whose images are all in modes other than RGB trains and evaluates to the end."""
    kinds = dict(zip(["train0", "train1", "train2", "train3", "test0", "test1"], bad_images.CONVERTED))
    data = tmp_path / "chartqa"
    bad_images.chartqa_dataset(data, kinds)
    out = tmp_path / "out"
    result = run_cli("--suite", "chartqa", "--data", str(data), *SMALL, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "results.md").is_file()


def test_the_pixel_limit_is_deliberate_and_can_be_raised(tmp_path, monkeypatch):
    """PIL's default limit (89.5 MP, an error only at twice that) is replaced by ours, named in the
    error, and BENCH_MAX_IMAGE_PIXELS raises it (a bad value is one line too)."""

    from bench import images
    from bench.errors import BenchError

    path = bad_images.bomb_header(tmp_path / "bomb.png", side=12_000)  # 144 MP: PIL's default would only warn
    with pytest.raises(BenchError, match=r"144,000,000 pixels, over the limit of 100,000,000.*BENCH_MAX_IMAGE_PIXELS"):
        images.check(path, "here")
    monkeypatch.setenv("BENCH_MAX_IMAGE_PIXELS", "200000000")
    assert images.max_pixels() == 200_000_000
    with pytest.raises(BenchError, match="unreadable"):  # past the limit now; its data is not a page of 144 MP
        images.check(path, "here")
    monkeypatch.setenv("BENCH_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(BenchError, match="BENCH_MAX_IMAGE_PIXELS 'lots'"):
        images.check(path, "here")
    monkeypatch.delenv("BENCH_MAX_IMAGE_PIXELS")
    assert images.max_pixels() == 100_000_000  # read at each call: nothing to reset (a reload would replace its classes)
