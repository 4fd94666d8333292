"""Gaussian splats rasterised on CPU at toy sizes: dense, depth-sorted alpha compositing.

gsplat's rasteriser is CUDA-only (on CPU it tries to JIT-compile its kernels and fails), and
its pure-torch reference `_rasterize_to_pixels` still calls a CUDA kernel for the tile lists.
Its projection reference (`_fully_fused_projection`: 3D covariance → 2D conic, depth, radius,
with the same 0.3 px² blur) runs on CPU and is used as it is; what is written here is only the
compositing, over every (pixel, Gaussian) pair, which is what a tile rasteriser computes for
the pairs it keeps: fine at 32–64 px with a few thousand Gaussians, not at 512 px (use a GPU).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # gsplat skips contributions below this
ALPHA_MAX = 0.999  # and clamps alpha here


def project(means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
            near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3) -> Dict[str, Tensor]:
    """gsplat's pure-torch projection of N Gaussians into one camera: means2d [N,2], conics [N,3], depths [N], radii [N]
    (and means2d_batched [1,N,2], the tensor means2d is a view of: what a densification strategy reads the gradient of)."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane)
    return {"means2d": means2d[0], "means2d_batched": means2d, "conics": conics[0], "depths": depths[0], "radii": radii[0]}


def composite(means2d: Tensor, conics: Tensor, depths: Tensor, radii: Tensor, opacities: Tensor, colors: Tensor,
              width: int, height: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Front-to-back alpha compositing of projected Gaussians at every pixel centre.

    Returns colour [H,W,C] (not yet on a background), expected depth [H,W,1] (depth accumulated
    with the same weights, divided by the alpha, as gsplat's "ED" mode) and alpha [H,W,1]."""
    visible = radii > 0
    order = torch.argsort(torch.where(visible, depths, torch.full_like(depths, float("inf"))))
    order = order[visible[order]]
    if order.numel() == 0:
        zeros = colors.new_zeros(height, width, colors.shape[-1])
        return zeros, zeros[..., :1], zeros[..., :1]
    mu, conic, op, col, z = means2d[order], conics[order], opacities[order], colors[order], depths[order]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=mu.dtype), torch.arange(width, dtype=mu.dtype), indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 1, 2) + 0.5  # [P,1,2] pixel centres
    d = pix - mu[None]  # [P,N,2]
    sigma = 0.5 * (conic[:, 0] * d[..., 0] ** 2 + conic[:, 2] * d[..., 1] ** 2) + conic[:, 1] * d[..., 0] * d[..., 1]
    alpha = torch.clamp_max(op[None] * torch.exp(-sigma), ALPHA_MAX)
    alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)  # T before each
    weights = alpha * trans  # [P,N]
    rgb = weights @ col  # [P,C]
    acc = weights.sum(1, keepdim=True)
    depth = (weights @ z[:, None]) / acc.clamp_min(1e-10)
    return rgb.reshape(height, width, -1), depth.reshape(height, width, 1), acc.reshape(height, width, 1)


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmat: Tensor,
              K: Tensor, width: int, height: int, background: Optional[Tensor] = None,
              near_plane: float = 0.01) -> Dict[str, Tensor]:
    """One view of N Gaussians: rgb [H,W,3] on `background`, depth [H,W,1], alpha [H,W,1], and the projection.

    `colors` are per-Gaussian RGB [N,3] (view-independent); `viewmat` is world-to-camera (OpenCV axes,
    as gsplat), `K` the pinhole intrinsics. `means2d` in the result keeps its gradient for densification."""
    proj = project(means, quats / quats.norm(dim=-1, keepdim=True), scales, viewmat, K, width, height, near_plane)
    rgb, depth, alpha = composite(proj["means2d"], proj["conics"], proj["depths"], proj["radii"], opacities, colors,
                                  width, height)
    if background is not None:
        rgb = rgb + (1 - alpha) * background
    return {"rgb": rgb, "depth": depth, "alpha": alpha, **proj}
