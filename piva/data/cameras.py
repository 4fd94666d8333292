"""Camera placement for the whole project: orbit poses and the Noe evaluation orbit (ARCHITECTURE.md section 5).

It lives in the data layer because datasets, renderers, the front ends and the metrics all
place cameras the same way (z-up world, OpenGL convention, threestudio-compatible).
"""

from __future__ import annotations

import math

import numpy as np


def orbit_c2w(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """4x4 camera-to-world, OpenGL convention, z-up world, looking at the origin (as threestudio places cameras)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = distance * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    forward = -eye / np.linalg.norm(eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w


look_at = orbit_c2w  # the name the dataset code uses for the same pose


def noe_cameras(n_views: int = 120, elevation: float = 15.0, distance: float = 4.0, fov_y: float = 50.0) -> dict:
    """threestudio's evaluation orbit: azimuth = linspace(0, 360, n) with BOTH ends, so views 0 and n-1 coincide.

    All n views are returned (renders stay comparable with threestudio's), and
    `unique` marks the ones metrics average over: the duplicated last view is
    dropped, so every direction counts once; adjacent-view consistency wraps from
    the last unique view back to the first.
    """
    azimuths = np.linspace(0.0, 360.0, n_views)
    unique = np.ones(n_views, bool)
    if n_views > 1 and math.isclose(azimuths[-1] % 360.0, azimuths[0] % 360.0):
        unique[-1] = False
    return {
        "c2w": np.stack([orbit_c2w(a, elevation, distance) for a in azimuths]),
        "azimuth": azimuths,
        "elevation": np.full(n_views, elevation),
        "distance": distance,
        "fov_y": fov_y,
        "unique": unique,
    }
