"""piva's CPU splat rasteriser against a hand computation (EWA projection, front-to-back compositing)."""

from __future__ import annotations

import math

import numpy as np
import torch

from piva.nerfstudio import splat_cpu


def _hand_render(means, scales, opacities, colors, f, c, size, background):
    """Isotropic Gaussians seen by a camera at the origin looking down +z (OpenCV), pixel by pixel."""
    gaussians = []
    for m, s, o, col in zip(means, scales, opacities, colors):
        x, y, z = m
        J = np.array([[f / z, 0, -f * x / z**2], [0, f / z, -f * y / z**2]])
        cov = s**2 * J @ J.T + 0.3 * np.eye(2)  # EWA splat plus gsplat's 0.3 px^2 blur
        gaussians.append((z, np.array([f * x / z + c, f * y / z + c]), np.linalg.inv(cov), o, np.array(col)))
    gaussians.sort(key=lambda g: g[0])  # nearest first
    rgb = np.zeros((size, size, 3))
    depth = np.zeros((size, size, 1))
    acc = np.zeros((size, size, 1))
    for v in range(size):
        for u in range(size):
            p = np.array([u + 0.5, v + 0.5])
            T = 1.0
            for z, mu, inv, o, col in gaussians:
                d = p - mu
                a = min(0.999, o * math.exp(-0.5 * d @ inv @ d))
                if a < 1 / 255:
                    continue
                rgb[v, u] += T * a * col
                depth[v, u] += T * a * z
                acc[v, u] += T * a
                T *= 1 - a
            depth[v, u] /= max(acc[v, u, 0], 1e-10)
            rgb[v, u] += (1 - acc[v, u]) * background
    return rgb, depth, acc


def test_dense_rasteriser_matches_a_hand_computation():
    means = [(0.0, 0.0, 2.0), (0.15, 0.05, 3.0), (-0.2, 0.1, 2.5)]
    scales = [0.1, 0.2, 0.08]
    opacities = [0.8, 0.6, 0.9]
    colors = [(1.0, 0.1, 0.1), (0.1, 0.2, 1.0), (0.2, 0.9, 0.3)]
    f, c, size, bg = 20.0, 8.0, 16, np.array([0.92, 0.92, 0.92])
    K = torch.tensor([[f, 0, c], [0, f, c], [0, 0, 1.0]], dtype=torch.float64)
    out = splat_cpu.rasterize(
        torch.tensor(means, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]] * 3, dtype=torch.float64),
        torch.tensor(scales, dtype=torch.float64)[:, None].repeat(1, 3), torch.tensor(opacities, dtype=torch.float64),
        torch.tensor(colors, dtype=torch.float64), torch.eye(4, dtype=torch.float64), K, size, size,
        background=torch.tensor(bg))
    rgb, depth, acc = _hand_render(means, scales, opacities, colors, f, c, size, bg)
    assert acc.max() > 0.5 and (acc < 1e-3).mean() > 0.2  # the Gaussians overlap some pixels and miss others
    np.testing.assert_allclose(out["alpha"].numpy(), acc, atol=1e-9)
    np.testing.assert_allclose(out["rgb"].numpy(), rgb, atol=1e-9)
    np.testing.assert_allclose(out["depth"].numpy(), depth, atol=1e-9)


def test_rasteriser_gradients_reach_every_parameter():
    g = torch.Generator().manual_seed(0)
    n = 20
    means = (torch.rand(n, 3, generator=g) - 0.5) * torch.tensor([0.6, 0.6, 0.4]) + torch.tensor([0, 0, 2.5])
    params = {
        "means": means.requires_grad_(True),
        "quats": torch.randn(n, 4, generator=g).requires_grad_(True),
        "scales": torch.full((n, 3), 0.08).requires_grad_(True),
        "opacities": torch.full((n,), 0.5).requires_grad_(True),
        "colors": torch.rand(n, 3, generator=g).requires_grad_(True),
    }
    K = torch.tensor([[30.0, 0, 12], [0, 30.0, 12], [0, 0, 1]])
    out = splat_cpu.rasterize(**params, viewmat=torch.eye(4), K=K, width=24, height=24, background=torch.ones(3))
    out["means2d"].retain_grad()
    (out["rgb"].sum() + out["depth"].sum()).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert out["means2d"].grad.abs().sum() > 0  # what splatfacto's densification reads
    behind = splat_cpu.rasterize(**{k: v.detach() for k, v in params.items()}, viewmat=torch.diag(torch.tensor([1.0, 1, -1, 1])),
                                 K=K, width=24, height=24)
    assert behind["alpha"].abs().max() == 0  # everything behind the camera: nothing drawn
