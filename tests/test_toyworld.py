"""Toy world: exact scenes, datasets, judge checks, and the committed prior/judge weights."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from piva.data.cameras import look_at
from piva.toyworld.judge import WEIGHTS, dominant_color, iou, object_hue_fraction, silhouette
from piva.toyworld.scenes import BACKGROUND, COLORS, Scene, render, toy_camera, toy_orbit, write_blender_dataset


def test_captions_round_trip():
    s = Scene("cylinder", "green", ("plate", "hat"))
    assert s.caption == "a green cylinder on a white plate with a black hat"
    assert Scene.from_caption(s.caption) == s
    with pytest.raises(ValueError, match="not a toy-world caption"):
        Scene.from_caption("a teapot")
    # Words beyond the known parts are not silently dropped; the error lists the vocabulary.
    with pytest.raises(ValueError, match="colours red, green, blue, yellow, purple, cyan; shapes cube, sphere"):
        Scene.from_caption("a red cube on fire")
    with pytest.raises(ValueError, match="unknown colour"):
        Scene("cube", "magenta")


def test_sphere_depth_and_silhouette_are_exact():
    """Camera on the x axis looking at a sphere of radius 0.62: closed-form depth and area."""
    cam = toy_camera(0.0, elevation=0.0, size=64)  # on the x axis, 3.6 from the origin, 40 degrees
    r = render(Scene("sphere", "red"), cam, supersample=1)
    centre = r["depth"][31:33, 31:33]
    assert np.allclose(centre, 3.6 - 0.62, atol=2e-3)
    # Projected disc: angular radius asin(r/d); area fraction on the image plane.
    f = cam.focal
    rad_px = f * math.tan(math.asin(0.62 / 3.6))
    assert abs(r["alpha"].sum() - math.pi * rad_px**2) / (math.pi * rad_px**2) < 0.03
    assert np.allclose(r["rgb"][0, 0], BACKGROUND)
    assert np.isinf(r["depth"][0, 0])
    # Object pixels are red-dominated, never another hue.
    px = r["rgb"][32, 32]
    assert px[0] > 2 * px[1] and px[0] > 2 * px[2]


def test_parts_change_only_where_they_are():
    cam = toy_camera(30.0, 35.0, size=48)
    plain, plate = render(Scene("cube", "blue"), cam), render(Scene("cube", "blue", ("plate",)), cam)
    assert plate["alpha"].sum() > plain["alpha"].sum()
    assert np.allclose(plain["object"], plain["alpha"])  # no parts: everything is the object
    changed = np.abs(plain["rgb"] - plate["rgb"]).max(-1) > 1e-6
    assert changed.any()
    assert not changed[plain["object"] > 0.999].any()  # the plate sits below: the cube itself is untouched


def test_blender_dataset_is_readable_by_nerfstudio(tmp_path):
    pytest.importorskip("nerfstudio")
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    data = write_blender_dataset(Scene("sphere", "yellow", ("hat",)), tmp_path / "d", n_train=5, n_val=2, size=24)
    meta = json.loads((data / "transforms_train.json").read_text())
    assert len(meta["frames"]) == 5 and math.isclose(meta["camera_angle_x"], math.radians(40))
    outputs = BlenderDataParserConfig(data=data, alpha_color=None).setup().get_dataparser_outputs("train")
    assert len(outputs.image_filenames) == 5
    assert int(outputs.cameras.width[0]) == 24
    c2w = outputs.cameras.camera_to_worlds[0]
    assert torch.allclose(c2w, torch.tensor(meta["frames"][0]["transform_matrix"], dtype=torch.float32)[:3], atol=1e-5)
    exact = np.load(data / "train" / "r_0_exact.npz")
    assert exact["depth"].shape == (24, 24)


def test_exact_colour_checks():
    img = torch.full((2, 3, 8, 8), BACKGROUND)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    img[0, :, 2:6, 2:6] = torch.tensor(COLORS["blue"]).view(3, 1, 1)
    img[1, :, 2:6, 2:6] = torch.tensor(COLORS["red"]).view(3, 1, 1)
    assert dominant_color(img, mask) == ["blue", "red"]
    frac = object_hue_fraction(img, mask, "blue")
    assert frac[0] == 1.0 and frac[1] == 0.0
    assert torch.equal(silhouette(img), mask)
    assert iou(mask, mask).tolist() == [1.0, 1.0]


def test_toy_camera_and_orbit():
    cam = toy_camera(30.0)
    assert (cam.width, cam.height, cam.fov_y) == (32, 32, 40.0)
    assert np.allclose(cam.c2w, look_at(30.0, 30.0, 3.6))
    orbit = toy_orbit(12, size=64)
    eyes = np.stack([c.c2w[:3, 3] for c in orbit])
    assert len(orbit) == 12 and orbit[0].width == 64
    assert np.allclose(np.linalg.norm(eyes, axis=1), 3.6)
    assert np.allclose(np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0])) % 360, np.arange(12) * 30.0)


def test_random_toy_camera_keeps_its_draws():
    """Datasets and the 2D experiment are seeded: the same rng must give the same cameras as before."""
    from piva.toyworld.data import random_camera

    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    cam = random_camera(rng)
    az, el = ref.uniform(0, 360), ref.uniform(10.0, 60.0)
    assert np.allclose(cam.c2w, look_at(az, el, 3.6)) and cam.width == 32


def test_hue_matches_an_independent_hsv():
    """The judge's HSV (standard library) against matplotlib's vectorised one, on saturated and grey pixels."""
    colors = pytest.importorskip("matplotlib.colors")
    from piva.toyworld.judge import _rgb_to_hsv

    rgb = np.random.default_rng(0).random((64, 3)).astype(np.float32)
    rgb[:4] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], list(COLORS["red"])]
    assert np.allclose(_rgb_to_hsv(rgb), colors.rgb_to_hsv(rgb), atol=1e-6)


needs_weights = pytest.mark.skipif(not (WEIGHTS / "prior" / "model_index.json").is_file(), reason="toy weights not trained")


@needs_weights
def test_toy_prior_loads_through_the_real_path_and_is_small():
    from piva.prior import DiffusionPrior

    prior = DiffusionPrior.from_pretrained(WEIGHTS / "prior", controlnet=WEIGHTS / "controlnet", device="cpu")
    assert len(prior.tokenizer) == 49408 and prior.resolution == 32 and prior.dtype == torch.float32
    size = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert size < 25 * 2**20


@needs_weights
def test_judge_ranks_the_true_caption_first():
    from piva.toyworld.data import make_dataset
    from piva.toyworld.judge import classify, create_judge

    model, _, tok = create_judge()
    # The README's figure as measured (piva.toyworld.quality.measure, seed 0): 600 held-out renders, all 72
    # captions, top-1 0.902 (docs/toyworld.md); the README rounds it to 0.90. The sample is the measured one,
    # so no sampling noise: the bar is the claim itself, to its rounding.
    data = make_dataset(600, seed=20_000)
    assert len(data["captions"]) == 72
    probs = classify(model, tok, data["rgb"], data["captions"])
    assert (probs.argmax(-1) == data["caption_index"]).float().mean().item() >= 0.895


@needs_weights
def test_toy_judge_behind_the_evaluator_interface():
    from piva.toyworld.judge import classify, create_judge, load_toy_judge

    model = load_toy_judge()
    assert not model.is_clip and "NOT CLIP" in model.name
    img = torch.from_numpy(render(Scene("cube", "blue"), toy_camera(40.0))["rgb"]).permute(2, 0, 1)[None]
    captions = ["a red cube", "a blue cube", "a green sphere"]
    sims = torch.nn.functional.normalize(model.encode_images(img), dim=-1) @ torch.nn.functional.normalize(
        model.encode_texts(captions), dim=-1).T
    judge, _, tok = create_judge()
    assert sims.argmax().item() == classify(judge, tok, img, captions).argmax().item() == 1


def test_psnr_against_hand_values():
    from piva.metrics import psnr

    a = torch.zeros(1, 3, 4, 4)
    b = torch.full((1, 3, 4, 4), 0.1)
    assert abs(psnr(a, b) - 20.0) < 1e-4  # mse 0.01
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    b[..., 2:, :] = 0.5  # errors outside the mask do not count
    assert abs(psnr(a, b, mask) - 20.0) < 1e-4


DEMO_STEPS = 40
DEMO_SOURCE_STEPS = 150
SHAPE_STEPS = 40


def assert_pictures_show_the_edit(out: Path, tag: str) -> None:
    """The demo's red -> blue pictures, read back: the turntable GIF has 36 turning frames of [before | after]
    views, the PNG a row of 6 before views over 6 after views; neither is blank, and the after side differs
    from the before side and is bluer (NeRF demo, measured: halves differ by 0.022 a pixel, blue - red
    rises by 0.065; frames 90 degrees apart differ by 0.022)."""
    import imageio.v3 as iio

    blue_minus_red = lambda x: float((x[..., 2] - x[..., 0]).mean())  # noqa: E731
    gif = iio.imread(out / f"turntable_{tag}.gif", index=None)[..., :3] / 255.0  # [frames, H, W, 3]
    assert gif.shape[0] == 36 and gif.shape[2] == 2 * gif.shape[1], gif.shape
    before, after = gif[:, :, : gif.shape[2] // 2], gif[:, :, gif.shape[2] // 2 :]
    png = iio.imread(out / f"before_after_{tag}.png")[..., :3] / 255.0
    h = png.shape[0] // 2
    assert png.shape[1] == 6 * h, png.shape
    for old, new in ((before, after), (png[:h], png[h:])):
        assert old.std() > 0.05 and new.std() > 0.05  # an object on the backdrop, not a flat image
        assert np.abs(new - old).mean() > 0.005
        assert blue_minus_red(new) > blue_minus_red(old) + 0.01
    assert np.abs(gif[0] - gif[9]).mean() > 0.005  # the table turns


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """One demo folder for the NeRF demo tests: the red cube's reconstruction (keyed by its settings) is made
    once and each edit starts from it, as a user's second `piva demo --target ...` does."""
    return tmp_path_factory.mktemp("demo")


@needs_weights
@pytest.mark.slow
def test_demo_end_to_end_quick(demo_out):
    from piva.cli import main

    tmp_path = demo_out

    assert main(["demo", "--out", str(tmp_path), "--steps", str(DEMO_STEPS), "--source-steps", str(DEMO_SOURCE_STEPS)]) == 0
    result = json.loads((tmp_path / "result_piva.json").read_text())
    m = result["metrics"]
    # The registered method moved the cube's colour towards blue (measured: +0.18 along blue - red
    # after 40 steps; the judge flips only later), and kept the background.
    direction = torch.tensor(COLORS["blue"]) - torch.tensor(COLORS["red"])
    moved = (torch.tensor(m["object_rgb"]) - torch.tensor(m["object_rgb_original"])) @ direction
    assert moved > 0.06, m
    assert m["background_psnr_vs_original"] > 30, m
    assert_pictures_show_the_edit(tmp_path, "piva")
    assert result["registered_method"] == "piva-object" and result["geometry"] == "auto"
    assert result["edit_geometry"] is False  # red -> blue is a colour edit: the method's rule keeps the geometry
    edited = Path(result["outputs"]["edited_run"])
    assert edited.is_relative_to(tmp_path / "scenes") and list((edited / "nerfstudio_models").glob("*.ckpt"))


@needs_weights
@pytest.mark.slow
def test_splat_demo_recolours_the_splat_scene(tmp_path):
    """`piva demo --representation splat`: the same outputs as the NeRF demo, from a splatfacto reconstruction
    edited by `piva-splat` (measured at the full demo sizes: judge 11 of 12 views, background 34.0 dB, 1.9 min)."""
    from piva.cli import main

    args = ["demo", "--representation", "splat", "--out", str(tmp_path), "--steps", str(DEMO_STEPS), "--source-steps", "150"]
    assert main(args) == 0
    result = json.loads((tmp_path / "result_piva-splat.json").read_text())
    m = result["metrics"]
    direction = torch.tensor(COLORS["blue"]) - torch.tensor(COLORS["red"])
    moved = (torch.tensor(m["object_rgb"]) - torch.tensor(m["object_rgb_original"])) @ direction
    assert moved > SPLAT_DEMO_MOVED, m
    assert m["background_psnr_vs_original"] > 28, m
    assert result["registered_method"] == "piva-splat" and result["edit_geometry"] is False
    assert_pictures_show_the_edit(tmp_path, "piva-splat")


SPLAT_DEMO_MOVED = 0.06


@needs_weights
@pytest.mark.slow
def test_demo_shape_change_moves_the_silhouette_towards_the_target(demo_out, monkeypatch):
    """A geometry edit through the method's rule (target-only steps on the coarse levels, then PiVa): after
    40 steps the cube's silhouette is closer to the exact sphere's, and the judge's p(sphere) has risen
    (measured: IoU 0.23 -> 0.51, p 0.009 -> 0.12; after 60 steps 0.59 and 0.15; the 150-step source is hazy,
    so no background bar here)."""
    from piva import demo
    from piva.cli import main

    # The figures checked here come from the judge's views, rendered as in any demo. The pictures drawn after
    # them are test_demo_end_to_end_quick's subject: here the 36-frame 64 px turntable (most of the minute this
    # test spent after its edit) is drawn from 2 small frames.
    judge_edit, orbit = demo.judge_edit, demo.toy_orbit

    def judge_then_a_small_turntable(*args, **kwargs):
        figures = judge_edit(*args, **kwargs)
        monkeypatch.setattr(demo, "toy_orbit", lambda n, size=32, **kw: orbit(2, size=16, **kw))
        return figures

    monkeypatch.setattr(demo, "judge_edit", judge_then_a_small_turntable)
    args = ["demo", "--out", str(demo_out), "--steps", str(SHAPE_STEPS), "--source-steps", str(DEMO_SOURCE_STEPS),
            "--target", "a red sphere"]
    assert main(args) == 0
    result = json.loads((demo_out / "result_piva.json").read_text())
    m = result["metrics"]
    assert result["edit_geometry"] is True
    assert m["silhouette_iou_vs_target_geometry"] > m["silhouette_iou_vs_target_geometry_original"] + 0.15, m
    assert m["judge_p_target"] > m["judge_p_target_original"], m


def test_silhouette_iou_against_the_original_scene_counts_what_the_edit_changed():
    """The exact renders of a cube and a sphere: the figure equals a hand count of pixels covered in either
    image but not both (alpha masks), and an unchanged scene scores 1."""
    from piva.toyworld.evaluate import exact_edit_figures

    cams = toy_orbit(3, size=48)
    cube, sphere = Scene.from_caption("a red cube"), Scene.from_caption("a red sphere")
    rgb = lambda s: torch.from_numpy(np.stack([render(s, c)["rgb"] for c in cams])).permute(0, 3, 1, 2).float()  # noqa: E731
    alpha = [np.stack([render(s, c)["alpha"] for c in cams]) > 0.5 for s in (cube, sphere)]
    by_hand = np.mean([(a & b).sum() / (a | b).sum() for a, b in zip(*alpha)])
    moved = exact_edit_figures(rgb(sphere), rgb(cube), cube, sphere, cams)
    assert 0.5 < by_hand < 0.95 and moved["silhouette_iou_vs_original"] == pytest.approx(by_hand, abs=0.03)
    kept = exact_edit_figures(rgb(cube), rgb(cube), cube, Scene.from_caption("a blue cube"), cams)
    assert kept["silhouette_iou_vs_original"] == 1.0


def test_background_of_a_shape_change_to_a_cube_allows_any_yaw():
    """A sphere turned into a cube that faces another way than the toy scene's cube: background PSNR counts the
    pixels outside the sphere and the cube at every yaw (by hand: 90 yaws), so its corners cost nothing while a
    change outside that region does; the exact-pose figure charges the corners too (by hand: the scene's yaw).
    Its silhouette matches the cube at the best yaw."""
    from piva.toyworld.evaluate import exact_edit_figures, target_poses

    cams = toy_orbit(4, size=48)
    sphere, cube = Scene.from_caption("a purple sphere"), Scene.from_caption("a purple cube")
    rgb = lambda s: torch.from_numpy(np.stack([render(s, c)["rgb"] for c in cams])).permute(0, 3, 1, 2).float()  # noqa: E731
    alpha = lambda s: np.stack([render(s, c)["alpha"] for c in cams])  # noqa: E731
    original, edited = rgb(sphere), rgb(cube.with_(yaw=1.0))
    edited[:, :, :4, :4] -= 0.05  # a faint change in a corner of every view, away from any silhouette
    err = ((edited - original) ** 2).mean(1).numpy()
    swept = np.max([alpha(cube.with_(yaw=y)) for y in np.linspace(0, math.pi / 2, 90)], 0)
    by_hand = {name: 10 * math.log10(1 / err[(alpha(sphere) + a) <= 0.01].mean())
               for name, a in (("any", swept), ("exact", alpha(cube)))}
    figures = exact_edit_figures(edited, original, sphere, cube, cams)
    assert figures["background_psnr_vs_original"] == pytest.approx(by_hand["any"], abs=0.3)
    assert figures["background_psnr_vs_original_exact_pose"] == pytest.approx(by_hand["exact"], abs=0.3)
    assert by_hand["exact"] < by_hand["any"] - 3
    # Its shape is the target's at the best-fitting yaw, not at the scene's own.
    assert figures["silhouette_iou_vs_target_any_pose"] > 0.9  # edge pixels at 48 px: 0.94 measured
    assert figures["silhouette_iou_vs_target_geometry"] < figures["silhouette_iou_vs_target_any_pose"] - 0.05
    # Where the source fixes the pose (a cube keeps its yaw) or the shape has none, only the exact scene counts.
    assert target_poses(cube, cube.with_(color="blue")) == [cube.with_(color="blue")]
    assert target_poses(cube, sphere) == [sphere]
