"""Gaussian splats rasterised on CPU at toy sizes: depth-sorted alpha compositing.

gsplat's rasteriser is CUDA-only (on CPU it tries to JIT-compile its kernels and fails), and
its pure-torch reference `_rasterize_to_pixels` still calls a CUDA kernel for the tile lists.
Its projection reference (`_fully_fused_projection`: 3D covariance → 2D conic, depth, radius,
with the same 0.3 px² blur) runs on CPU and is used as it is; what is written here is only the
compositing: each pixel against the Gaussians that reach it, batched over pixels in plain torch
(autograd gives the backward). Fine at 32–128 px with thousands of Gaussians, not at 512 px
(use a GPU).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0  # gsplat skips contributions below this
ALPHA_MAX = 0.999  # and clamps alpha here


def project(means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
            near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
            antialiased: bool = False) -> Dict[str, Tensor]:
    """gsplat's pure-torch projection of N Gaussians into one camera: means2d [N,2], conics [N,3], depths [N], radii [N]
    (and means2d_batched [1,N,2], the tensor means2d is a view of: what a densification strategy reads the gradient of).

    `antialiased` also returns gsplat's opacity compensation [N], sqrt(det Σ2d / det(Σ2d + eps2d I)): the blur
    then keeps each Gaussian's footprint mass, so a scene drawn below its training resolution does not swell."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False, triu=False)
    radii, means2d, depths, conics, compensations = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane,
        calc_compensations=antialiased)
    out = {"means2d": means2d[0], "means2d_batched": means2d, "conics": conics[0], "depths": depths[0], "radii": radii[0]}
    if antialiased:
        out["compensations"] = compensations[0]
    return out


def footprints(means2d: Tensor, conics: Tensor, opacities: Tensor, width: int, height: int) -> Tuple[Tensor, Tensor]:
    """Every (pixel, Gaussian) pair whose alpha reaches ALPHA_MIN: pixel ids (row-major) and Gaussian ids.

    opacity·exp(-σ) ≥ 1/255 only inside the ellipse σ ≤ ln(255·opacity); its axis-aligned box,
    sqrt(2 ln(255·opacity) Σ_xx) by sqrt(2 ln(255·opacity) Σ_yy) around the mean, is enumerated
    and each pixel centre tested exactly, so nothing the dense sums would count is dropped."""
    a, b, c = conics[:, 0], conics[:, 1], conics[:, 2]
    level = torch.log(torch.clamp_min(opacities / ALPHA_MIN, 1.0))
    det = torch.clamp_min(a * c - b * b, 1e-20)
    reach_x, reach_y = torch.sqrt(2 * level * c / det), torch.sqrt(2 * level * a / det)
    x0 = torch.clamp(torch.ceil(means2d[:, 0] - reach_x - 0.5), 0, width).long()
    x1 = torch.clamp(torch.floor(means2d[:, 0] + reach_x - 0.5), -1, width - 1).long()
    y0 = torch.clamp(torch.ceil(means2d[:, 1] - reach_y - 0.5), 0, height).long()
    y1 = torch.clamp(torch.floor(means2d[:, 1] + reach_y - 0.5), -1, height - 1).long()
    w, h = torch.clamp_min(x1 - x0 + 1, 0), torch.clamp_min(y1 - y0 + 1, 0)
    boxes = w * h
    gid = torch.repeat_interleave(torch.arange(len(boxes)), boxes)
    k = torch.arange(len(gid)) - (torch.cumsum(boxes, 0) - boxes)[gid]
    x, y = x0[gid] + k % w[gid], y0[gid] + torch.div(k, w[gid], rounding_mode="floor")
    dx, dy = x + 0.5 - means2d[gid, 0], y + 0.5 - means2d[gid, 1]
    sigma = 0.5 * (a[gid] * dx**2 + c[gid] * dy**2) + b[gid] * dx * dy
    keep = (sigma >= 0) & (opacities[gid] * torch.exp(-sigma) >= ALPHA_MIN)
    return (y * width + x)[keep], gid[keep]


def composite(means2d: Tensor, conics: Tensor, depths: Tensor, radii: Tensor, opacities: Tensor, colors: Tensor,
              width: int, height: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Front-to-back alpha compositing of projected Gaussians at every pixel centre.

    Each pixel composites only the Gaussians that reach it (`footprints`), in depth order, padded to
    the busiest pixel: the same sums as over every (pixel, Gaussian) pair, in a fraction of the time
    and memory once the Gaussians are small against the image.
    Returns colour [H,W,C] (not yet on a background), expected depth [H,W,1] (depth accumulated
    with the same weights, divided by the alpha, as gsplat's "ED" mode) and alpha [H,W,1]."""
    visible = radii > 0
    order = torch.argsort(torch.where(visible, depths, torch.full_like(depths, float("inf"))))
    order = order[visible[order]]
    zeros = colors.new_zeros(height, width, colors.shape[-1])
    if order.numel() == 0:
        return zeros, zeros[..., :1], zeros[..., :1]
    mu, conic, op, col, z = means2d[order], conics[order], opacities[order], colors[order], depths[order]

    with torch.no_grad():  # each pixel's Gaussians (depth order) and their slot in that pixel's row
        pix, gid = footprints(mu, conic, op, width, height)
        if gid.numel() == 0:
            return zeros, zeros[..., :1], zeros[..., :1]
        pairs = torch.argsort(pix * len(order) + gid)  # by pixel, then front to back
        pix, gid = pix[pairs], gid[pairs]
        counts = torch.bincount(pix, minlength=height * width)
        row = (torch.cumsum(counts > 0, 0) - 1)[pix]  # rows only for the pixels something reaches
        slot = torch.arange(len(pix)) - (torch.cumsum(counts, 0) - counts)[pix]
        most = int(counts.max())
        cell = row * most + slot
        rows = int(row[-1]) + 1
        centre = torch.stack([pix % width, torch.div(pix, width, rounding_mode="floor")], -1).to(mu.dtype) + 0.5

    # Per pair (nothing padded where gradients are gathered), then one padded table for the running product.
    d = centre - mu[gid]
    cq = conic[gid]
    sigma = 0.5 * (cq[:, 0] * d[:, 0] ** 2 + cq[:, 2] * d[:, 1] ** 2) + cq[:, 1] * d[:, 0] * d[:, 1]
    alpha = torch.clamp_max(op[gid] * torch.exp(-sigma), ALPHA_MAX)  # ≥ ALPHA_MIN: footprints kept only those
    table = alpha.new_zeros(rows * most).index_put((cell,), alpha).view(rows, most)
    trans = torch.cumprod(torch.cat([torch.ones_like(table[:, :1]), 1 - table[:, :-1]], 1), 1)  # T before each
    weights = alpha * trans.reshape(-1)[cell]
    rgb = colors.new_zeros(height * width, colors.shape[-1]).index_add(0, pix, weights[:, None] * col[gid])
    acc = alpha.new_zeros(height * width).index_add(0, pix, weights)
    depth = alpha.new_zeros(height * width).index_add(0, pix, weights * z[gid]) / acc.clamp_min(1e-10)
    return rgb.reshape(height, width, -1), depth.reshape(height, width, 1), acc.reshape(height, width, 1)


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor, viewmat: Tensor,
              K: Tensor, width: int, height: int, background: Optional[Tensor] = None,
              near_plane: float = 0.01, antialiased: bool = False) -> Dict[str, Tensor]:
    """One view of N Gaussians: rgb [H,W,3] on `background`, depth [H,W,1], alpha [H,W,1], and the projection.

    `colors` are per-Gaussian RGB [N,3] (view-independent); `viewmat` is world-to-camera (OpenCV axes,
    as gsplat), `K` the pinhole intrinsics. `means2d` in the result keeps its gradient for densification.
    `antialiased`: gsplat's (and splatfacto's) rasterize_mode "antialiased", opacities times the compensation."""
    proj = project(means, quats / quats.norm(dim=-1, keepdim=True), scales, viewmat, K, width, height, near_plane,
                   antialiased=antialiased)
    if antialiased:
        opacities = opacities * proj["compensations"]
    rgb, depth, alpha = composite(proj["means2d"], proj["conics"], proj["depths"], proj["radii"], opacities, colors,
                                  width, height)
    if background is not None:
        rgb = rgb + (1 - alpha) * background
    return {"rgb": rgb, "depth": depth, "alpha": alpha, **proj}
