"""Metric functions against hand-computed values; the Noe camera protocol; metrics load without front ends."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

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


def write_alexnet(torch_home) -> Path:
    """torchvision's AlexNet file where the hub cache keeps it, with seeded random weights: the real ones cannot be
    downloaded here, so LPIPS values below check the computation, not perceptual quality. The classifier (LPIPS
    never reads it) is a stride-0 zero tensor, which keeps the file at 10 MB instead of 233."""
    import torchvision

    torch.manual_seed(0)
    state = {k: v if k.startswith("features") else torch.zeros(1).expand(v.shape)
             for k, v in torchvision.models.alexnet(weights=None).state_dict().items()}
    path = Path(torch_home) / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def alexnet_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch-home")
    write_alexnet(home)
    return home


def test_lpips_loads_without_nerfstudio(monkeypatch, tmp_path, alexnet_home):
    """With nerfstudio absent, LPIPS is built or reported unavailable: never ModuleNotFoundError. A missing or
    unreadable (0-byte) AlexNet file is reported with what to do; once a good file is in place it loads."""
    for name in FRONT_ENDS + ("piva.nerfstudio.piva_model",):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ModuleNotFoundError
    from piva.metrics import evaluate

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(evaluate.MetricUnavailable, match=evaluate.ALEXNET_FILE):
        evaluate.load_lpips()
    cached = tmp_path / "hub" / "checkpoints" / evaluate.ALEXNET_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # an interrupted download
    with pytest.raises(evaluate.MetricUnavailable, match=r"\(0 bytes\) cannot be read .*replace the file") as err:
        evaluate.load_lpips()
    assert "\n" not in str(err.value)
    shutil.copy(alexnet_home / "hub" / "checkpoints" / evaluate.ALEXNET_FILE, cached)  # replaced: built, not the old error
    name, fn = evaluate.load_lpips()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert "LPIPS" in name and fn(x, x.flip(0)).shape == (2,)


def test_lpips_against_the_reference_implementation(monkeypatch, alexnet_home):
    """The evaluator's LPIPS (torchmetrics, built once, [0,1] inputs, batched) equals the LPIPS authors' own
    package on the same AlexNet with inputs in [-1,1]; it is 0 for identical images, symmetric, positive
    otherwise, and grows with the change."""
    lpips = pytest.importorskip("lpips")
    from piva.metrics.evaluate import load_lpips

    monkeypatch.setenv("TORCH_HOME", str(alexnet_home))
    _, fn = load_lpips()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(20, 3, 48, 48, generator=g), torch.rand(20, 3, 48, 48, generator=g)  # 20: more than one batch
    with torch.no_grad():
        reference = lpips.LPIPS(net="alex", verbose=False)(2 * x - 1, 2 * y - 1).flatten()
    d = fn(x, y)
    torch.testing.assert_close(d, reference, rtol=1e-4, atol=1e-6)
    assert d.min() > 0 and fn(x, x).abs().max() < 1e-6
    torch.testing.assert_close(fn(y, x), d, rtol=1e-5, atol=1e-7)
    near = (x + 0.05 * (y - x)).clamp(0, 1)
    assert (fn(x, near) < d).all()


def test_lpips_clip_and_judge_are_built_once_per_process(monkeypatch, alexnet_home):
    """Loading twice returns the same object; scoring an edit's views, twice, builds LPIPS's AlexNet once
    (constructions counted on torchmetrics' real backbone class: the old per-view LPIPS built 24 here), and
    what is shared stays in eval mode and frozen."""
    from torchmetrics.functional.image import lpips as tm_lpips

    from piva.metrics import evaluate

    monkeypatch.setenv("TORCH_HOME", str(alexnet_home))
    built, plain_init = [], tm_lpips.Alexnet.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        plain_init(self, *args, **kwargs)

    monkeypatch.setattr(tm_lpips.Alexnet, "__init__", counting_init)
    evaluate._build_lpips.cache_clear()
    first = evaluate.load_lpips()
    assert evaluate.load_lpips() is first
    g = torch.Generator().manual_seed(2)
    original = torch.rand(12, 3, 32, 32, generator=g)
    edited = (original + 0.2 * torch.rand(12, 3, 32, 32, generator=g)).clamp(0, 1)
    scores = [evaluate.evaluate_views(edited, original, "a red cube", "a blue cube", lpips=evaluate.load_lpips())["lpips"]
              for _ in range(2)]
    assert len(built) == 1 and scores[0] == scores[1] > 0
    assert not built[0].training and not any(p.requires_grad for p in built[0].parameters())

    from piva.toyworld.judge import JUDGE_NAME, WEIGHTS, create_judge, load_toy_judge, register_judge_config

    weights = WEIGHTS / "judge" / "open_clip_model.safetensors"
    if not weights.is_file():
        pytest.skip("toy judge weights not committed here")
    judge = create_judge()
    assert create_judge()[0] is judge[0] and load_toy_judge().encode_images is not None
    assert not judge[0].training and not any(p.requires_grad for p in judge[0].parameters())
    register_judge_config()  # the judge is an open_clip model: load_clip reads it like a CLIP checkpoint
    clip = evaluate.load_clip(JUDGE_NAME, "toy", weights=weights)
    assert evaluate.load_clip(JUDGE_NAME, "toy", weights=weights) is clip


def test_metrics_and_data_import_no_front_end():
    code = (
        "import sys; import piva.metrics.evaluate, piva.data.cameras, piva.data.views, piva.data.mesh, "
        "piva.data.images; bad = sorted(m for m in sys.modules if m.startswith(%r)); "
        "assert not bad, bad" % (FRONT_ENDS,)
    )
    subprocess.run([sys.executable, "-c", code], check=True)
