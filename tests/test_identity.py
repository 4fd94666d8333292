"""Face identity (piva.metrics.identity) on real photographs that ship in installed packages:
skimage's astronaut (Eileen Collins) and matplotlib's Grace Hopper; skimage's coffee has no face."""

import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from piva.metrics.evaluate import MetricUnavailable
from piva.metrics.identity import load_face_identity, identity_figures

RENDER = (135, 240)  # H, W: a small NeRF render


@pytest.fixture(scope="module")
def model():
    """The dlib models (the `faces` extra, in the pinned CPU set); skipped without them except in CI."""
    try:
        return load_face_identity()
    except MetricUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = np.asarray(im.convert("RGB"))  # 600 x 512
    return {"astronaut": data.astronaut(), "hopper": hopper, "coffee": data.coffee()}


def render(img: np.ndarray, size=RENDER) -> torch.Tensor:
    """HxWx3 uint8 -> [3,h,w] in [0,1] at the render size (bicubic)."""
    im = Image.fromarray(np.ascontiguousarray(img)).resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def hue_rotate(x: torch.Tensor, turn: float) -> torch.Tensor:
    """Rotate every pixel's hue by `turn` of a circle (skimage's HSV)."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x.permute(1, 2, 0).numpy())
    hsv[..., 0] = (hsv[..., 0] + turn) % 1
    return torch.from_numpy(hsv2rgb(hsv)).permute(2, 0, 1).float()


def zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale about the centre and crop back to the same size (a slightly closer camera)."""
    h, w = x.shape[1:]
    big = torch.nn.functional.interpolate(x[None], scale_factor=factor, mode="bicubic", align_corners=False)[0]
    top, left = (big.shape[1] - h) // 2, (big.shape[2] - w) // 2
    return big[:, top:top + h, left:left + w].clamp(0, 1)


def test_same_face_after_colour_change_and_zoom_scores_as_same_person(model, photos):
    # 16:9 crop of the astronaut at a render size: her face is ~42 px wide.
    original = render(photos["astronaut"][:288])
    coffee = render(photos["coffee"])
    edited = torch.stack([
        hue_rotate(original, 0.15),
        (original * torch.tensor([1.0, 0.8, 0.6]).view(3, 1, 1)).clamp(0, 1),  # warm tint
        zoom(original, 1.08),
        hue_rotate(coffee, 0.3),
    ])
    originals = torch.stack([original, original, original, coffee])
    out = identity_figures(edited, originals, model)
    assert out["identity_views"] == 3, out  # the coffee view has no face: skipped
    assert out["identity_fallback_views"] == 0, out  # the edited face was detected in every view
    assert out["identity_same_person"] == 1.0, out
    assert out["identity_distance"] < 0.4, out
    assert out["identity"] > 0.97, out
    assert 35 <= out["identity_face_px"] <= 50, out
    assert out["identity_model"] == "dlib_face_recognition_resnet_model_v1"
    assert json.loads(json.dumps(out)) == out
    assert identity_figures(edited, originals, model) == out  # deterministic
    # the unchanged render: distance 0 exactly
    same = identity_figures(original[None], original[None], model)
    assert same["identity_distance"] == pytest.approx(0, abs=1e-6) and same["identity"] == pytest.approx(1, abs=1e-6)


def test_a_tiny_face_is_found_by_upsampling(model, photos):
    # 100x100: the face is ~20 px wide, a quarter of the HOG window; only the x4 upsampling finds it.
    original = render(photos["astronaut"], (100, 100))
    out = identity_figures(hue_rotate(original, 0.15)[None], original[None], model)
    assert out["identity_views"] == 1 and out["identity_face_px"] < 25, out
    assert out["identity_same_person"] == 1.0, out


def test_different_person_scores_low(model, photos):
    # The astronaut cropped and Hopper cropped so that the two faces lie on the same box at 240x240.
    astronaut = render(photos["astronaut"][9:265, 90:346], (240, 240))
    hopper = render(photos["hopper"][:512, :512], (240, 240))
    out = identity_figures(hopper[None], astronaut[None], model)
    assert out["identity_views"] == 1 and out["identity_fallback_views"] == 0, out  # Hopper's own face, detected
    assert out["identity_distance"] > 0.6, out
    assert out["identity_same_person"] == 0.0, out
    assert out["identity"] < 0.95, out
    back = identity_figures(astronaut[None], hopper[None], model)
    assert back["identity_distance"] == pytest.approx(out["identity_distance"], abs=1e-6)  # symmetric


def test_erased_face_scores_low_instead_of_being_skipped(model, photos):
    original = render(photos["astronaut"][:288])
    edited = original.clone()
    edited[:, 30:90, 75:130] = original[:, 30:90, 75:130].mean(dim=(1, 2), keepdim=True)  # the face painted over
    out = identity_figures(edited[None], original[None], model)
    assert out["identity_views"] == 1 and out["identity_fallback_views"] == 1, out
    assert out["identity_same_person"] == 0.0, out
    assert out["identity_distance"] > 0.6, out


def test_no_face_in_any_original_is_reported_with_a_reason(model, photos):
    coffee = render(photos["coffee"])
    grey = torch.full_like(coffee, 0.5)
    out = identity_figures(torch.stack([coffee, grey]), torch.stack([coffee, grey]), model)
    assert out == {"identity_unavailable": "no face found in any of the 2 original renders"}
    with pytest.raises(ValueError, match="alike"):
        identity_figures(coffee[None], torch.stack([coffee, grey]), model)


def test_loading_is_quick_and_cached(model):
    from piva.metrics import identity

    identity._build.cache_clear()
    start = time.perf_counter()
    first = load_face_identity()
    assert time.perf_counter() - start < 20
    assert load_face_identity() is first


@pytest.mark.parametrize("package", ["dlib", "face_recognition_models"])
def test_missing_package_says_what_to_install(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import` and find_spec fail as if not installed
    with pytest.raises(MetricUnavailable, match=r"pip install dlib-bin face_recognition_models") as exc:
        load_face_identity()
    assert package in str(exc.value) and "\n" not in str(exc.value)


def test_missing_weights_file_is_named(monkeypatch, tmp_path):
    pytest.importorskip("dlib")
    pkg = tmp_path / "face_recognition_models"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "shape_predictor_5_face_landmarks.dat").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    with pytest.raises(MetricUnavailable, match="dlib_face_recognition_resnet_model_v1.dat missing"):
        load_face_identity()
