"""Image metrics shared by the demo, the experiments and (later) the benchmark."""

from __future__ import annotations

from typing import Optional

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR (data range 1) over all pixels, or over `mask` (1 = counted) when given."""
    err = (a.float() - b.float()) ** 2
    if mask is None:
        mse = err.mean()
    else:
        m = mask.float().expand_as(err)
        mse = (err * m).sum() / m.sum().clamp_min(1)
    return float(10 * torch.log10(1 / mse.clamp_min(1e-10)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(a.float(), b.float(), data_range=1.0))
