"""Metric functions against hand-computed values; the Noe camera protocol; metrics load without front ends."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from piva.data.cameras import noe_cameras, orbit_c2w
from piva.metrics import clip_consistency, clip_direction, clip_score


def test_clip_score_is_mean_raw_cosine():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([1.0, 1.0])
    # cosines: 1/sqrt2 and 1/sqrt2
    assert math.isclose(clip_score(img, txt), 1 / math.sqrt(2), rel_tol=1e-6)


def test_clip_direction_by_hand():
    orig = torch.tensor([[1.0, 0.0, 0.0]])
    edit = torch.tensor([[0.0, 1.0, 0.0]])
    src, tgt = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    # image direction (-1,1,0)/sqrt2, text direction (-1,0,1)/sqrt2 -> cos = 1/2
    assert math.isclose(clip_direction(edit, orig, tgt, src), 0.5, rel_tol=1e-6)


def test_clip_consistency_by_hand():
    orig = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    edit = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, -1.0]])
    # directions: a=(-1,1), a, b=(-1,-1) normalised; pairs (a,a)=1, (a,b)=0, wrap (b,a)=0
    assert math.isclose(clip_consistency(edit, orig, wrap=False), 0.5, abs_tol=1e-6)
    assert math.isclose(clip_consistency(edit, orig, wrap=True), 1 / 3, abs_tol=1e-6)


def test_noe_cameras_follow_the_protocol():
    cams = noe_cameras()
    assert cams["c2w"].shape == (120, 4, 4) and cams["fov_y"] == 50.0
    assert cams["azimuth"][0] == 0.0 and cams["azimuth"][-1] == 360.0
    assert cams["unique"].sum() == 119 and not cams["unique"][-1]
    pos = cams["c2w"][:, :3, 3]
    assert np.allclose(np.linalg.norm(pos, axis=1), 4.0)
    assert np.allclose(np.degrees(np.arcsin(pos[:, 2] / 4.0)), 15.0)
    assert np.allclose(pos[0], pos[-1])  # threestudio's duplicated end view
    # every camera looks at the origin: -z axis points from the eye to (0,0,0)
    look = -cams["c2w"][:, :3, 2]
    assert np.allclose(look, -pos / 4.0, atol=1e-9)
    # 3 degrees apart (360/119)
    assert math.isclose(cams["azimuth"][1] - cams["azimuth"][0], 360 / 119)


def test_orbit_c2w_is_a_right_handed_look_at():
    c2w = orbit_c2w(90.0, 0.0, 2.0)  # on the +y axis, level with the origin
    assert np.allclose(c2w[:3, 3], [0.0, 2.0, 0.0], atol=1e-12)
    assert np.allclose(-c2w[:3, 2], [0.0, -1.0, 0.0], atol=1e-12)  # looks at the origin
    assert np.allclose(c2w[:3, 1], [0.0, 0.0, 1.0], atol=1e-12)  # z-up world: camera up is +z
    assert np.allclose(c2w[:3, :3] @ c2w[:3, :3].T, np.eye(3)) and math.isclose(np.linalg.det(c2w[:3, :3]), 1.0)


FRONT_ENDS = ("nerfstudio", "piva.nerfstudio", "piva.toyworld", "piva.threestudio", "piva.image", "piva.noe")


def test_lpips_loads_without_nerfstudio(monkeypatch, tmp_path):
    """With nerfstudio absent, LPIPS is either built or reported unavailable: never ModuleNotFoundError."""
    for name in FRONT_ENDS + ("piva.nerfstudio.piva_model",):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ModuleNotFoundError
    from piva.metrics import evaluate

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(evaluate.MetricUnavailable, match=evaluate.ALEXNET_FILE):
        evaluate.load_lpips()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / evaluate.ALEXNET_FILE).write_bytes(b"")  # cached: nothing is downloaded
    name, fn = evaluate.load_lpips()
    assert "LPIPS" in name and callable(fn)


def test_metrics_and_data_import_no_front_end():
    code = (
        "import sys; import piva.metrics.evaluate, piva.data.cameras, piva.data.views, piva.data.mesh, "
        "piva.data.images; bad = sorted(m for m in sys.modules if m.startswith(%r)); "
        "assert not bad, bad" % (FRONT_ENDS,)
    )
    subprocess.run([sys.executable, "-c", code], check=True)
