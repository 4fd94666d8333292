"""Headless mesh rendering for the Noe benchmark: trimesh ray casting (Embree through `embreex` when installed).

No OpenGL context, no display and no GPU: everything installs from PyPI and runs in CI.
Shading is a fixed two-light Lambert on the mesh's texture / vertex / face colours,
the same lights as the toy world, so source scenes of both look alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from piva.data.views import Camera, camera_rays

LIGHT = np.array([0.4, -0.5, 0.75]) / np.linalg.norm([0.4, -0.5, 0.75])
FILL = np.array([-0.6, 0.5, 0.3]) / np.linalg.norm([-0.6, 0.5, 0.3])
Y_UP_TO_Z_UP = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)


def load_meshes(path: Union[str, Path], y_up: bool = True) -> list:
    """Every mesh of a file (glb/gltf/obj/ply/...), its scene transforms applied, in a z-up world.

    glTF (Objaverse) is y-up; `y_up` turns it to the z-up world the cameras use.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh {path} does not exist")
    loaded = trimesh.load(path, force="scene", process=False)
    meshes = [g for g in loaded.dump(concatenate=False) if isinstance(g, trimesh.Trimesh) and len(g.faces)]
    if not meshes:
        raise ValueError(f"{path} holds no triangle mesh")
    if y_up:
        for m in meshes:
            m.apply_transform(Y_UP_TO_Z_UP)
    return meshes


def normalize_to_sphere(meshes: Sequence, radius: float = 2.0) -> list:
    """Centre on the bounding box and scale so every vertex lies within `radius` (Noe: 2)."""
    verts = np.concatenate([m.vertices for m in meshes])
    center = (verts.min(0) + verts.max(0)) / 2
    scale = radius / max(np.linalg.norm(verts - center, axis=1).max(), 1e-12)
    out = []
    for m in meshes:
        m = m.copy()
        m.apply_translation(-center)
        m.apply_scale(scale)
        out.append(m)
    return out


def _surface_colours(mesh, tri: np.ndarray, points: np.ndarray) -> np.ndarray:
    """RGB in [0,1] of `points` on triangles `tri`: texture (UV) > vertex colours > face colours > grey."""
    import trimesh

    vis = mesh.visual
    if getattr(vis, "kind", None) == "texture" and getattr(vis, "uv", None) is not None:
        bary = trimesh.triangles.points_to_barycentric(mesh.triangles[tri], points)
        uv = (vis.uv[mesh.faces[tri]] * bary[..., None]).sum(1)
        image = getattr(vis.material, "baseColorTexture", None) or getattr(vis.material, "image", None)
        if image is not None:
            tex = np.asarray(image.convert("RGB"), np.float32) / 255
            h, w = tex.shape[:2]
            u = np.clip((uv[:, 0] % 1.0) * (w - 1), 0, w - 1).round().astype(int)
            v = np.clip((1 - uv[:, 1] % 1.0) * (h - 1), 0, h - 1).round().astype(int)
            rgb = tex[v, u]
            factor = getattr(vis.material, "baseColorFactor", None)
            if factor is not None:
                rgb = rgb * (np.asarray(factor[:3], np.float32) / 255 if np.max(factor) > 1 else np.asarray(factor[:3]))
            return rgb
        vis = vis.to_color()
    if getattr(vis, "kind", None) == "vertex":
        bary = trimesh.triangles.points_to_barycentric(mesh.triangles[tri], points)
        vc = np.asarray(vis.vertex_colors, np.float32)[:, :3] / 255
        return (vc[mesh.faces[tri]] * bary[..., None]).sum(1)
    if getattr(vis, "kind", None) == "face":
        return np.asarray(vis.face_colors, np.float32)[tri, :3] / 255
    return np.full((len(tri), 3), 0.7, np.float32)


def render_mesh(meshes: Sequence, cam: Camera, background: float = 1.0, supersample: int = 2) -> dict:
    """rgb [H,W,3] (on `background`), alpha [H,W], depth [H,W] (z-depth, inf = background)."""
    o, d = camera_rays(cam, supersample)
    n = len(o)
    best = np.full(n, np.inf)
    rgb = np.zeros((n, 3), np.float32)
    normal = np.zeros((n, 3))
    for mesh in meshes:
        locs, ray_idx, tri = mesh.ray.intersects_location(o, d, multiple_hits=False)
        if not len(ray_idx):
            continue
        t = np.einsum("ij,ij->i", locs - o[ray_idx], d[ray_idx])
        closer = t < best[ray_idx]
        ray_idx, tri, locs, t = ray_idx[closer], tri[closer], locs[closer], t[closer]
        best[ray_idx] = t
        rgb[ray_idx] = _surface_colours(mesh, tri, locs)
        nrm = mesh.face_normals[tri]
        flip = np.einsum("ij,ij->i", nrm, d[ray_idx]) > 0  # two-sided: face the camera
        nrm[flip] *= -1
        normal[ray_idx] = nrm
    hit = np.isfinite(best)
    shade = 0.35 + 0.55 * np.clip(normal @ LIGHT, 0, 1) + 0.2 * np.clip(normal @ FILL, 0, 1)
    colour = np.where(hit[:, None], np.clip(rgb * shade[:, None], 0, 1), background)
    zdepth = np.where(hit, best * (d @ -cam.c2w[:3, 2]), np.inf)
    s, h, w = supersample, cam.height, cam.width
    colour = colour.reshape(h, s, w, s, 3).mean((1, 3))
    alpha = hit.reshape(h, s, w, s).mean((1, 3))
    depth = zdepth.reshape(h, s, w, s).min((1, 3))
    return {"rgb": colour.astype(np.float32), "alpha": alpha.astype(np.float32), "depth": depth.astype(np.float32)}
