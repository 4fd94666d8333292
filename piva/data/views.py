"""Cameras on the upper hemisphere and the nerfstudio/Blender `transforms.json` writer.

World is z-up; cameras use the OpenGL convention (x right, y up, looking down -z),
as nerfstudio's Blender parser and threestudio expect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

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


def capture_geometry(data_dir: Union[str, Path], split: str = "train") -> dict:
    """How a Blender-format dataset was captured: median camera distance from the origin and vertical fov.

    Evaluation cameras must see an object as its captured views did (same scale, as much in
    frame); reading it from the cameras themselves works for any source (toy, mesh, a user's folder).
    """
    cams = read_views(data_dir, split).cameras
    distance = float(np.median([np.linalg.norm(c.c2w[:3, 3]) for c in cams]))
    return {"distance": distance, "fov_y": float(np.median([c.fov_y for c in cams])), "views": len(cams)}
