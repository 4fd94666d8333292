"""Blender-layout posed images (NeRF synthetic, Noe's prepared views) for `piva-blender-datamodule`.

Cameras are `piva.data.views.Camera` and every ray comes from `piva.data.views.camera_rays`,
the same camera code that wrote Noe's and the toy world's datasets. No threestudio needed;
`data.py` wraps `PosedImages` in threestudio's datasets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from piva.data.views import Camera, camera_rays


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


@dataclass
class Views:
    """One split: a camera per image (OpenGL camera-to-world in threestudio's and Blender's z-up world)."""

    cameras: List[Camera]
    image_paths: List[Path]


def _image_path(root: Path, file_path: str) -> Path:
    p = (root / file_path).resolve()
    if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file():
        return p
    for ext in (".png", ".jpg", ".jpeg"):
        if p.with_name(p.name + ext).is_file():
            return p.with_name(p.name + ext)
    return p


def _fov_y(meta: dict, frame: dict, w: int, h: int, path: Path) -> float:
    """Vertical field of view (degrees) of a centred, square-pixel pinhole: what `Camera` describes."""
    get = lambda k: frame.get(k, meta.get(k))  # noqa: E731 - per-frame value or the shared one
    if get("camera_angle_x") is not None:
        fx = fy = 0.5 * w / math.tan(0.5 * float(get("camera_angle_x")))
        if get("camera_angle_y") is not None:
            fy = 0.5 * h / math.tan(0.5 * float(get("camera_angle_y")))
        cx, cy = w / 2.0, h / 2.0
    else:
        fx, fy, cx, cy = (float(get(k)) for k in ("fl_x", "fl_y", "cx", "cy"))
    if abs(fx - fy) > 1e-3 * fx or abs(cx - w / 2.0) > 1e-3 or abs(cy - h / 2.0) > 1e-3:
        raise ValueError(
            f"{path}: only centred pinholes with square pixels are supported "
            f"(fx={fx:g}, fy={fy:g}, cx={cx:g}, cy={cy:g} for {w}x{h})"
        )
    return math.degrees(2.0 * math.atan(0.5 * h / fy))


def read_views(root: Union[str, Path], split: str = "train") -> Views:
    """Read `transforms_<split>.json` (Blender: camera_angle_x) or `transforms.json` (fl_x/fl_y/cx/cy).

    Poses are kept exactly as written: the object stays at the origin, where
    threestudio's random and evaluation cameras look (threestudio's own multiview
    loader re-centres on the mean camera position, which moves an object seen
    from the upper hemisphere off the origin).
    """
    root = Path(root)
    path = root / f"transforms_{split}.json"
    if not path.is_file():
        path = root / "transforms.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} has neither transforms_{split}.json nor transforms.json: expected a Blender-layout dataset"
        )
    meta = json.loads(path.read_text())
    frames = meta.get("frames") or []
    if not frames:
        raise ValueError(f"{path} lists no frames")
    if meta.get("camera_model", "PINHOLE") not in ("PINHOLE", "OPENCV", "SIMPLE_PINHOLE"):
        raise ValueError(f"{path}: camera_model {meta['camera_model']!r} is not a pinhole camera")
    if any(abs(float(meta.get(k, 0.0))) > 1e-9 for k in ("k1", "k2", "k3", "p1", "p2")):
        raise ValueError(f"{path}: lens distortion is not supported; undistort the images first")
    paths = [_image_path(root, f["file_path"]) for f in frames]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {path.name} are missing, e.g. {missing[0]}")
    w, h = meta.get("w"), meta.get("h")
    if w is None or h is None:
        import imageio.v3 as iio

        h, w = iio.improps(paths[0]).shape[:2]
    w, h = int(w), int(h)
    cameras = []
    for f in frames:
        c2w = np.asarray(f["transform_matrix"], dtype=np.float64)
        if c2w.shape != (4, 4):
            raise ValueError(f"{path}: transform_matrix must be 4x4, got {c2w.shape}")
        if not np.allclose(c2w[:3, :3].T @ c2w[:3, :3], np.eye(3), atol=1e-4):
            raise ValueError(f"{path}: a transform_matrix has a scaled or sheared rotation; expected a rigid pose")
        cameras.append(Camera(c2w, _fov_y(meta, f, w, h, path), w, h))
    return Views(cameras, paths)


def load_rgba(path: Union[str, Path], background: Sequence[float] = (1.0, 1.0, 1.0)) -> Tuple[torch.Tensor, torch.Tensor]:
    """An image as RGB [H,W,3] in [0,1] composited on `background`, and its alpha [H,W,1] (ones without alpha)."""
    import imageio.v3 as iio

    img = torch.from_numpy(iio.imread(path)).float() / 255.0
    if img.dim() == 2:
        img = img[..., None].repeat(1, 1, 3)
    rgb, alpha = img[..., :3], (img[..., 3:4] if img.shape[-1] == 4 else torch.ones_like(img[..., :1]))
    bg = torch.tensor(list(background), dtype=torch.float32)
    return rgb * alpha + bg * (1 - alpha), alpha


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
