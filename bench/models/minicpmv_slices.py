"""How OpenBMB's MiniCPM-V (2.6, 4.0, 4.5) cuts an image into slices and feeds them to its vision encoder.

Facts from OpenBMB's ``finetune/dataset.py`` (slice_image and its helpers), reimplemented here:

* The whole image comes first, resized so that its area is about ``scale_resolution``^2 (448^2) with
  both sides multiples of the patch size (14), upscaled when smaller.
* If the image holds more than one such area, it is also cut into a grid of up to ``max_slice_nums``
  (9) slices of about 448x448, read row by row. The grid's cell count is the area ratio (rounded up,
  capped) or one more or less; among those, the grid whose aspect is closest (in log) to the image's.
* Pixels are scaled to [-1, 1] (mean = std = 0.5), then each 14x14 patch is laid out side by side:
  a slice of h x w patches becomes a ``[3, 14, h*w*14]`` tensor, and its ``tgt_size`` is ``(h, w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from bench.images import to_rgb


@dataclass(frozen=True)
class SliceGeometry:
    patch_size: int = 14
    scale_resolution: int = 448
    max_slice_nums: int = 9


@dataclass
class Slices:
    """One image as the model sees it: the whole image, then the slices row by row."""

    images: list[Image.Image]
    grid: tuple[int, int] | None  # (columns, rows) of the slices; None when the image is not cut

    @property
    def n_slices(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]


def _to_multiple(length: float, patch: int) -> int:
    """``length`` rounded to the nearest multiple of ``patch`` (at least one patch; Python's rounding)."""
    return max(round(length / patch) * patch, patch)


def _fit(size: tuple[float, float], geo: SliceGeometry, upscale: bool) -> tuple[int, int]:
    """(width, height) with about ``scale_resolution``^2 pixels and the same aspect, in whole patches;
    an image already smaller than that keeps its size unless ``upscale``."""
    width, height = size
    if width * height > geo.scale_resolution**2 or upscale:
        aspect = width / height
        height = int(geo.scale_resolution / math.sqrt(aspect))
        width = int(height * aspect)
    return _to_multiple(width, geo.patch_size), _to_multiple(height, geo.patch_size)


def best_grid(size: tuple[int, int], geo: SliceGeometry) -> tuple[int, int] | None:
    """(columns, rows) of the slice grid for an image of ``size`` = (width, height); None: no slicing."""
    width, height = size
    wanted = min(math.ceil(width * height / geo.scale_resolution**2), geo.max_slice_nums)
    if wanted <= 1:
        return None
    aspect = math.log(width / height)
    best, error = (1, 1), float("inf")
    for cells in (wanted - 1, wanted, wanted + 1):
        if cells == 1 or cells > geo.max_slice_nums:
            continue
        for cols in range(1, cells + 1):
            if cells % cols:
                continue
            miss = abs(aspect - math.log(cols / (cells // cols)))
            if miss < error:  # the first of equally good grids wins
                best, error = (cols, cells // cols), miss
    return best


def slice_image(image: Image.Image, geo: SliceGeometry) -> Slices:
    image = to_rgb(image)
    grid = best_grid(image.size, geo)
    if grid is None:
        return Slices([image.resize(_fit(image.size, geo, upscale=True), Image.Resampling.BICUBIC)], None)
    whole = image.resize(_fit(image.size, geo, upscale=False), Image.Resampling.BICUBIC)
    cols, rows = grid
    # the refined image: whole cells of about scale_resolution^2 each, every cell a whole number of patches
    cell_w, cell_h = _to_multiple(image.width, cols) / cols, _to_multiple(image.height, rows) / rows
    fit_w, fit_h = _fit((cell_w, cell_h), geo, upscale=True)
    refined = image.resize((fit_w * cols, fit_h * rows), Image.Resampling.BICUBIC)
    pieces = [refined.crop((c * fit_w, r * fit_h, (c + 1) * fit_w, (r + 1) * fit_h)) for r in range(rows) for c in range(cols)]
    return Slices([whole, *pieces], grid)


def patch_tensor(image: Image.Image, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image scaled to [-1, 1] with its patches side by side: ``[3, patch, h*w*patch]``, and (h, w)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
    x = x / 127.5 - 1.0  # (x / 255 - 0.5) / 0.5
    h, w = x.shape[1] // patch, x.shape[2] // patch
    x = x[:, : h * patch, : w * patch].reshape(3, h, patch, w, patch)  # c, patch row, y in patch, patch column, x in patch
    return x.permute(0, 2, 1, 3, 4).reshape(3, patch, h * w * patch).contiguous(), (h, w)
