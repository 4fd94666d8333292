"""Blender-layout posed images (NeRF synthetic, Noe's prepared views) for `piva-blender-datamodule`.

Cameras are `piva.data.views.Camera` and every ray comes from `piva.data.views.camera_rays`,
the same camera code that wrote Noe's and the toy world's datasets. No threestudio needed;
`data.py` wraps `PosedImages` in threestudio's datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from piva.data.views import Camera, Views, camera_rays, load_rgba, read_views  # noqa: F401 (read_views, Views: re-exported)


@dataclass
class BlenderDataSettings:
    """The fields of `data` for `piva-blender-datamodule`."""

    dataroot: str = ""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    background_color: Tuple[float, float, float] = (1.0, 1.0, 1.0)  # the images' alpha is composited on this
    rays_per_batch: int = 4096  # random rays (from all training images) per step
    n_val_views: int = 4  # evenly spaced views of the val split rendered at each validation
    eval_downsample: int = 1  # render val/test views at 1/eval_downsample resolution


def image_rays(cam: Camera) -> Tuple[torch.Tensor, torch.Tensor]:
    """All rays of one camera as [H,W,3] origins and unit directions (the renderer's depth is distance along them)."""
    o, d = camera_rays(cam)
    shape = (cam.height, cam.width, 3)
    return torch.tensor(o.reshape(shape), dtype=torch.float32), torch.tensor(d.reshape(shape), dtype=torch.float32)


class PosedImages:
    """One split's images (RGB on the background, alpha as the mask) and cameras, optionally downsampled."""

    def __init__(self, root: Union[str, Path], split: str, background: Sequence[float], downsample: int = 1) -> None:
        views = read_views(root, split)
        rgbs, masks = zip(*(load_rgba(p, background) for p in views.image_paths))
        rgb, mask = torch.stack(rgbs), torch.stack(masks)  # [N,H,W,3], [N,H,W,1]
        first = views.cameras[0]
        if rgb.shape[1:3] != (first.height, first.width):
            raise ValueError(f"{split} images are {tuple(rgb.shape[1:3])}, the transforms say {first.height}x{first.width}")
        if downsample > 1:
            size = (first.height // downsample, first.width // downsample)
            rgb = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
            mask = F.interpolate(mask.permute(0, 3, 1, 2), size=size, mode="area").permute(0, 2, 3, 1)
        self.height, self.width = rgb.shape[1:3]
        # Same field of view at the new size: the focal length scales with the image.
        self.cameras = [Camera(c.c2w, c.fov_y, self.width, self.height) for c in views.cameras]
        self.c2w = torch.from_numpy(np.stack([c.c2w for c in self.cameras])).float()  # [N,4,4]
        self.rgb, self.mask = rgb, mask
        # Images without alpha (e.g. the toy world's RGB on its grey) say nothing about where empty space is.
        self.has_alpha = bool((mask < 1).any())
        # Camera-frame ray directions of every pixel, one grid per distinct field of view.
        fovs = sorted({c.fov_y for c in self.cameras})
        self._grids = torch.stack([image_rays(Camera(np.eye(4), f, self.width, self.height))[1] for f in fovs])
        self._grid_of = torch.tensor([fovs.index(c.fov_y) for c in self.cameras])

    def __len__(self) -> int:
        return len(self.cameras)

    def rays(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Origins and directions [H,W,3] of view k."""
        return image_rays(self.cameras[k])

    def random_rays(self, n: int, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """n random pixels of random views: rays_o, rays_d, rgb [n,3], mask [n,1] and where they are (index, v, u)."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        v = torch.randint(0, self.height, (n,), generator=generator)
        u = torch.randint(0, self.width, (n,), generator=generator)
        d_cam = self._grids[self._grid_of[idx], v, u]
        rays_d = (self.c2w[idx, :3, :3] @ d_cam.unsqueeze(-1)).squeeze(-1)
        return {"rays_o": self.c2w[idx, :3, 3], "rays_d": rays_d, "rgb": self.rgb[idx, v, u], "mask": self.mask[idx, v, u],
                "index": idx, "v": v, "u": u}
