"""piva's CPU splat rasteriser against a hand computation (EWA projection, front-to-back compositing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from piva.nerfstudio import splat_cpu


def _hand_render(means, scales, opacities, colors, f, c, size, background, antialiased=False):
    """Isotropic Gaussians seen by a camera at the origin looking down +z (OpenCV), pixel by pixel.
    `antialiased` scales each opacity by sqrt(det Σ / det(Σ + 0.3 I)) (Mip-Splatting's 2D filter, gsplat's mode)."""
    gaussians = []
    for m, s, o, col in zip(means, scales, opacities, colors):
        x, y, z = m
        J = np.array([[f / z, 0, -f * x / z**2], [0, f / z, -f * y / z**2]])
        splat = s**2 * J @ J.T
        cov = splat + 0.3 * np.eye(2)  # EWA splat plus gsplat's 0.3 px^2 blur
        if antialiased:
            o = o * math.sqrt(np.linalg.det(splat) / np.linalg.det(cov))
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


@pytest.mark.parametrize("antialiased", [False, True])
def test_rasteriser_matches_a_hand_computation(antialiased):
    means = [(0.0, 0.0, 2.0), (0.15, 0.05, 3.0), (-0.2, 0.1, 2.5), (0.35, -0.35, 2.0)]
    scales = [0.1, 0.2, 0.08, 0.01]  # the last one under a pixel: the modes differ most there
    opacities = [0.8, 0.6, 0.9, 0.9]
    colors = [(1.0, 0.1, 0.1), (0.1, 0.2, 1.0), (0.2, 0.9, 0.3), (0.9, 0.9, 0.1)]
    f, c, size, bg = 20.0, 8.0, 16, np.array([0.92, 0.92, 0.92])
    K = torch.tensor([[f, 0, c], [0, f, c], [0, 0, 1.0]], dtype=torch.float64)
    rgb, depth, acc = _hand_render(means, scales, opacities, colors, f, c, size, bg, antialiased=antialiased)
    assert acc.max() > 0.5 and (acc < 1e-3).mean() > 0.2  # the Gaussians overlap some pixels and miss others
    out = splat_cpu.rasterize(
        torch.tensor(means, dtype=torch.float64), torch.tensor([[1.0, 0, 0, 0]] * 4, dtype=torch.float64),
        torch.tensor(scales, dtype=torch.float64)[:, None].repeat(1, 3), torch.tensor(opacities, dtype=torch.float64),
        torch.tensor(colors, dtype=torch.float64), torch.eye(4, dtype=torch.float64), K, size, size,
        background=torch.tensor(bg), antialiased=antialiased)
    np.testing.assert_allclose(out["alpha"].numpy(), acc, atol=1e-9)
    np.testing.assert_allclose(out["rgb"].numpy(), rgb, atol=1e-9)
    np.testing.assert_allclose(out["depth"].numpy(), depth, atol=1e-9)
    # The sub-pixel Gaussian: classic keeps its peak opacity over the whole blurred footprint, antialiased
    # scales it down to keep its mass (here by ~sqrt((0.1^2)^2 / (0.1^2 + 0.3)^2) = 0.03: under 1/255 after that).
    peak = acc[4, 11, 0]  # its centre: pixel (11.5, 4.5)
    assert (peak < 0.05) if antialiased else (peak > 0.5)


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


def _every_pair(proj, opacities, colors, width, height):
    """Compositing written out over every (pixel, Gaussian) pair: no lists, nothing skipped but alpha < 1/255."""
    order = torch.argsort(proj["depths"])
    mu, conic = proj["means2d"][order], proj["conics"][order]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=mu.dtype), torch.arange(width, dtype=mu.dtype), indexing="ij")
    d = torch.stack([xs, ys], -1).reshape(-1, 1, 2) + 0.5 - mu[None]
    q = 0.5 * (conic[:, 0] * d[..., 0] ** 2 + conic[:, 2] * d[..., 1] ** 2) + conic[:, 1] * d[..., 0] * d[..., 1]
    alpha = torch.clamp_max(opacities[order][None] * torch.exp(-q), 0.999)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))
    before = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    w = alpha * before
    acc = w.sum(1, keepdim=True)
    return {"rgb": (w @ colors[order] + (1 - acc)).reshape(height, width, 3), "alpha": acc.reshape(height, width, 1),
            "depth": ((w @ proj["depths"][order][:, None]) / acc.clamp_min(1e-10)).reshape(height, width, 1)}


def test_per_pixel_lists_equal_every_pair():
    """The rasteriser composites each pixel's own list of Gaussians; the sums over every pair must agree, with gradients."""
    g = torch.Generator().manual_seed(3)
    n, width, height = 300, 40, 35
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([1.4, 1.4, 0.6], dtype=torch.float64)
    params = dict(means=means + torch.tensor([0, 0, 3.0], dtype=torch.float64),
                  quats=torch.randn(n, 4, generator=g, dtype=torch.float64),
                  scales=torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.06 + 0.005,
                  opacities=torch.rand(n, generator=g, dtype=torch.float64), colors=torch.rand(n, 3, generator=g, dtype=torch.float64))
    K = torch.tensor([[50.0, 0, 20], [0, 50.0, 20], [0, 0, 1]], dtype=torch.float64)
    view, weights = torch.eye(4, dtype=torch.float64), torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    results = []
    for reference in (False, True):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        if reference:
            proj = splat_cpu.project(p["means"], p["quats"] / p["quats"].norm(dim=-1, keepdim=True), p["scales"], view, K, width, height)
            out = _every_pair(proj, p["opacities"], p["colors"], width, height)
        else:
            out = splat_cpu.rasterize(**p, viewmat=view, K=K, width=width, height=height, background=torch.ones(3, dtype=torch.float64))
        ((out["rgb"] * weights).sum() + out["depth"].sum()).backward()
        results.append((out, {k: v.grad for k, v in p.items()}))
    (out, grads), (want, want_grads) = results
    assert 0.2 < (want["alpha"] > 0.05).double().mean() < 0.95  # some pixels covered, some not
    for key in ("rgb", "depth", "alpha"):
        torch.testing.assert_close(out[key], want[key], atol=1e-10, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_an_edit_reads_how_the_source_splats_were_trained(tmp_path, mode):
    """`ns-train piva-splat` draws the scene in the mode its splatfacto run was trained with: read from the
    config.yml nerfstudio saved beside the run's nerfstudio_models folder."""
    from piva.nerfstudio import runs
    from piva.nerfstudio.splat_model import trained_rasterize_mode

    cfg = runs.splat_source_config(runs.ObjectScene(tmp_path / "data"), tmp_path / "runs")
    cfg.pipeline.model.rasterize_mode = mode
    cfg.set_timestamp()
    cfg.save_config()
    ckpt = cfg.get_base_dir() / "nerfstudio_models" / "step-000000600.ckpt"
    assert trained_rasterize_mode(ckpt) == mode
    assert trained_rasterize_mode(tmp_path / "elsewhere" / "nerfstudio_models" / "step-1.ckpt") is None
    # what a fresh edit does with it: the edit's model (antialiased by default) takes the source's mode
    from types import SimpleNamespace

    from piva.nerfstudio.piva_trainer import PivaTrainer
    from piva.nerfstudio.splat_model import PivaSplatfactoModelConfig

    edit_model = PivaSplatfactoModelConfig()
    assert edit_model.rasterize_mode == "antialiased"
    PivaTrainer._follow_trained_rasterize_mode(SimpleNamespace(pipeline=SimpleNamespace(model=SimpleNamespace(
        config=edit_model))), ckpt)
    assert edit_model.rasterize_mode == mode
