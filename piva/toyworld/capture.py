"""The toy world as a phone capture: a hand-held walk around a toy object standing in a small room.

What `ns-process-data` leaves for a real capture, made exactly: non-square JPEG frames in `images/`,
one `transforms.json` (OPENCV intrinsics, a pose per frame, `applied_transform`), no eval split
(nerfstudio then holds out every 8th frame). A tiled floor and a painted wall fill the background, so
an edit that spills onto it shows in the preservation figures. Each frame's exact object coverage and
depth go to `toyworld_exact/` (nerfstudio never reads that folder): the checks' ground truth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import numpy as np

from piva.data.views import Camera
from piva.toyworld.scenes import FOV_Y, Scene, Surroundings, render

ROOM_RADIUS = 5.0
"""The wall: the inside of a vertical cylinder around the object."""
WALL_TOP = 3.0
TILE = 0.5
FLOOR = ((0.62, 0.55, 0.45), (0.80, 0.74, 0.62))
WALL_BANDS = ((0.55, 0.62, 0.70), (0.70, 0.60, 0.55), (0.58, 0.68, 0.56), (0.68, 0.66, 0.50))
CEILING = (0.86, 0.86, 0.84)


def floor_height(scene: Scene) -> float:
    """The object stands on the floor: the lowest point of its main shape or its plate."""
    top = {"cube": 0.5, "sphere": 0.62, "cylinder": 0.55}[scene.shape]
    lowest = -top
    if "plate" in scene.parts:
        lowest = min(lowest, (-top if scene.shape != "sphere" else -0.55) - 0.08)
    return lowest


def room(scene: Scene) -> Surroundings:
    """Floor tiles and wall bands (colour changes every few pixels, so a reconstruction has texture to fit)."""
    z0 = floor_height(scene)

    def hit(o: np.ndarray, d: np.ndarray) -> tuple:
        with np.errstate(divide="ignore", invalid="ignore"):
            t_floor = np.where(d[:, 2] < 0, (z0 - o[:, 2]) / d[:, 2], np.inf)
            a = d[:, 0] ** 2 + d[:, 1] ** 2
            b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
            c = o[:, 0] ** 2 + o[:, 1] ** 2 - ROOM_RADIUS**2
            t_wall = np.where(a > 1e-12, (-b + np.sqrt(np.maximum(b * b - a * c, 0))) / a, np.inf)
        p_floor = o + np.nan_to_num(t_floor, posinf=0)[:, None] * d
        on_floor = np.isfinite(t_floor) & (p_floor[:, 0] ** 2 + p_floor[:, 1] ** 2 <= ROOM_RADIUS**2)
        t_floor = np.where(on_floor, t_floor, np.inf)
        t = np.minimum(t_floor, t_wall)
        p = o + np.nan_to_num(t, posinf=0)[:, None] * d
        floor_colour = np.array(FLOOR)[((np.floor(p[:, 0] / TILE) + np.floor(p[:, 1] / TILE)) % 2).astype(int)]
        band = (np.floor((np.arctan2(p[:, 1], p[:, 0]) + math.pi) / (2 * math.pi) * 12) % len(WALL_BANDS)).astype(int)
        height = np.clip((p[:, 2] - z0) / (WALL_TOP - z0), 0, 1)[:, None]
        wall_colour = np.array(WALL_BANDS)[band] * (1.05 - 0.25 * height)
        wall_colour = np.where((p[:, 2] > WALL_TOP)[:, None], CEILING, wall_colour)
        is_floor = (t_floor <= t_wall)[:, None]
        colour = np.where(is_floor, floor_colour, wall_colour)
        normal = np.where(is_floor, [0.0, 0.0, 1.0], -np.stack([p[:, 0], p[:, 1], np.zeros(len(p))], -1) / ROOM_RADIUS)
        return t, normal, colour

    return hit


def _pose(eye: np.ndarray, target: np.ndarray, roll_deg: float) -> np.ndarray:
    """OpenGL camera-to-world looking from `eye` at `target`, z-up world, turned `roll_deg` about its axis."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    r = math.radians(roll_deg)
    right, up = math.cos(r) * right + math.sin(r) * up, -math.sin(r) * right + math.cos(r) * up
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


def handheld_path(n: int, width: int, height: int, seed: int = 0, fov_y: float = FOV_Y) -> list[Camera]:
    """A person walking most of the way round the object with a phone: the height goes up and down twice
    (elevation 10-45 degrees), the distance drifts (3.3-4.0), the aim and the roll shake a little."""
    rng = np.random.default_rng(seed)
    cams = []
    for i in range(n):
        s = i / max(n - 1, 1)
        azimuth = math.radians(15 + 320 * s)
        elevation = math.radians(27.5 - 17.5 * math.cos(2 * math.pi * 2 * s))
        distance = 3.65 + 0.35 * math.sin(2 * math.pi * 1.5 * s)
        eye = distance * np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                                   math.sin(elevation)])
        target = rng.normal(0.0, 0.06, 3)
        cams.append(Camera(_pose(eye, target, rng.normal(0.0, 2.0)), fov_y, width, height))
    return cams


def write_capture(scene: Scene, out_dir: Union[str, Path], frames: int = 48, width: int = 96, height: int = 72,
                  seed: int = 0, quality: int = 92) -> Path:
    """Write the capture folder (atomically: a half-written capture is never taken for a finished one)."""
    import imageio.v3 as iio

    from piva.io import atomic_path, atomic_write_json

    cams = handheld_path(frames, width, height, seed)
    surroundings = room(scene)
    with atomic_path(Path(out_dir)) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "toyworld_exact").mkdir()
        records = []
        for i, cam in enumerate(cams, start=1):
            r = render(scene, cam, surroundings=surroundings)
            name = f"frame_{i:05d}"
            iio.imwrite(tmp / "images" / f"{name}.jpg", (np.clip(r["rgb"], 0, 1) * 255).round().astype(np.uint8),
                        quality=quality)
            np.savez_compressed(tmp / "toyworld_exact" / f"{name}.npz", object=r["object"], depth=r["depth"])
            records.append({"file_path": f"images/{name}.jpg", "transform_matrix": cam.c2w.tolist(), "colmap_im_id": i})
        focal = cams[0].focal
        atomic_write_json(tmp / "transforms.json", {
            "w": width, "h": height, "fl_x": focal, "fl_y": focal, "cx": width / 2, "cy": height / 2,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "camera_model": "OPENCV", "frames": records,
            "applied_transform": np.eye(4)[:3].tolist(),
        })
        atomic_write_json(tmp / "scene.json", {"caption": scene.caption, "shape": scene.shape, "color": scene.color,
                                               "parts": list(scene.parts), "floor": floor_height(scene),
                                               "room_radius": ROOM_RADIUS, "frames": frames, "seed": seed})
    return Path(out_dir)
