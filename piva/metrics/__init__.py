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


# ---------------------------------------------------------------------------- CLIP-space metrics
def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean raw cosine (not x100) between each image embedding [N,D] and one text embedding [D]."""
    return float((_unit(image_emb) @ _unit(text_emb.reshape(-1))).mean())


def clip_direction(edit_emb, orig_emb, target_text_emb, source_text_emb) -> float:
    """Mean cos(E(edit) - E(orig), T(target) - T(source)) over views."""
    d_img = _unit(edit_emb) - _unit(orig_emb)
    d_txt = _unit(target_text_emb.reshape(-1)) - _unit(source_text_emb.reshape(-1))
    return float((_unit(d_img) @ _unit(d_txt)).mean())


def clip_consistency(edit_emb, orig_emb, wrap: bool = True) -> float:
    """Mean cos between the edit directions of adjacent views i, i+1 (and last->first when `wrap`)."""
    d = _unit(_unit(edit_emb) - _unit(orig_emb))
    nxt = torch.roll(d, -1, dims=0) if wrap else d[1:]
    cur = d if wrap else d[:-1]
    return float((cur * nxt).sum(-1).mean())
