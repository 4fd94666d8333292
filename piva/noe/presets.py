"""Benchmark presets: sizes only. Which method runs is the registered one (piva.nerfstudio.piva_config)."""

from __future__ import annotations

from dataclasses import dataclass

from piva.nerfstudio.runs import TOY_SIZE, RunSize


@dataclass(frozen=True)
class EvalOrbit:
    """The evaluation cameras: an orbit at one elevation and distance, looking at the origin."""

    elevation: float = 15.0
    distance: float = 4.0
    fov_y: float = 50.0
    size: int = 512


@dataclass(frozen=True)
class Preset:
    """How large a benchmark run is: capture, source scene and edit sizes, evaluation cameras."""

    name: str
    capture_views: int
    """Views rendered of each object for its source scene (paper: 100)."""
    capture_size: int
    """Their size in pixels."""
    run: RunSize
    """Sizes of the source scene and of every edit."""
    eval: EvalOrbit


PRESETS = {
    # Noe at the paper's sizes on a GPU (the threestudio backend has its own configs).
    "full": Preset("full", capture_views=100, capture_size=512, run=RunSize(), eval=EvalOrbit()),
    # The toy world on 2 CPU cores; its objects are ~1 unit, seen from 3.6 at fov 40 as they were trained.
    "toy": Preset("toy", capture_views=40, capture_size=64, run=TOY_SIZE,
                  eval=EvalOrbit(elevation=30.0, distance=3.6, fov_y=40.0, size=32)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
