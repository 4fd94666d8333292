"""Toy-world training/evaluation images: exact renders with captions and depth."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from piva.toyworld.scenes import ELEVATION_RANGE, IMAGE_SIZE, Camera, Scene, all_scenes, render, toy_camera


def random_camera(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Camera:
    """The toy camera at a random azimuth and an elevation in ELEVATION_RANGE (draws azimuth first)."""
    azimuth = rng.uniform(0, 360)
    return toy_camera(azimuth, rng.uniform(*ELEVATION_RANGE), size)


def make_dataset(
    n: int,
    seed: int = 0,
    scenes: Optional[Sequence[Scene]] = None,
    size: int = IMAGE_SIZE,
    progress: bool = False,
) -> dict:
    """n renders of random scenes from random upper-hemisphere cameras.

    Returns rgb [n,3,H,W] in [0,1], depth [n,1,H,W] (inf = background), alpha,
    object coverage, caption index per image and the caption list.
    """
    from tqdm.auto import tqdm

    scenes = list(scenes or all_scenes())
    captions = [s.caption for s in scenes]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(scenes), n)
    out = {k: [] for k in ("rgb", "depth", "alpha", "object")}
    for i in tqdm(idx, desc="rendering toy world", disable=not progress):
        scene = scenes[i]
        if scene.shape == "cube":
            scene = scene.with_(yaw=float(rng.uniform(0, math.pi / 2)))
        r = render(scene, random_camera(rng, size))
        out["rgb"].append(r["rgb"])
        for k in ("depth", "alpha", "object"):
            out[k].append(r[k])
    rgb = torch.from_numpy(np.stack(out["rgb"])).permute(0, 3, 1, 2).contiguous()
    rest = {k: torch.from_numpy(np.stack(out[k]))[:, None] for k in ("depth", "alpha", "object")}
    return {"rgb": rgb, **rest, "caption_index": torch.from_numpy(idx), "captions": captions}
