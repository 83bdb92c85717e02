"""Image files of every awkward kind, written with PIL (and numpy) on the spot: the reliability section
``inputs`` and the tests feed them to ``run_bench.py --data`` and ``--similarity --data``.

``REFUSED`` kinds cannot be used (the harness must say so in one line, naming the file); ``CONVERTED``
kinds are valid images in modes other than 8-bit RGB (the harness must turn them into the RGB the
models take: 16-bit scaled, not clipped; transparency on white, not black).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PAGE_SIDE = 20000  # a 20000 x 20000 page: 400 megapixels, over the default limit (bench/images.py)


def _noise(size=(96, 72), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("this is a text file with an image's name\n")
    return path


def truncated_png(path: Path) -> Path:
    data = _encoded(_noise(), "PNG")
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def truncated_jpeg(path: Path) -> Path:
    """Cut inside the entropy-coded data: the header is intact, so PIL opens it and ``verify()`` passes."""
    data = _encoded(_noise(), "JPEG", quality=90)
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def page_20000(path: Path) -> Path:
    """A real 20000 x 20000 bilevel page (a blank scan with a black frame): ~90 KB on disk, 1.2 GB as RGB."""
    page = Image.new("1", (PAGE_SIDE, PAGE_SIDE), 1)
    page.paste(0, (0, 0, PAGE_SIDE, 40))
    page.paste(0, (0, PAGE_SIDE - 40, PAGE_SIDE, PAGE_SIDE))
    page.save(path, format="PNG")
    return path


def bomb_header(path: Path, side: int = 100_000) -> Path:
    """A decompression bomb's signature: a valid PNG whose header claims ``side`` x ``side`` pixels (10
    gigapixels) over a few bytes of data; it must be refused from its header, before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def gray16(path: Path) -> Path:
    """16-bit grayscale PNG (mode I;16): a left-to-right ramp 0..65535. Converting it with PIL's
    ``convert("RGB")`` clips every value over 255 to white."""
    ramp = np.linspace(0, 65535, 96).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (72, 1))).save(path, format="PNG")
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (96, 72), (0, 200, 200, 0)).save(path, format="JPEG", quality=95)  # red-ish
    return path


def palette_transparent(path: Path) -> Path:
    """A palette PNG whose background index is transparent (tRNS): a black mark on a see-through page."""
    image = Image.new("P", (96, 72), 0)
    image.putpalette([0, 0, 0] * 256)  # every index black: only transparency tells the page from the ink
    image.paste(1, (30, 20, 66, 52))
    image.info["transparency"] = 0
    image.save(path, format="PNG", transparency=0)
    return path


def gray_alpha(path: Path) -> Path:
    """Grayscale + alpha (LA): dark ink, everything else fully transparent (and black underneath)."""
    ink = Image.new("L", (96, 72), 0)
    alpha = Image.new("L", (96, 72), 0)
    alpha.paste(255, (30, 20, 66, 52))
    Image.merge("LA", (ink, alpha)).save(path, format="PNG")
    return path


def grayscale(path: Path) -> Path:
    Image.new("L", (96, 72), 200).save(path, format="PNG")
    return path


def rgba_transparent(path: Path) -> Path:
    """Black text on a transparent page, the RGB under the transparency black (how most tools save it)."""
    image = Image.new("RGBA", (96, 72), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (30, 20, 66, 52))
    image.save(path, format="PNG")
    return path


REFUSED = {"zero-byte": (zero_byte, ".png"), "not an image": (not_an_image, ".png"),
           "truncated PNG": (truncated_png, ".png"), "truncated JPEG": (truncated_jpeg, ".jpg"),
           "decompression bomb (header: 100000 x 100000)": (bomb_header, ".png"),
           "20000 x 20000 page": (page_20000, ".png")}
CONVERTED = {"16-bit grayscale": (gray16, ".png"), "CMYK JPEG": (cmyk_jpeg, ".jpg"),
             "palette with transparency": (palette_transparent, ".png"), "grayscale + alpha (LA)": (gray_alpha, ".png"),
             "grayscale (L)": (grayscale, ".png"), "RGBA, transparent page": (rgba_transparent, ".png")}


def write(kind: str, folder: Path, stem: str) -> Path:
    """The file of ``kind`` as ``folder/stem<suffix>``."""
    maker, suffix = {**REFUSED, **CONVERTED}[kind]
    folder.mkdir(parents=True, exist_ok=True)
    return maker(folder / f"{stem}{suffix}")


def chartqa_dataset(root: Path, kinds: dict[str, str] | None = None, n_train: int = 8, n_test: int = 4) -> dict[str, Path]:
    """A ChartQA-format dataset (``train/``, ``test/``, each ``<split>_human.json`` + ``png/``) of good
    RGB charts, where ``kinds`` maps image names (e.g. ``train3``) to a kind above; returns name -> path."""
    import json

    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(n):
            stem = f"{split}{i}"
            folder = root / split / "png"
            if kinds and stem in kinds:
                path = write(kinds[stem], folder, stem)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{stem}.png"
                Image.new("RGB", (96, 72), (15 * i, 255 - 15 * i, 128 if split == "train" else 40)).save(path)
            written[stem] = path
            rows.append({"imgname": path.name, "query": f"What is the value of bar {i}?", "label": str(10 + i)})
        (root / split / f"{split}_human.json").write_text(json.dumps(rows))
    return written
