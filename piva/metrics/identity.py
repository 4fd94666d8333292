"""Is it still the same person? Face-identity figures for edits of people.

CLIP and LPIPS say whether an edit matches its prompt and how much of the picture changed, not whether the
edited face still belongs to the same person ("give him a beard" should keep him). This module compares
face descriptors of the original and the edited render at the same camera with dlib's face recognition
ResNet (128-d descriptors; two faces of one person lie within euclidean distance 0.6, dlib's published
threshold, 99.38% on LFW). The weights ship inside the `face_recognition_models` package and dlib comes
prebuilt as `dlib-bin` (`pip install -e ".[faces]"`), so nothing is downloaded at run time and no compiler
is needed. CPU only and deterministic (no jittering).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from piva.metrics.evaluate import MetricUnavailable

MODEL_NAME = "dlib_face_recognition_resnet_model_v1"
SAME_PERSON_DISTANCE = 0.6
"""dlib's threshold: descriptors closer than this are taken for the same person."""
UPSAMPLES = (1, 2)
"""Detector upsamplings tried in turn: the HOG detector's window is 80 px, so faces in small renders
(135x240) need the image upsampled; x2 finds faces down to ~40 px, x4 down to ~20 px."""
INSTALL_HINT = 'pip install dlib-bin face_recognition_models (or pip install -e ".[faces]")'
_FILES = ("shape_predictor_5_face_landmarks.dat", f"{MODEL_NAME}.dat")


@dataclass(frozen=True)
class FaceIdentity:
    """dlib's frontal HOG face detector, 5-point landmarks and face recognition ResNet, loaded once."""

    detector: Any
    shape_predictor: Any
    recognizer: Any
    name: str = MODEL_NAME


def _models_dir() -> Path:
    """The folder of face_recognition_models' weights, found without importing the package: its
    __init__ imports pkg_resources, which setuptools >= 81 no longer has."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable(f"face identity needs the face_recognition_models package: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def load_face_identity() -> FaceIdentity:
    """The face models, from installed packages only (seconds, no network); MetricUnavailable when missing.

    Built once per process for each weights folder (every edit of a benchmark scores with it)."""
    try:
        import dlib  # noqa: F401  (provided by dlib-bin)
    except ImportError:
        raise MetricUnavailable(f"face identity needs dlib: {INSTALL_HINT}") from None
    models = _models_dir()
    missing = [f for f in _FILES if not (models / f).is_file()]
    if missing:
        raise MetricUnavailable(f"face identity: {', '.join(missing)} missing in {models}: reinstall with {INSTALL_HINT}")
    return _build(str(models))


@functools.lru_cache(maxsize=2)
def _build(models: str) -> FaceIdentity:
    import dlib

    return FaceIdentity(
        detector=dlib.get_frontal_face_detector(),
        shape_predictor=dlib.shape_predictor(str(Path(models) / _FILES[0])),
        recognizer=dlib.face_recognition_model_v1(str(Path(models) / _FILES[1])),
    )


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] -> the HxWx3 uint8 contiguous array dlib reads."""
    x = (rgb.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def _detect(model: FaceIdentity, img: np.ndarray) -> list:
    """Face boxes at the first upsampling in UPSAMPLES that finds any."""
    for up in UPSAMPLES:
        boxes = list(model.detector(img, up))
        if boxes:
            return boxes
    return []


def _iou(a, b) -> float:
    inter = a.intersect(b)
    i = inter.area() if not inter.is_empty() else 0
    return i / max(a.area() + b.area() - i, 1)


def _descriptor(model: FaceIdentity, img: np.ndarray, box) -> np.ndarray:
    return np.asarray(model.recognizer.compute_face_descriptor(img, model.shape_predictor(img, box)), dtype=np.float64)


def identity_figures(edited: torch.Tensor, original: torch.Tensor, model: FaceIdentity, min_iou: float = 0.25) -> dict:
    """Face identity of edited [N,3,H,W] renders against the original renders at the same cameras, in [0,1].

    Per view: the largest face detected in the ORIGINAL render (a view without one is skipped) against the
    edited face that overlaps it most (IoU >= min_iou, since the camera is the same). When the edited render
    has no such face, the original's box is read on the edited render instead (counted in
    `identity_fallback_views`): an edit that erases or mangles the face then scores low rather than being
    left out. Figures over the views with a face: `identity` mean cosine of the descriptors (dlib's space
    is not centred: different people still give ~0.85-0.9, the same person ~0.99), `identity_distance` mean
    euclidean distance, `identity_same_person` the share of views under dlib's 0.6 threshold and
    `identity_face_px` the mean width of the original faces: below ~25 px the descriptors blur together
    (the astronaut and Grace Hopper came within 0.6 at 19-22 px), so read small faces with care."""
    if edited.shape != original.shape or edited.ndim != 4 or edited.shape[1] != 3:
        raise ValueError(f"edited {tuple(edited.shape)} and original {tuple(original.shape)} renders must be [N,3,H,W] alike")
    cos, dist, width, fallback = [], [], [], 0
    for e, o in zip(edited, original):
        img_o = _to_uint8(o)
        faces = _detect(model, img_o)
        if not faces:
            continue
        box = max(faces, key=lambda b: b.area())
        width.append(box.width())
        img_e = _to_uint8(e)
        match: Optional[Any] = max(_detect(model, img_e), key=lambda b: _iou(b, box), default=None)
        if match is None or _iou(match, box) < min_iou:
            match, fallback = box, fallback + 1
        d_o, d_e = _descriptor(model, img_o, box), _descriptor(model, img_e, match)
        dist.append(float(np.linalg.norm(d_o - d_e)))
        cos.append(float(d_o @ d_e / max(np.linalg.norm(d_o) * np.linalg.norm(d_e), 1e-12)))
    if not dist:
        return {"identity_unavailable": f"no face found in any of the {len(original)} original renders"}
    return {
        "identity": float(np.mean(cos)),
        "identity_distance": float(np.mean(dist)),
        "identity_same_person": float(np.mean([d < SAME_PERSON_DISTANCE for d in dist])),
        "identity_views": len(dist),
        "identity_fallback_views": fallback,
        "identity_face_px": float(np.mean(width)),
        "identity_model": model.name,
    }
