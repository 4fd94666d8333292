"""Cameras on the upper hemisphere and the nerfstudio/Blender `transforms.json` writer.

World is z-up; cameras use the OpenGL convention (x right, y up, looking down -z),
as nerfstudio's Blender parser and threestudio expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np

from piva.data.cameras import look_at  # noqa: F401 (re-exported: one camera convention for the whole project)
from piva.io import atomic_write_json


@dataclass
class Camera:
    c2w: np.ndarray  # 4x4, OpenGL convention (x right, y up, looking down -z)
    fov_y: float  # degrees
    width: int
    height: int

    @property
    def focal(self) -> float:
        return 0.5 * self.height / math.tan(math.radians(self.fov_y) / 2)


def hemisphere_cameras(
    n: int,
    size: int = 32,
    fov_y: float = 40.0,
    distance: float = 3.6,
    elevation: Sequence[float] = (10.0, 60.0),
    seed: Optional[int] = 0,
) -> list[Camera]:
    """Random cameras on the upper hemisphere (seed=None: evenly spaced azimuths, mid elevation)."""
    if seed is None:
        return [
            Camera(look_at(360.0 * i / n, float(np.mean(elevation)), distance), fov_y, size, size) for i in range(n)
        ]
    rng = np.random.default_rng(seed)
    return [
        Camera(look_at(rng.uniform(0, 360), rng.uniform(*elevation), distance), fov_y, size, size) for _ in range(n)
    ]


def camera_rays(cam: Camera, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World-space ray origins and unit directions [H*s*W*s, 3], pixel centres, row-major."""
    h, w = cam.height * supersample, cam.width * supersample
    f = cam.focal * supersample
    j, i = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    dirs = np.stack([(i - w / 2) / f, -(j - h / 2) / f, -np.ones_like(i)], -1)
    dirs = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    d = dirs @ cam.c2w[:3, :3].T
    o = np.broadcast_to(cam.c2w[:3, 3], d.shape)
    return o.reshape(-1, 3), d.reshape(-1, 3)


def write_blender_dataset(
    out_dir: Union[str, Path],
    splits: Mapping[str, Sequence[Camera]],
    render_fn: Callable[[Camera], Mapping[str, np.ndarray]],
    rgba: bool = False,
    meta: Optional[dict] = None,
    progress: bool = False,
) -> Path:
    """Write `transforms_{split}.json` + `{split}/r_i.png` for each split (square images).

    `render_fn(cam)` returns rgb [H,W,3] in [0,1], alpha [H,W], depth [H,W] (z-depth,
    inf = background) and any extra [H,W] maps; everything but rgb goes to
    `{split}/r_i_exact.npz` beside the image. With `rgba` the PNG carries alpha
    (Blender convention, nerfstudio composites it on its background colour).
    """
    import imageio.v3 as iio

    out = Path(out_dir)
    transforms = {}
    for split, cams in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        frames = []
        it = cams
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(cams, desc=f"rendering {split} views")
        for i, cam in enumerate(it):
            r = dict(render_fn(cam))
            rgb = np.asarray(r.pop("rgb"), np.float32)
            if rgba:
                rgb = np.concatenate([rgb, np.asarray(r["alpha"], np.float32)[..., None]], -1)
            iio.imwrite(out / split / f"r_{i}.png", (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
            np.savez_compressed(out / split / f"r_{i}_exact.npz", **{k: np.asarray(v) for k, v in r.items()})
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": cam.c2w.tolist()})
        fov = cams[0].fov_y if cams else 40.0
        transforms[split] = {"camera_angle_x": math.radians(fov), "frames": frames}
    # The transforms files are written last and atomically: callers take `transforms_train.json`
    # as the sign of a finished dataset, so a killed run must not leave it before every image.
    for split, data in transforms.items():
        atomic_write_json(out / f"transforms_{split}.json", data)
    if meta is not None:
        atomic_write_json(out / "scene.json", meta)
    return out
