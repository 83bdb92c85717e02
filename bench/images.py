"""Every image file the harness reads is opened here: checked against a deliberate pixel limit, decoded
in full, and converted to the 8-bit RGB the models take.

Limit: at most ``MAX_PIXELS`` (100 megapixels, e.g. a 10000 x 10000 page; an A4 page scanned at 600
dpi is 35 MP) per image, or ``BENCH_MAX_IMAGE_PIXELS``. A file over it is refused from its header,
before decoding, in one line that names the file, its size and how to raise the limit: a small file
can claim billions of pixels (a decompression bomb), and one 20000 x 20000 page is 1.2 GB as RGB
before the model shrinks it to a few hundred pixels a side. PIL's own guard (89.5 MP, a warning only,
an error at twice that) is replaced by this one, for every library that opens images in this process.

Conversion (:func:`to_rgb`): 16-bit and 32-bit grayscale are scaled to 8 bits (PIL's ``convert``
clips every value over 255 to white); transparency (RGBA, LA, PA, a palette or RGB with a
transparent colour) is laid over white, the colour of a page (dropping the alpha channel shows
whatever the transparent pixels hold, usually black); CMYK, YCbCr, LAB, HSV, bilevel, grayscale and
palette images go through PIL's ``convert``. Multi-frame files (GIF, TIFF) give their first frame.

Damaged files (empty, truncated, not an image at all) are refused in one line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from bench.errors import BenchError

MAX_PIXELS = 100_000_000
ENV = "BENCH_MAX_IMAGE_PIXELS"
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def max_pixels() -> int:
    """The limit in force: ``BENCH_MAX_IMAGE_PIXELS`` when set, else ``MAX_PIXELS``."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise BenchError(f"{ENV} {text!r} is not a number of pixels; set a whole number >= 1, e.g. {ENV}=400000000 "
                         "for 20000 x 20000 pages (or unset it for the default of 100,000,000)")
    return value


def _install_limit() -> int:
    """PIL's guard set to ours: it warns above the limit (we make that an error) and raises at twice it."""
    try:
        limit = max_pixels()
    except BenchError:
        limit = MAX_PIXELS  # the bad value is reported, in one line, by the first image opened
    Image.MAX_IMAGE_PIXELS = limit
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image
    return limit


_install_limit()


def _where(where: str | None) -> str:
    return f"{where}: " if where else ""


def _too_big(path, where, exc: Exception, limit: int) -> BenchError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(match.group(1)) if match else None
    size = f"{pixels:,} pixels" if pixels else "more pixels than allowed"
    return BenchError(f"{_where(where)}image {path} has {size}, over the limit of {limit:,} (a guard against decompression "
                      f"bombs); downscale it, or if the file is trusted raise the limit with {ENV}={pixels or limit * 4} "
                      "(3 bytes of memory per pixel)")


def _unreadable(path, where, exc: Exception) -> BenchError:
    if isinstance(exc, UnidentifiedImageError):
        reason = "not in any image format PIL reads"
    else:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.replace(str(path), "the file")
    with contextlib.suppress(OSError, TypeError):
        if Path(path).stat().st_size == 0:
            reason = "the file is empty: 0 bytes"
    return BenchError(f"{_where(where)}image {path} is unreadable ({reason}); replace or remove the file")


def _guarded(path, where: str | None, action):
    """``action()`` (which opens ``path``) under the pixel limit; any failure as a one-line BenchError."""
    limit = max_pixels()
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return action()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_big(path, where, exc, limit) from None
    except MemoryError:
        raise BenchError(f"{_where(where)}image {path} does not fit in this machine's free memory once decoded; "
                         f"downscale it (or lower {ENV} to refuse such files up front)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise _unreadable(path, where, exc) from None


def check(path, where: str | None = None) -> None:
    """Refuse ``path`` in one line unless it decodes in full within the pixel limit.

    JPEG is decoded at 1/8 scale (its DCT allows it; every byte of the file is still read, so a
    truncated one fails) to keep checking a large dataset fast."""

    def decode():
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()

    _guarded(path, where, decode)


def open_rgb(path, where: str | None = None) -> Image.Image:
    """The image file at ``path`` as 8-bit RGB (see the module's conversion rules); ``where`` (a dataset
    row, an image set) prefixes the error."""

    def decode():
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb(im)
            return rgb.copy() if rgb is im else rgb  # closing the file closes the image read from it

    return _guarded(path, where, decode)


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB: high bit depths scaled, transparency laid over white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "palette images with transparency ... should be converted to RGBA": we do
            rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16-bit values by their full range (65535 -> 255); 32-bit integers the same when they fit in 16
    bits (a 16-bit PNG or TIFF some decoders widen), else their own min..max; floats in [0, 1] x 255,
    else min..max."""
    a = array.astype(np.float64)
    if mode == "F" and a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
        scaled = a * 255
    elif mode != "F" and (mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535)):
        scaled = a / 257
    else:
        lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 1.0)
        scaled = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


class LazyImage(Image.Image):
    """A PIL image that reads its file (as :func:`open_rgb` does: the pixel limit, RGB) on first use.

    For lm-eval requests, which are built for every item of a task before any is evaluated: tools that
    take PIL images (lm-eval's ``hf-multimodal``) get one, decoded when its batch is processed, while a
    reader that wants only the file (the harness, by ``path``) never decodes it here. Until then it costs
    a path, and no open file: a suite's requests never hold a thousand file handles or decoded pages.
    """

    def __init__(self, path):
        super().__init__()
        self.path = os.fspath(path)

    def load(self):
        if self._im is None:  # never read (a closed image holds a DeferredError, and stays closed)
            rgb = open_rgb(self.path)
            self.im, self._mode, self._size, self.info = rgb.im, rgb.mode, rgb.size, dict(rgb.info)
        return super().load()

    @property
    def size(self) -> tuple[int, int]:
        self.load()
        return self._size

    @property
    def mode(self) -> str:
        self.load()
        return self._mode

    @property
    def decoded(self) -> bool:
        """Whether its pixels have been read (and are held)."""
        return self._im is not None

    def __reduce__(self):
        """Copied or pickled as its path (lm-eval deep-copies logged requests), not as pixels."""
        return type(self), (self.path,)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}{' (read)' if self.decoded else ''}>"
