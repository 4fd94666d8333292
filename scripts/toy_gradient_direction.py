#!/usr/bin/env python
"""Which way does one guidance step move the red cube's colour? (session 3 probe for the 3D demo)

Prints, over 3 views x 8 noise draws, the mean descent direction on the object's pixels
(a) through the VAE encoder (what a NeRF receives) and (b) the latent step decoded by the VAE.
    .venv/bin/python scripts/toy_gradient_direction.py
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch, sys
from piva.toyworld.scenes import Camera, look_at, Scene, render
from piva.toyworld.quality import load_toy_prior
from piva.guidance import GuidanceConfig, ScoreDistillation
cams = [Camera(look_at(az, 30.0, 3.6), 40.0, 32, 32) for az in (30, 150, 260)]
imgs = [render(Scene.from_caption("a red cube"), c) for c in cams]
for mode, cfg_scale, tr in [("dds", 7.5, (0.02, 0.98)), ("piva", 7.5, (0.02, 0.98)), ("dds", 3.0, (0.02, 0.98)),
                         ("dds", 7.5, (0.02, 0.5)), ("dds", 7.5, (0.5, 0.98))]:
    sd = ScoreDistillation(load_toy_prior(controlnet=(mode == "piva")), GuidanceConfig(mode=mode, source_prompt="a red cube", target_prompt="a blue cube",
                           guidance_scale=cfg_scale, t_range=tr, use_controlnet=(mode == "piva"), same_latent=True))
    acc = torch.zeros(3)
    for r in imgs:
        img = torch.from_numpy(r["rgb"]).permute(2, 0, 1)[None].float()
        depth = torch.from_numpy(r["depth"])[None, None].float()
        obj = torch.from_numpy(r["alpha"]) > 0.5
        for k in range(8):
            xi = img.clone().requires_grad_(True)
            out = sd.step(xi, depth=depth if mode == "piva" else None, source_rgb=img, step=0, generator=torch.Generator().manual_seed(k))
            (gi,) = torch.autograd.grad(out.loss, xi)
            acc += gi[0][:, obj].mean(1)
    d = -acc / acc.norm()  # descent direction
    print(mode, cfg_scale, tr, "descent dir on object (R,G,B):", d.numpy().round(2), flush=True)
t = torch.tensor([0.12, 0.25, 0.85]) - torch.tensor([0.85, 0.12, 0.10]); print("wanted:", (t / t.norm()).numpy().round(2))

# decoder view: the same DDS latent gradient, decoded (D(z - eta g) - D(z)) on the object
prior = load_toy_prior(controlnet=False)
sd = ScoreDistillation(prior, GuidanceConfig(mode="dds", source_prompt="a red cube", target_prompt="a blue cube", same_latent=True))
acc = torch.zeros(3)
for r in imgs:
    img = torch.from_numpy(r["rgb"]).permute(2, 0, 1)[None].float()
    obj = torch.from_numpy(r["alpha"]) > 0.5
    with torch.no_grad():
        z = prior.vae.encode(img * 2 - 1).latent_dist.mean * prior.vae.config.scaling_factor
    for k in range(8):
        zi = z.clone().requires_grad_(True)
        out = sd.step(latents=zi, source_latents=z, step=0, generator=torch.Generator().manual_seed(k))
        if out is None: print("no latent API"); break
        (g,) = torch.autograd.grad(out.loss, zi)
        with torch.no_grad():
            dec = lambda zz: (prior.vae.decode(zz / prior.vae.config.scaling_factor).sample + 1) / 2
            acc += (dec(z - 0.05 * g / g.norm() * z.norm()) - dec(z))[0][:, obj].mean(1)
print("decoded latent step on object (R,G,B):", (acc / acc.norm()).numpy().round(2))
