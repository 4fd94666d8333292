#!/usr/bin/env python
"""Which way does one guidance step move the red cube's colour? (probe for the 3D toy demo)

Prints, over 3 views x 8 noise draws, the mean descent direction on the object's pixels
(a) through the VAE encoder, what a NeRF receives by default, for several settings,
(b) the same latent step decoded by the VAE (`pixel_gradient="decoded"`), and
(c) whether the step stops once the cube is blue: the decoded descent on cubes coloured
along red -> blue -> beyond, for DDS with the shared noisy latent (`same_latent`, the
paper's trick) and with the true source latent.

    .venv/bin/python scripts/toy_gradient_direction.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from piva.guidance import GuidanceConfig, ScoreDistillation  # noqa: E402
from piva.toyworld.quality import load_toy_prior  # noqa: E402
from piva.toyworld.scenes import COLORS, Scene, render, toy_camera  # noqa: E402

CAMERAS = [toy_camera(az) for az in (30, 150, 260)]
VIEWS = [render(Scene.from_caption("a red cube"), cam) for cam in CAMERAS]


def mean_descent(mode: str, pixel_gradient: str = "encoder", views=VIEWS, same_latent: bool = True,
                 **kw) -> torch.Tensor:
    """Mean descent step (R, G, B) on the object's pixels; the source is always the red cube."""
    prior = load_toy_prior(controlnet=mode == "piva")  # a fresh prior: PiVa attaches its adapters to it
    sd = ScoreDistillation(prior, GuidanceConfig(mode=mode, source_prompt="a red cube", target_prompt="a blue cube",
                                                 use_controlnet=mode == "piva", same_latent=same_latent,
                                                 pixel_gradient=pixel_gradient, **kw))
    acc = torch.zeros(3)
    for view, source in zip(views, VIEWS):
        img = torch.from_numpy(view["rgb"]).permute(2, 0, 1)[None].float()
        src = torch.from_numpy(source["rgb"]).permute(2, 0, 1)[None].float()
        depth = torch.from_numpy(view["depth"])[None, None].float() if mode == "piva" else None
        obj = torch.from_numpy(view["alpha"]) > 0.5
        for k in range(8):
            x = img.clone().requires_grad_(True)
            out = sd.step(x, depth=depth, source_rgb=src, step=0, generator=torch.Generator().manual_seed(k))
            (g,) = torch.autograd.grad(out.loss, x)
            acc += g[0][:, obj].mean(1)
    return -acc / (len(views) * 8)


def descent_direction(mode: str, pixel_gradient: str = "encoder", **kw) -> torch.Tensor:
    d = mean_descent(mode, pixel_gradient, **kw)
    return d / d.norm()


for mode, scale, t_range in [("dds", 7.5, (0.02, 0.98)), ("piva", 7.5, (0.02, 0.98)), ("dds", 3.0, (0.02, 0.98)),
                             ("dds", 7.5, (0.02, 0.5)), ("dds", 7.5, (0.5, 0.98))]:
    d = descent_direction(mode, guidance_scale=scale, t_range=t_range)
    print(f"{mode} CFG {scale} t {t_range} through the encoder (R,G,B): {d.numpy().round(2)}", flush=True)
print(f"dds CFG 7.5 decoded latent step (R,G,B): {descent_direction('dds', 'decoded').numpy().round(2)}")
wanted = torch.tensor(COLORS["blue"]) - torch.tensor(COLORS["red"])
print(f"red -> blue (R,G,B): {(wanted / wanted.norm()).numpy().round(2)}")

# (c) Does the step stop at blue? Cubes coloured along the path; the source stays the red cube.
blue = torch.tensor(COLORS["blue"])
path = {"red": COLORS["red"], "purple": (0.48, 0.18, 0.48), "blue": COLORS["blue"],
        "light blue": (0.5, 0.7, 0.95), "pale cyan": (0.86, 0.99, 0.99)}
for same_latent in (True, False):
    for name, colour in path.items():
        COLORS["probe"] = colour
        d = mean_descent("dds", "decoded", views=[render(Scene("cube", "probe"), cam) for cam in CAMERAS],
                         same_latent=same_latent)
        to_blue = blue - torch.tensor(colour)
        cos = float(d @ to_blue / (d.norm() * to_blue.norm())) if to_blue.norm() > 0 else float("nan")
        print(f"same_latent={same_latent!s:5} at {name:10} decoded descent {d.numpy().round(3)} "
              f"|step| {d.norm():.3f}  cos(towards blue) {cos:+.2f}", flush=True)
