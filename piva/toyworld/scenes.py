"""Procedural toy scenes rendered exactly (closed-form ray casting): RGB, alpha and depth.

A scene is one primitive object (cube, sphere, cylinder) of one colour, with
optional parts an edit can add: a white base plate, a black hat, a white stripe.
Everything is known exactly, so an edit's success and what it preserved are numbers.
World is z-up; cameras look at the origin from the upper hemisphere (OpenGL
camera convention, as in nerfstudio/Blender `transforms.json`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from piva.data.views import Camera, camera_rays, hemisphere_cameras, look_at  # noqa: F401 (re-exported)
from piva.data.views import write_blender_dataset as write_views

COLORS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.92, 0.80, 0.10),
    "purple": (0.55, 0.18, 0.75),
    "cyan": (0.10, 0.75, 0.80),
}
SHAPES = ("cube", "sphere", "cylinder")
PARTS = ("plate", "hat", "stripe")
PART_PHRASES = {"plate": "on a white plate", "hat": "with a black hat", "stripe": "with a white stripe"}
BACKGROUND = 0.92
WHITE, BLACK = (0.95, 0.95, 0.95), (0.08, 0.08, 0.08)
LIGHT = np.array([0.4, -0.5, 0.75]) / np.linalg.norm([0.4, -0.5, 0.75])
FILL = np.array([-0.6, 0.5, 0.3]) / np.linalg.norm([-0.6, 0.5, 0.3])

# The toy camera: every toy render, dataset, probe and evaluation view is taken with it.
IMAGE_SIZE = 32  # the toy prior's and judge's resolution
FOV_Y = 40.0
DISTANCE = 3.6
ELEVATION = 30.0  # fixed-elevation orbits (evaluation views, turntables, probes)
ELEVATION_RANGE = (10.0, 60.0)  # random training/evaluation views


def toy_camera(azimuth: float, elevation: float = ELEVATION, size: int = IMAGE_SIZE) -> Camera:
    """The toy camera at `azimuth`/`elevation` (degrees), looking at the origin from DISTANCE."""
    return Camera(look_at(azimuth, elevation, DISTANCE), FOV_Y, size, size)


def toy_orbit(n: int, size: int = IMAGE_SIZE, elevation: float = ELEVATION) -> list[Camera]:
    """`n` toy cameras evenly around the object (azimuths 0, 360/n, ...; no duplicated end view)."""
    return [toy_camera(float(az), elevation, size) for az in np.linspace(0, 360, n, endpoint=False)]


@dataclass(frozen=True)
class Scene:
    shape: str = "cube"
    color: str = "red"
    parts: tuple = ()
    yaw: float = 0.35
    """Rotation of the cube about z (radians); spheres and cylinders are symmetric."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: choose one of {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}: choose one of {', '.join(COLORS)}")
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) {bad}: choose from {', '.join(PARTS)}")

    @property
    def caption(self) -> str:
        words = [f"a {self.color} {self.shape}"] + [PART_PHRASES[p] for p in PARTS if p in self.parts]
        return " ".join(words)

    def with_(self, **changes) -> "Scene":
        return replace(self, **changes)

    @staticmethod
    def from_caption(caption: str) -> "Scene":
        """Inverse of `caption` for the captions this world produces."""
        text = " ".join(caption.strip().lower().split())
        words = text.split()
        rest = " ".join(words[3:])
        parts = tuple(p for p in PARTS if PART_PHRASES[p] in rest)
        for p in parts:
            rest = rest.replace(PART_PHRASES[p], "", 1)
        if len(words) < 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES or rest.strip():
            raise ValueError(
                f"{caption!r} is not a toy-world caption: 'a <colour> <shape>' with at most the parts "
                f"{' / '.join(repr(PART_PHRASES[p]) for p in PARTS)}; colours {', '.join(COLORS)}; "
                f"shapes {', '.join(SHAPES)} (e.g. 'a red cube on a white plate')"
            )
        return Scene(shape=words[2], color=words[1], parts=parts)


# ---------------------------------------------------------------------------- ray casting
def _box(o, d, center, half, yaw):
    c, s = math.cos(-yaw), math.sin(-yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    lo_, ld = (o - center) @ rot.T, d @ rot.T
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - lo_) / ld, (half - lo_) / ld
    tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
    tn, tf = tmin.max(-1), tmax.min(-1)
    hit = (tn <= tf) & (tn > 0)
    axis = tmin.argmax(-1)
    n_local = np.zeros_like(lo_)
    n_local[np.arange(len(o)), axis] = -np.sign(ld[np.arange(len(o)), axis])
    return np.where(hit, tn, np.inf), n_local @ rot


def _sphere(o, d, center, r):
    oc = o - center
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    t = -b - np.sqrt(np.maximum(disc, 0))
    hit = (disc > 0) & (t > 0)
    p = o + t[:, None] * d
    return np.where(hit, t, np.inf), (p - center) / r


def _cylinder(o, d, center, r, half_h):
    """Capped cylinder along z."""
    oc = o - center
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = oc[:, 0] * d[:, 0] + oc[:, 1] * d[:, 1]
    c = oc[:, 0] ** 2 + oc[:, 1] ** 2 - r * r
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / a
    zs = oc[:, 2] + ts * d[:, 2]
    side = (disc > 0) & (ts > 0) & (np.abs(zs) <= half_h)
    t_side = np.where(side, ts, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        tc = np.where(d[:, 2] < 0, (half_h - oc[:, 2]) / d[:, 2], (-half_h - oc[:, 2]) / d[:, 2])
    pc = oc + tc[:, None] * d
    cap = (tc > 0) & (pc[:, 0] ** 2 + pc[:, 1] ** 2 <= r * r)
    t_cap = np.where(cap, tc, np.inf)
    t = np.minimum(t_side, t_cap)
    p = oc + np.nan_to_num(t_side, posinf=0)[:, None] * d
    n_side = np.stack([p[:, 0], p[:, 1], np.zeros_like(t)], -1) / r
    n_cap = np.stack([np.zeros_like(t), np.zeros_like(t), -np.sign(d[:, 2])], -1)
    normal = np.where((t_cap < t_side)[:, None], n_cap, n_side)
    return t, normal


def _primitives(scene: Scene) -> list[tuple]:
    """(kind, hit-function args, colour, is_main_object) for everything in the scene."""
    col = COLORS[scene.color]
    items = []
    if scene.shape == "cube":
        items.append(("box", (np.zeros(3), np.full(3, 0.5), scene.yaw), col, True))
    elif scene.shape == "sphere":
        items.append(("sphere", (np.zeros(3), 0.62), col, True))
    else:
        items.append(("cylinder", (np.zeros(3), 0.5, 0.55), col, True))
    top = {"cube": 0.5, "sphere": 0.62, "cylinder": 0.55}[scene.shape]
    bottom = -top if scene.shape != "sphere" else -0.55
    if "plate" in scene.parts:
        items.append(("cylinder", (np.array([0, 0, bottom - 0.04]), 1.0, 0.04), WHITE, False))
    if "hat" in scene.parts:
        items.append(("cylinder", (np.array([0, 0, top + 0.02]), 0.45, 0.02), BLACK, False))
        items.append(("cylinder", (np.array([0, 0, top + 0.22]), 0.28, 0.2), BLACK, False))
    return items


Surroundings = Callable[[np.ndarray, np.ndarray], tuple]
"""(ray origins, directions) -> (hit distance [R] (inf: none), normal [R,3], colour [R,3]): what is around a scene
(a captured room: piva.toyworld.capture), drawn where it is nearer than the scene's own primitives."""


def render(scene: Scene, cam: Camera, supersample: int = 2,
           surroundings: Optional[Surroundings] = None) -> dict[str, np.ndarray]:
    """Exact render: rgb [H,W,3] on the grey background, alpha [H,W], depth [H,W] (z-depth, inf = background),
    and `object` [H,W], the coverage of the main object alone (what appearance edits should touch)."""
    o, d = camera_rays(cam, supersample)
    best_t = np.full(len(o), np.inf)
    color = np.zeros((len(o), 3))
    normal = np.zeros((len(o), 3))
    main = np.zeros(len(o), bool)
    hits = [({"box": _box, "sphere": _sphere, "cylinder": _cylinder}[kind](o, d, *args), col, is_main)
            for kind, args, col, is_main in _primitives(scene)]
    if surroundings is not None:
        t, n, col = surroundings(o, d)
        hits.append(((t, n), col, False))
    for (t, n), col, is_main in hits:
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        normal[closer] = n[closer]
        c = np.broadcast_to(np.asarray(col, float), color.shape).copy()
        if is_main and "stripe" in scene.parts:
            z = (o + np.nan_to_num(t, posinf=0)[:, None] * d)[:, 2]
            c[np.abs(z) < 0.1] = WHITE
        color[closer] = c[closer]
        main = np.where(closer, is_main, main)
    hit = np.isfinite(best_t)
    shade = 0.35 + 0.55 * np.clip(normal @ LIGHT, 0, 1) + 0.2 * np.clip(normal @ FILL, 0, 1)
    rgb = np.where(hit[:, None], np.clip(color * shade[:, None], 0, 1), BACKGROUND)
    forward = -cam.c2w[:3, 2]
    zdepth = np.where(hit, best_t * (d @ forward), np.inf)
    s, h, w = supersample, cam.height, cam.width

    def down(x):
        return x.reshape(h, s, w, s, *x.shape[2:]).mean((1, 3))

    rgb, alpha, obj = down(rgb.reshape(h * s, w * s, 3)), down(hit.reshape(h * s, w * s, 1).astype(float)), down(
        (hit & main).reshape(h * s, w * s, 1).astype(float)
    )
    zd = zdepth.reshape(h * s, w * s)
    # Depth: the nearest surface within each output pixel (background stays inf).
    depth = zd.reshape(h, s, w, s).min((1, 3))
    return {"rgb": rgb.astype(np.float32), "alpha": alpha[..., 0].astype(np.float32),
            "depth": depth.astype(np.float32), "object": obj[..., 0].astype(np.float32)}


def render_batch(scene: Scene, cams: Sequence[Camera]) -> dict[str, torch.Tensor]:
    """Torch tensors: rgb [N,3,H,W], alpha/depth/object [N,1,H,W]."""
    out = [render(scene, c) for c in cams]
    rgb = torch.from_numpy(np.stack([r["rgb"] for r in out])).permute(0, 3, 1, 2)
    stack = {k: torch.from_numpy(np.stack([r[k] for r in out]))[:, None] for k in ("alpha", "depth", "object")}
    return {"rgb": rgb, **stack}


def all_scenes(parts: Sequence[Sequence[str]] = ((), ("plate",), ("hat",), ("stripe",))) -> list[Scene]:
    return [Scene(shape=s, color=c, parts=tuple(p)) for s in SHAPES for c in COLORS for p in parts]


# ---------------------------------------------------------------------------- datasets
def write_blender_dataset(
    scene: Scene,
    out_dir: Union[str, Path],
    n_train: int = 60,
    n_val: int = 8,
    size: int = 64,
    fov_y: float = FOV_Y,
    distance: float = DISTANCE,
    seed: int = 0,
) -> Path:
    """Write a nerfstudio/Blender dataset (`transforms_{train,val,test}.json`) of a toy scene.

    Images are RGB on the toy world's grey background (read it with
    `blender-data --alpha-color None`, or nerfstudio would composite on white);
    alpha, object coverage and exact depth of each view go beside them for checks.
    """
    splits = {split: hemisphere_cameras(n, size=size, fov_y=fov_y, distance=distance, seed=s)
              for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1), ("test", n_val, seed + 2))}
    meta = {"caption": scene.caption, "shape": scene.shape, "color": scene.color, "parts": list(scene.parts),
            "yaw": scene.yaw, "background": BACKGROUND, "size": size, "fov_y": fov_y, "distance": distance}
    return write_views(out_dir, splits, lambda cam: render(scene, cam), rgba=False, meta=meta)
