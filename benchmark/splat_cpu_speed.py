"""Time of piva's CPU splat rasteriser per view (forward + backward), against every-pair compositing.

A toy-world object's splats: N Gaussians filling a ball of radius 0.5 seen from 3.6 units at a
40° field of view (the toy cameras), sizes like a fitted splatfacto scene's. "every pair" composites
every pixel against every Gaussian (piva's first CPU rasteriser); "lists" is `splat_cpu.rasterize`
(each pixel against the Gaussians that reach it). Figures are medians of --repeats, measured in turn.

    .venv/bin/python benchmark/splat_cpu_speed.py [--sizes 32,64,128] [--gaussians 2000,6000]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from piva.nerfstudio import splat_cpu


def toy_splats(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(n, 3, generator=g)
    radius = 0.5 * torch.rand(n, 1, generator=g) ** (1 / 3)
    means = direction / direction.norm(dim=1, keepdim=True) * radius + torch.tensor([0.0, 0.0, 3.6])
    return dict(means=means, quats=torch.randn(n, 4, generator=g),
                scales=torch.exp(torch.randn(n, 3, generator=g) * 0.4 + math.log(0.5 / n ** (1 / 3))),
                opacities=torch.rand(n, generator=g) * 0.9 + 0.05, colors=torch.rand(n, 3, generator=g))


def every_pair(p: dict, K: torch.Tensor, size: int) -> torch.Tensor:
    proj = splat_cpu.project(p["means"], p["quats"] / p["quats"].norm(dim=-1, keepdim=True), p["scales"], torch.eye(4), K,
                             size, size)
    order = torch.argsort(torch.where(proj["radii"] > 0, proj["depths"], torch.full_like(proj["depths"], float("inf"))))
    mu, conic = proj["means2d"][order], proj["conics"][order]
    ys, xs = torch.meshgrid(torch.arange(size, dtype=mu.dtype), torch.arange(size, dtype=mu.dtype), indexing="ij")
    d = torch.stack([xs, ys], -1).reshape(-1, 1, 2) + 0.5 - mu[None]
    q = 0.5 * (conic[:, 0] * d[..., 0] ** 2 + conic[:, 2] * d[..., 1] ** 2) + conic[:, 1] * d[..., 0] * d[..., 1]
    alpha = torch.clamp_max(p["opacities"][order][None] * torch.exp(-q), splat_cpu.ALPHA_MAX)
    alpha = torch.where((q >= 0) & (alpha >= splat_cpu.ALPHA_MIN), alpha, torch.zeros_like(alpha))
    w = alpha * torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
    return (w @ p["colors"][order]).sum() + ((w @ proj["depths"][order][:, None]) / w.sum(1, keepdim=True).clamp_min(1e-10)).mean()


def one_view(params: dict, size: int, lists: bool) -> float:
    f = 0.5 * size / math.tan(math.radians(40) / 2)
    K = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    start = time.perf_counter()
    if lists:
        out = splat_cpu.rasterize(**p, viewmat=torch.eye(4), K=K, width=size, height=size)
        loss = out["rgb"].sum() + out["depth"].mean()
    else:
        loss = every_pair(p, K, size)
    loss.backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64,128")
    ap.add_argument("--gaussians", default="2000,6000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'px':>4} {'N':>6} {'every pair s':>13} {'lists s':>8} {'speed-up':>9}")
    for n in (int(x) for x in args.gaussians.split(",")):
        params = toy_splats(n)
        for size in (int(x) for x in args.sizes.split(",")):
            times = {}
            for lists in (False, True):
                if not lists and size * size * n > 64 * 64 * 6000:
                    continue  # every pair at this size needs many GB
                one_view(params, size, lists)  # warm-up
                times[lists] = sorted(one_view(params, size, lists) for _ in range(args.repeats))[args.repeats // 2]
            dense = f"{times[False]:13.3f}" if False in times else f"{'(memory)':>13}"
            ratio = f"{times[False] / times[True]:9.1f}" if False in times else f"{'':>9}"
            print(f"{size:>4} {n:>6} {dense} {times[True]:8.3f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
