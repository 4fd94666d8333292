"""The one writer of image grids (before/after strips, progress strips, benchmark thumbnails).

Renders are small (32-128 px), so grids are enlarged by pixel repetition to stay readable
without blurring; the file is written atomically so a kill never leaves half a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from piva.io import PathLike, atomic_path

Row = Union[torch.Tensor, Sequence[torch.Tensor]]


def image_grid(rows: Sequence[Row], scale: int = 1) -> np.ndarray:
    """uint8 [H,W,3] grid: each row is a [N,3,h,w] batch or a list of [3,h,w] / [n,3,h,w] images in [0,1],
    laid left to right; rows go top to bottom; every pixel is repeated `scale` x `scale` times."""
    if not rows:
        raise ValueError("an image grid needs at least one row")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, not {scale}")
    strips = []
    for row in rows:
        batch = torch.cat([im.detach().float().cpu().reshape(-1, *im.shape[-3:]) for im in row])
        strips.append(torch.cat(list(batch), dim=2))
    grid = torch.cat(strips, dim=1).clamp(0, 1).permute(1, 2, 0).numpy()
    arr = (grid * 255).round().astype(np.uint8)
    return arr.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else arr


def save_image_grid(path: PathLike, rows: Sequence[Row], scale: int = 1) -> Path:
    """Write `image_grid(rows, scale)` to `path` (format from the suffix), atomically."""
    import imageio.v3 as iio

    arr = image_grid(rows, scale)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, arr)
    return Path(path)
