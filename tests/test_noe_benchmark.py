"""The Noe evaluator, mesh preparation, leaderboards and the resumable runner."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from piva.metrics.evaluate import MetricUnavailable, evaluate_views, load_clip, load_lpips

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# ---------------------------------------------------------------------------- preparation
def test_mesh_renderer_matches_the_exact_toy_render():
    """A trimesh cube rendered by the Noe renderer = the toy world's closed-form cube (independent code)."""
    import trimesh

    from piva.data.mesh import render_mesh
    from piva.data.views import Camera, look_at
    from piva.toyworld.scenes import BACKGROUND, COLORS, Scene, render

    box = trimesh.creation.box(extents=[1, 1, 1])
    box.apply_transform(trimesh.transformations.rotation_matrix(0.35, [0, 0, 1]))
    rgba = [round(c * 255) for c in COLORS["red"]] + [255]
    box.visual = trimesh.visual.ColorVisuals(box, face_colors=np.tile(rgba, (len(box.faces), 1)))
    for az, el in ((30, 30), (200, 55)):
        cam = Camera(look_at(az, el, 3.6), 40.0, 24, 24)
        mesh, exact = render_mesh([box], cam, background=BACKGROUND), render(Scene.from_caption("a red cube"), cam)
        np.testing.assert_allclose(mesh["alpha"], exact["alpha"], atol=1e-6)
        assert np.abs(mesh["rgb"] - exact["rgb"]).max() < 0.01  # colours quantised to 8 bits
        both = np.isfinite(exact["depth"])
        np.testing.assert_allclose(mesh["depth"][both], exact["depth"][both], atol=1e-4)


def test_objects_are_scaled_into_the_radius_2_sphere_and_written_as_blender_data(tmp_path):
    import trimesh

    from piva.data.mesh import load_meshes, normalize_to_sphere
    from piva.noe.prepare import PrepareOptions, write_dataset

    mesh_file = tmp_path / "thing.glb"
    trimesh.creation.cylinder(radius=3.0, height=10.0).apply_translation([5, 1, 2]).export(mesh_file)
    meshes = normalize_to_sphere(load_meshes(mesh_file))
    r = np.linalg.norm(np.concatenate([m.vertices for m in meshes]), axis=1)
    assert r.max() == pytest.approx(2.0)
    obj = {"id": "thing", "source": "local", "path": str(mesh_file), "source_prompt": "a thing"}
    from piva.noe.presets import PRESETS

    small = dataclasses.replace(PRESETS["toy"], capture_views=6, capture_size=16)
    data = write_dataset(obj, PrepareOptions(root=tmp_path / "noe", preset=small))
    meta = json.loads((data / "transforms_train.json").read_text())
    assert len(meta["frames"]) == 6
    import imageio.v3 as iio

    img = iio.imread(data / "train" / "r_0.png")
    assert img.shape == (16, 16, 4) and img[..., 3].max() == 255 and img[..., 3].min() == 0
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig

    parsed = BlenderDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert len(parsed.image_filenames) == 6


def test_evaluation_views_follow_the_objects_capture(tmp_path):
    """A user's mesh (scaled to fit the frame, captured from 4 at fov 50) under --preset toy is evaluated as it
    was captured: same apparent size, wholly in frame; the toy objects' orbit (3.6, fov 40) cut it off."""
    import imageio.v3 as iio
    import trimesh

    from piva.data.cameras import noe_cameras
    from piva.data.mesh import load_meshes, normalize_to_sphere, render_mesh
    from piva.data.views import Camera, capture_geometry
    from piva.noe.prepare import PrepareOptions, write_dataset
    from piva.noe.presets import PRESETS, EvalOrbit

    mesh_file = tmp_path / "box.glb"
    trimesh.creation.box(extents=(3, 3, 3)).apply_translation([1, 2, 3]).export(mesh_file)
    obj = {"id": "box", "source": "local", "path": str(mesh_file), "source_prompt": "a box"}
    small = dataclasses.replace(PRESETS["toy"], capture_views=6, capture_size=32)
    data = write_dataset(obj, PrepareOptions(root=tmp_path / "noe", preset=small))
    capture = capture_geometry(data)
    assert capture["distance"] == pytest.approx(4.0) and capture["fov_y"] == pytest.approx(50.0)
    from piva.noe.prepare import FRAME_RADIUS

    meshes = normalize_to_sphere(load_meshes(mesh_file), radius=FRAME_RADIUS)

    def alphas(orbit):
        cams = noe_cameras(8, elevation=orbit.elevation, distance=orbit.distance, fov_y=orbit.fov_y)
        return [render_mesh(meshes, Camera(c, cams["fov_y"], 32, 32))["alpha"] for c in cams["c2w"][:4]]

    def at_frame(views):  # share of border pixels covered by the object
        return np.mean([(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]) > 0.5).mean() for a in views])

    def diameter(views):
        sizes = []
        for a in views:
            rows, cols = np.nonzero(a > 0.5)
            sizes.append(max(rows.max() - rows.min(), cols.max() - cols.min()) + 1)
        return np.mean(sizes)

    captured = [iio.imread(f)[..., 3] / 255.0 for f in sorted((data / "train").glob("r_*.png"))]
    followed = alphas(small.eval.follow(capture))
    fixed_toy_orbit = alphas(EvalOrbit(elevation=30.0, distance=3.6, fov_y=40.0, size=32))
    assert diameter(followed) == pytest.approx(diameter(captured), abs=1.5)
    assert at_frame(captured) == 0 and at_frame(followed) == 0  # wholly in frame
    assert at_frame(fixed_toy_orbit) > 0.3


def test_a_folder_of_posed_images_is_used_as_it_is(tmp_path):
    from piva.data.views import capture_geometry, hemisphere_cameras, write_blender_dataset
    from piva.noe.prepare import NotAvailable, PrepareOptions, write_dataset

    folder = tmp_path / "vase"
    flat = lambda cam: {"rgb": np.full((8, 8, 3), 0.5), "alpha": np.ones((8, 8))}  # noqa: E731
    write_blender_dataset(folder, {"train": hemisphere_cameras(3, 8, 45.0, 3.0)}, flat, rgba=True)
    obj = {"id": "vase", "source": "local", "path": str(folder), "source_prompt": "a vase"}
    opts = PrepareOptions(root=tmp_path / "noe", preset="toy")
    assert write_dataset(obj, opts) == folder
    assert capture_geometry(folder)["distance"] == pytest.approx(3.0) and capture_geometry(folder)["fov_y"] == pytest.approx(45.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAvailable, match="no transforms_train.json"):
        write_dataset(dict(obj, path=str(tmp_path / "empty")), opts)


def test_toy_judge_scores_only_captions_it_knows():
    from piva.noe.runner import image_text_for

    judge = object()
    models = {"image_text": judge, "unavailable": {"clip": "toy world"}}
    toy = {"source_prompt": "a red cube", "target_prompt": "a red cube on a white plate"}
    bear = {"source_prompt": "a teddy bear", "target_prompt": "a golden wooden cabin"}
    assert image_text_for(toy, models, "toy") == (judge, {"clip": "toy world"})
    model, missing = image_text_for(bear, models, "toy")
    assert model is None and "'a teddy bear'" in missing["judge"] and missing["clip"] == "toy world"
    assert image_text_for(bear, models, "full")[0] is judge  # CLIP reads any caption
    assert models["unavailable"] == {"clip": "toy world"}  # the shared record is not changed


def test_offline_preparation_says_what_it_cannot_fetch(tmp_path, monkeypatch):
    from piva.noe.prepare import PrepareOptions, prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = json.loads((ROOT / "benchmark" / "noe" / "manifest.json").read_text())
    wanted = ["chair", next(o["id"] for o in manifest["objects"] if o["source"] == "objaverse")]
    t0 = time.perf_counter()
    status = prepare(manifest, PrepareOptions(root=tmp_path), object_ids=wanted, train=False)
    assert time.perf_counter() - t0 < 30
    assert set(status) == set(wanted)
    for oid in wanted:
        reason = status[oid]["unavailable"]
        assert "offline" in reason or "not installed" in reason, reason


# ---------------------------------------------------------------------------- evaluator
def test_evaluator_against_hand_computed_values():
    g = torch.Generator().manual_seed(0)
    original = torch.rand(5, 3, 8, 8, generator=g)
    edited = (original + 0.1 * torch.randn(5, 3, 8, 8, generator=g)).clamp(0, 1)
    edited[-1] = 0  # the duplicated end view: must not count
    unique = torch.tensor([True, True, True, True, False])
    out = evaluate_views(edited, original, "a red cube", "a blue cube", unique)
    mse = ((edited[:4] - original[:4]) ** 2).flatten(1).mean(1)
    assert out["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert out["views"] == 4

    class Fixed:  # a fixed linear "CLIP" so the CLIP figures can be checked by hand
        name, is_clip = "fixed linear map", True

        @staticmethod
        def encode_images(x):
            return x.mean((2, 3))

        @staticmethod
        def encode_texts(captions):
            return torch.tensor([[0.0, 0.0, 1.0] if "blue" in c else [1.0, 0.0, 0.0] for c in captions])

    out = evaluate_views(edited, original, "a red cube", "a blue cube", unique, image_text=Fixed)
    e = torch.nn.functional.normalize(edited[:4].mean((2, 3)), dim=-1)
    assert out["clip_score"] == pytest.approx(float(e[:, 2].mean()), rel=1e-5)
    assert out["models"] == {"clip": "fixed linear map"}


def test_evaluator_refuses_nan_and_mismatched_renders():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_views(x.clone().fill_(float("nan")), x, "a", "b")
    with pytest.raises(ValueError, match="alike"):
        evaluate_views(x[:1], x, "a", "b")


def test_missing_clip_and_lpips_weights_are_reported_not_faked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(MetricUnavailable, match="CLIP ViT-B-32"):
        load_clip("ViT-B-32", "openai")
    with pytest.raises(MetricUnavailable, match="does not exist"):
        load_clip("ViT-B-32", "openai", weights=tmp_path / "nope.safetensors")
    with pytest.raises(MetricUnavailable, match="AlexNet"):
        load_lpips()
    assert time.perf_counter() - t0 < 60  # an error, not a hang on the network


_WITHOUT_NERFSTUDIO = """
import importlib.abc, sys

class NoNerfstudio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nerfstudio":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoNerfstudio())
from piva.metrics.evaluate import MetricUnavailable, load_lpips
try:
    name, fn = load_lpips()
    print("loaded", callable(fn))
except MetricUnavailable as exc:
    print("unavailable", exc)
print("nerfstudio imported:", any(m.split(".")[0] == "nerfstudio" or m.startswith("piva.nerfstudio") for m in sys.modules))
"""


@pytest.mark.parametrize("weights", ["cached", "missing"])
def test_lpips_loads_without_nerfstudio(tmp_path, weights):
    """The threestudio backend runs where nerfstudio is not installed: LPIPS must load, or say why, not crash."""
    from piva.metrics.evaluate import ALEXNET_FILE

    torch_home = tmp_path / "torch"
    if weights == "cached":  # a readable AlexNet file (seeded random weights: the real ones cannot be downloaded)
        from test_metrics import write_alexnet

        assert write_alexnet(torch_home).name == ALEXNET_FILE
    env = {**os.environ, "TORCH_HOME": str(torch_home), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _WITHOUT_NERFSTUDIO], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("loaded True" if weights == "cached" else "unavailable "), res.stdout
    assert weights == "cached" or "AlexNet" in res.stdout
    assert "nerfstudio imported: False" in res.stdout


def test_a_sweep_variant_is_the_registered_method_with_only_its_knobs_changed(tmp_path):
    from piva.nerfstudio import runs
    from piva.nerfstudio.piva_config import METHODS
    from piva.noe.runner import check_methods, method_variant
    from piva.noe.prepare import toy_object_scene

    assert method_variant("piva+identity_weight=0+adapter_rank=8") == ("piva", {"identity_weight": 0.0, "adapter_rank": 8})
    assert method_variant("dds") == ("dds", {})
    assert method_variant("dds+same_latent=true+pixel_gradient=decoded+anneal_step=100") == (  # Optional, Literal
        "dds", {"same_latent": True, "pixel_gradient": "decoded", "anneal_step": 100})
    check_methods(["piva+identity_weight=1.5", "dds+noise_draws=2", "no-edit"])
    for bad, why in (("piva+identity_weight", "KEY=VALUE"), ("piva+lambda=1", "not KEY=VALUE"),
                     ("piva+adapter_rank=x", "takes a int"), ("no-edit+identity_weight=0", "only a method that edits"),
                     ("piva+mode=dds", "not KEY=VALUE"), ("pivaa", "unknown method"),
                     ("dds+same_latent=yes", "true or false"), ("piva+pixel_gradient=x", "one of encoder, decoded"),
                     ("piva+t_range=0.1", "not KEY=VALUE")):
        with pytest.raises(ValueError, match=why):
            check_methods([bad])
    base, knobs = method_variant("piva+identity_weight=0")
    cfg = runs.edit_config("piva-object", toy_object_scene(tmp_path / "data"), tmp_path / "load", tmp_path / "out",
                           "a red cube", "a blue cube", runs.TOY_SIZE, diffusion_model="m", guidance=knobs)
    diff = set(runs.config_differences(METHODS["piva-object"].config, cfg)) - runs.SIZE_FIELDS - runs.INPUT_FIELDS
    assert diff == {"pipeline.guidance.identity_weight"} and cfg.pipeline.guidance.identity_weight == 0.0
    assert cfg.pipeline.guidance.anneal_step == runs.TOY_SIZE.anneal_step


# ---------------------------------------------------------------------------- leaderboards
def _fake_result(out: Path, method: str, edit_id: str, kind: str, clip: float, lpips: float, toy=None,
                 seed: int = 0, wall_time_s: Optional[float] = 1.0) -> None:
    """A stored result as run_one writes it (values chosen by hand, to check the aggregation)."""
    from piva.noe.runner import result_path, save_thumbnail

    edit = {"id": edit_id, "object": "o", "source_prompt": "a red cube", "target_prompt": "a blue cube",
            "instruction": "x", "type": kind}
    rec = {"edit": edit, "method": method, "seed": seed, "preset": "toy", "metrics": {"clip_score": clip, "lpips": lpips, "psnr": 20.0,
           "models": {"clip": "test"}, **({"toy": toy} if toy else {})}, "wall_time_s": wall_time_s, "peak_memory": {"process_peak_rss_mb": 100.0},
           "thumbnail": result_path(out, method, edit_id, seed).with_suffix(".png").name}
    path = result_path(out, method, edit_id, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    save_thumbnail(path.with_suffix(".png"), torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8))


def test_leaderboard_means_per_method_and_type(tmp_path):
    from piva.noe.leaderboard import write_leaderboards

    _fake_result(tmp_path, "piva", "e1", "texturing", 0.30, 0.10)
    _fake_result(tmp_path, "piva", "e2", "addition", 0.20, 0.20)
    _fake_result(tmp_path, "dds", "e1", "texturing", 0.25, 0.40)
    pages = write_leaderboards(tmp_path, "test")
    md = Path(pages["markdown"]).read_text()
    assert "| piva | 2 | 0 | 0.2500 |" in md  # mean CLIP of 0.30 and 0.20
    assert "| dds | 1 | 0 | 0.2500 |" in md
    assert "| piva | addition | 1 | 0 | 0.2000 |" in md
    # a second seed of one method: its rows say they cover other draws than the others'
    _fake_result(tmp_path, "piva", "e1", "texturing", 0.40, 0.10, seed=1)
    md = Path(write_leaderboards(tmp_path, "test")["markdown"]).read_text()
    assert "| piva | 3 | 0,1 | 0.3000 |" in md and "| dds | 1 | 0 | 0.2500 |" in md
    assert "| piva | texturing | 2 | 0,1 | 0.3500 |" in md
    # the paper's Noe rows only where they compare: the Noe manifest
    assert "(reported" not in md and "(reported" not in Path(pages["html"]).read_text()
    pages = write_leaderboards(tmp_path, "noe", reported=True)
    assert "(reported" in Path(pages["markdown"]).read_text() and "0.1133" in Path(pages["markdown"]).read_text()
    assert "(reported" in Path(pages["html"]).read_text()


def _manifest(name: str) -> dict:
    return json.loads((ROOT / "benchmark" / "noe" / name).read_text())


def test_reported_rows_come_from_the_manifest_they_were_measured_on(tmp_path):
    """in2n's leaderboard shows the PiVa paper's table 3 (its 12 edits, CLIP and PSNR/LPIPS against the photographs)
    and not Noe's table 2;
    Noe's shows table 2 (112 edits) and not table 3; a manifest without a `reported` block shows none."""
    from piva.noe.leaderboard import reported_rows, write_leaderboards

    _fake_result(tmp_path, "piva", "face-clown", "texturing", 0.26, 0.30)
    _fake_result(tmp_path, "dds", "face-clown", "texturing", 0.22, 0.40)
    table3 = {"in2n": ("0.2380", "15.84", "0.3560"), "dds": ("0.2250", "16.05", "0.3940"),
              "pds": ("0.2480", "17.56", "0.3920"), "piva": ("0.2500", "18.60", "0.3120")}
    pages = write_leaderboards(tmp_path, "in2n", reported=reported_rows(_manifest("in2n-manifest.json")))
    md, page = Path(pages["markdown"]).read_text(), Path(pages["html"]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | edits |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for method, (clip, psnr, lpips) in table3.items():
        label = f"{method} (reported, PiVa paper, table 3)"
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
        assert (cells["edits"], cells["CLIP ↑"], cells["PSNR photos ↑"], cells["LPIPS photos ↓"]) == ("12", clip, psnr, lpips)
        assert cells["PSNR ↑"] == "–"  # measured against the photographs, not against the original's renders
        assert label in page and f"<td>{psnr}</td>" in page
    assert md.count("(reported,") == 4 and "table 2" not in md and "0.1133" not in md and "0.1133" not in page
    assert "every dataset viewpoint" in md  # what the reported figures measured

    pages = write_leaderboards(tmp_path, "noe", reported=reported_rows(_manifest("manifest.json")))
    md = Path(pages["markdown"]).read_text()
    assert "| piva (reported, PiVa paper, table 2) | 112 | – | 0.2450 |" in md and "0.1133" in md
    assert "| dds (reported, PiVa paper, table 2) | 112 | – | 0.2420 |" in md and "table 3" not in md
    assert Path(write_leaderboards(tmp_path, "noe", reported=True)["markdown"]).read_text() == md  # no manifest at hand
    assert reported_rows(_manifest("toy-manifest.json")) is None
    md = Path(write_leaderboards(tmp_path, "toy", reported=None)["markdown"]).read_text()
    assert "(reported" not in md


def test_capture_figures_get_their_own_columns(tmp_path):
    """A capture's figures against its photographs, and a person's face figures, are columns of their own."""
    from piva.noe.leaderboard import write_leaderboards
    from piva.noe.runner import result_path

    _fake_result(tmp_path, "piva", "face-clown", "texturing", 0.26, 0.30)
    path = result_path(tmp_path, "piva", "face-clown")
    rec = json.loads(path.read_text())
    rec["metrics"].update(against_photos={"views": 6, "psnr": 17.25, "ssim": 0.5, "lpips": 0.321},
                          identity_same_person=0.75, identity_distance=0.42, identity=0.97)
    path.write_text(json.dumps(rec))
    md = Path(write_leaderboards(tmp_path, "in2n")["markdown"]).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | edits |"))
    row = next(line for line in md.splitlines() if line.startswith("| piva |"))
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], (c.strip() for c in row.strip("|").split("|"))))
    assert (cells["PSNR photos ↑"], cells["LPIPS photos ↓"], cells["PSNR ↑"]) == ("17.2", "0.3210", "20.0")
    assert (cells["same person ↑"], cells["face dist ↓"]) == ("0.7500", "0.4200")


def test_the_benchmark_command_passes_the_manifest_s_reported_rows(tmp_path, monkeypatch):
    """benchmark/run.py --leaderboard-only hands the chosen manifest's `reported` block to the leaderboard."""
    import piva.noe.leaderboard as leaderboard

    sys.path.insert(0, str(ROOT / "benchmark"))
    try:
        import run as bench
    finally:
        sys.path.pop(0)

    seen = []
    monkeypatch.setattr(leaderboard, "write_leaderboards",
                        lambda out, name, reported=None: seen.append((name, reported)))
    assert bench.main(["--manifest", str(ROOT / "benchmark" / "noe" / "in2n-manifest.json"), "--out", str(tmp_path),
                       "--leaderboard-only"]) == 0
    assert bench.main(["--toy", "--out", str(tmp_path), "--leaderboard-only"]) == 0
    (name, in2n), (_, toy) = seen
    assert name == "in2n" and in2n["edits"] == 12 and set(in2n["rows"]) == {"in2n", "dds", "pds", "piva"}
    assert toy is None


def test_paired_piva_minus_dds_with_a_bootstrap_interval(tmp_path):
    """Mean paired difference by hand; the interval against a hand percentile bootstrap; 'both succeed' filters."""
    import numpy as np

    from piva.noe.leaderboard import paired, write_leaderboards

    bg_piva, bg_dds = [31.0, 33.0, 30.0, 35.0, 29.0], [30.0, 30.5, 30.0, 31.0, 29.5]
    success_dds = [0.9, 0.8, 0.2, 1.0, 0.75]
    for i in range(5):
        _fake_result(tmp_path, "piva", f"e{i}", "addition", 0.3, 0.1,
                     toy={"judge_success_rate": 0.9, "background_psnr_vs_original": bg_piva[i]})
        _fake_result(tmp_path, "dds", f"e{i}", "addition", 0.3, 0.1,
                     toy={"judge_success_rate": success_dds[i], "background_psnr_vs_original": bg_dds[i]})
    from piva.noe.leaderboard import load_results

    rows = load_results(tmp_path)
    pairs = {(p["subset"][:4], p["figure"]): p for p in paired(rows)}
    d = np.array(bg_piva) - np.array(bg_dds)
    everything = pairs[("all ", "toy_background_psnr_vs_original")]
    assert everything["n"] == 5 and everything["mean"] == pytest.approx(d.mean())
    rng = np.random.default_rng(1)
    means = d[rng.integers(0, 5, size=(20000, 5))].mean(1)
    assert everything["low"] == pytest.approx(np.percentile(means, 2.5), abs=0.1)
    assert everything["high"] == pytest.approx(np.percentile(means, 97.5), abs=0.1)
    right = pairs[("both", "toy_background_psnr_vs_original")]  # e2 left out: DDS failed it
    assert right["n"] == 4 and right["mean"] == pytest.approx(np.delete(d, 2).mean())
    by_type = pairs[("addi", "toy_background_psnr_vs_original")]  # per edit type, at equal success
    assert by_type["n"] == 4 and by_type["mean"] == pytest.approx(right["mean"])
    assert ("addi", "psnr") not in pairs and not any(s == "text" for s, _ in pairs)
    md = Path(write_leaderboards(tmp_path, "test")["markdown"]).read_text()
    assert "PiVa − DDS (and − SDS; splats − NeRF) on the same edits" in md and "| success ↑ | bg PSNR ↑ |" in md
    # a sweep variant is paired with DDS, and PiVa with it (what the variant leaves out is what PiVa adds)
    bg_variant = [30.5, 31.0, 30.0, 33.0, 29.0]
    for i in range(5):
        _fake_result(tmp_path, "dds+same_latent=true", f"e{i}", "addition", 0.3, 0.1,
                     toy={"judge_success_rate": 0.9, "background_psnr_vs_original": bg_variant[i]})
    from piva.noe.leaderboard import paired_with_dds

    pairs = {(p["method"], p["subset"][:4], p["figure"]): p for p in paired_with_dds(load_results(tmp_path))}
    key = "toy_background_psnr_vs_original"
    assert pairs[("piva − dds", "all ", key)]["mean"] == pytest.approx(d.mean())
    assert pairs[("piva − dds+same_latent=true", "all ", key)]["mean"] == pytest.approx(
        np.mean(np.array(bg_piva) - bg_variant))
    assert pairs[("dds+same_latent=true − dds", "both", key)]["n"] == 4  # e2: DDS failed it
    assert not any(m == "piva − sds" for m, _, _ in pairs)  # no SDS results: no such rows
    bg_sds = [28.0, 30.0, 29.0, 30.0, 27.0]
    for i in range(5):
        _fake_result(tmp_path, "sds", f"e{i}", "addition", 0.3, 0.1,
                     toy={"judge_success_rate": 0.95, "background_psnr_vs_original": bg_sds[i]})
    pairs = {(p["method"], p["subset"][:4], p["figure"]): p for p in paired_with_dds(load_results(tmp_path))}
    assert pairs[("piva − sds", "all ", key)]["mean"] == pytest.approx(np.mean(np.array(bg_piva) - bg_sds))
    # splats beside the NeRF edits: differences, and the time of each splat edit over the NeRF edit's
    bg_splat, time_splat, time_piva = [25.0, 31.0, 29.0, 30.0], [50.0, 60.0, None, 90.0], [100.0, 200.0, 100.0, 100.0]
    for i in range(4):  # e2's splat edit was resumed: no time, left out of the ratio
        _fake_result(tmp_path, "piva-splat", f"e{i}", "addition", 0.3, 0.1, wall_time_s=time_splat[i],
                     toy={"judge_success_rate": 0.9, "background_psnr_vs_original": bg_splat[i]})
        _fake_result(tmp_path, "piva", f"e{i}", "addition", 0.3, 0.1, wall_time_s=time_piva[i],
                     toy={"judge_success_rate": 0.9, "background_psnr_vs_original": bg_piva[i]})
    pairs = {(p["method"], p["subset"][:4], p["figure"]): p for p in paired_with_dds(load_results(tmp_path))}
    assert pairs[("piva-splat − piva", "all ", key)]["mean"] == pytest.approx(np.mean(np.array(bg_splat) - bg_piva[:4]))
    ratio = pairs[("piva-splat / piva", "all ", "wall_time_s ratio")]
    assert ratio["n"] == 3 and ratio["mean"] == pytest.approx(np.mean([0.5, 0.3, 0.9]))
    assert not any(m == "piva-splat − dds-splat" or m.startswith("piva − piva") for m, _, _ in pairs)
    md = Path(write_leaderboards(tmp_path, "test")["markdown"]).read_text()
    assert "| piva-splat / piva | all shared edits | wall_time_s ratio | 3 | 0.5667 |" in md


def test_comparison_grid_puts_each_methods_edit_in_its_column(tmp_path):
    """Plain-colour thumbnails: the original's colour in the first column, each method's in its own, grey where a
    method has no result for that edit; the lowest seed of each edit is shown."""
    from piva.noe.leaderboard import GRID, comparison_grid, write_leaderboards
    from piva.noe.runner import result_path, save_thumbnail

    colours = {"piva": (1.0, 0.0, 0.0), "dds": (0.0, 0.0, 1.0)}
    runs = [("piva", "e1", 0), ("dds", "e1", 0), ("piva", "e2", 0), ("piva", "e2", 1)]
    for method, edit, seed in runs:
        _fake_result(tmp_path, method, edit, "texturing", 0.3, 0.1, seed=seed)
        colour = (0.0, 1.0, 0.0) if seed else colours[method]  # seed 1 must not be shown
        edited = torch.tensor(colour).view(1, 3, 1, 1).expand(5, 3, 8, 8)
        save_thumbnail(result_path(tmp_path, method, edit, seed).with_suffix(".png"), torch.full((5, 3, 8, 8), 0.2),
                       edited)
    from piva.noe.leaderboard import load_results

    image, labels, columns = comparison_grid(load_results(tmp_path), tmp_path)
    assert columns == ["original", "piva", "dds"] and len(labels) == 2
    cell = 96  # 8 px thumbnails are enlarged 12x
    assert image.shape == (2 * cell, 3 * 2 * cell, 3)

    def block(row: int, col: int):  # col: original, piva, dds -> two views each
        return image[row * cell:(row + 1) * cell, col * 2 * cell:(col + 1) * 2 * cell].reshape(-1, 3)

    for row in (0, 1):
        assert (block(row, 0) == 51).all()
        assert (block(row, 1) == [255, 0, 0]).all()
    assert (block(0, 2) == [0, 0, 255]).all()
    assert (block(1, 2) == 128).all()  # e2 has no DDS result
    write_leaderboards(tmp_path, "test")
    assert (tmp_path / GRID).stat().st_size > 1000 and GRID in (tmp_path / "leaderboard.md").read_text()


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="chromium is not installed (CI installs it)")
def test_leaderboard_page_loads_in_headless_chromium(tmp_path):
    from piva.noe.leaderboard import write_leaderboards

    assert CHROMIUM, "CI must install chromium (.ci/run)"
    _fake_result(tmp_path, "piva", "e1", "texturing", 0.30, 0.10)
    _fake_result(tmp_path, "dds", "e1", "texturing", 0.25, 0.40)
    page = Path(write_leaderboards(tmp_path, "test")["html"])
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files"]
    shot = tmp_path / "page.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 5000
    dom = subprocess.run(flags + ["--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert 'data-status="ok 4 images"' in dom, dom[-500:]  # 2 thumbnails, the plot and the grid, all loaded


# ---------------------------------------------------------------------------- the runner, end to end
def _run(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "benchmark" / "run.py"), "--toy", "--out", str(out), "--limit", "1",
           "--source-steps", "150", "--edit-steps", "8", "--eval-views", "9", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _stored(opts, method: str, edit: dict, seed: int = 0, **changes) -> Path:
    """A result file as run_one stores it for these options (provenance included), with `changes` to its
    provenance: a result made otherwise."""
    from piva.noe.runner import provenance, result_path

    path = result_path(opts.out, method, edit["id"], seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"edit": edit, "method": method, "seed": seed, "metrics": {"psnr": 20.0},
           "provenance": {**provenance(opts, method, seed), **changes}}
    path.write_text(json.dumps(rec))
    return path


def test_a_result_made_otherwise_is_never_counted_as_done(tmp_path, capsys):
    """Backend, preset, edit steps, knobs, seed, prompts or the source scene differ: the edit runs again. A folder
    made with other settings refuses a run in one line, and the default folder is named after them."""
    from piva.noe.runner import RunOptions, check_out, default_out, pending

    edit = {"id": "e1", "object": "o", "source_prompt": "a red cube", "target_prompt": "a blue cube"}
    manifest = {"objects": [{"id": "o", "source": "toyworld"}], "edits": [edit]}
    opts = RunOptions(out=tmp_path, methods=("piva",), preset="toy")
    todo = lambda: [(e["id"], m, s) for e, _, m, s in pending(manifest, [edit], opts)]  # noqa: E731
    _stored(opts, "piva", edit)
    assert todo() == []
    for change in ({"backend": "threestudio"}, {"preset": "full"}, {"edit_steps": 8}, {"seed": 3},
                   {"guidance_changes": {"identity_weight": 0.0}}, {"source_steps": 150}):
        _stored(opts, "piva", edit, **change)
        assert todo() == [("e1", "piva", 0)], change
        assert "running that edit again" in capsys.readouterr().out
    path = _stored(opts, "piva", edit)
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "edit": {**edit, "target_prompt": "a green cube"}}))
    assert todo() == [("e1", "piva", 0)]
    # the source scene was rebuilt since the result was made: its fingerprint tells
    _stored(opts, "piva", edit, source_fingerprint="0123456789abcdef")
    (tmp_path / "objects" / "o").mkdir(parents=True)
    (tmp_path / "objects" / "o" / "prepared.json").write_text(json.dumps({"source_fingerprint": "fedcba9876543210"}))
    from piva.noe.prepare import PrepareOptions

    opts.prepare = PrepareOptions(root=tmp_path, preset="toy")
    assert todo() == [("e1", "piva", 0)]
    _stored(opts, "piva", edit, source_fingerprint="fedcba9876543210")
    assert todo() == []
    # a result from before provenance was recorded: its top-level fields are what it was made with
    legacy = {"edit": edit, "method": "piva", "seed": 0, "preset": "toy", "backend": "nerfstudio", "edit_steps": 450,
              "guidance_changes": {}, "metrics": {"psnr": 20.0}}
    path.write_text(json.dumps(legacy))
    assert todo() == []
    path.write_text(json.dumps({**legacy, "edit_steps": 300}))
    assert todo() == [("e1", "piva", 0)]

    check_out(opts)  # records the folder's settings
    other = RunOptions(out=tmp_path, methods=("piva",), preset="toy", backend="threestudio")
    with pytest.raises(ValueError, match="backend 'nerfstudio' .now 'threestudio'.*another --out"):
        check_out(other)
    assert default_out("toy") != default_out("toy", "threestudio") != default_out("toy", edit_steps=8)
    assert default_out("toy", "nerfstudio", 8, 150).name == "noe-toy-edit8-source150"


def test_the_leaderboard_leaves_out_results_made_otherwise_and_lists_failures(tmp_path):
    from piva.noe.leaderboard import write_leaderboards

    _fake_result(tmp_path, "piva", "e1", "texturing", 0.30, 0.10)
    _fake_result(tmp_path, "piva", "e2", "texturing", 0.90, 0.90)
    (tmp_path / "benchmark.json").write_text(json.dumps({"backend": "nerfstudio", "preset": "toy", "edit_steps": 450}))
    for name, backend in (("e1", "nerfstudio"), ("e2", "threestudio")):
        path = tmp_path / "results" / "piva" / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "backend": backend, "edit_steps": 450}))
    (tmp_path / "failed.json").write_text(json.dumps({"dds/e1": {"why": "RuntimeError: boom (at x.py:3)"}}))
    md = (Path(write_leaderboards(tmp_path, "test")["markdown"])).read_text()
    assert "| piva | 1 |" in md and "0.3" in md and "0.9" not in md.split("## Left out")[0]
    assert "results/piva/e2.json: backend 'threestudio'" in md
    assert "| dds/e1 | RuntimeError: boom (at x.py:3) |" in md
    assert "Made with: backend nerfstudio, preset toy, edit steps 450" in md


def test_one_writer_per_edit(tmp_path):
    """An edit held by another process is refused at once (NotAvailable, one line), before any training."""
    import multiprocessing as mp

    from piva.noe.prepare import NotAvailable
    from piva.noe.runner import RunOptions, edit_lock, run_one

    opts = RunOptions(out=tmp_path, methods=("piva",), preset="toy")
    ctx = mp.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(opts, ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        edit = {"id": "e1", "object": "o", "source_prompt": "a red cube", "target_prompt": "a blue cube"}
        with pytest.raises(NotAvailable, match="another process is running piva/e1"):
            run_one(edit, {"id": "o", "source": "toyworld"}, "piva", opts, {}, 0)
    finally:
        done.set()
        holder.join(30)
    lock = edit_lock(opts, "piva", "e1", 0)
    lock.acquire()  # free again once its holder ended
    lock.release()


def _hold_lock(opts, ready, done) -> None:
    from piva.noe.runner import edit_lock

    with edit_lock(opts, "piva", "e1", 0):
        ready.set()
        done.wait(60)


def test_duplicate_methods_are_refused():
    from piva.noe.runner import check_methods

    with pytest.raises(ValueError, match="piva twice"):
        check_methods(["piva", "dds", "piva"])
    check_methods(["piva", "piva+identity_weight=0"])
    with pytest.raises(ValueError, match="piva\\+identity_weight=-1: .*identity_weight"):
        check_methods(["piva+identity_weight=-1"])


def test_seeds_are_runs_of_their_own_and_pair_only_with_the_same_seed(tmp_path):
    """Seed 0 keeps the plain file name; pending goes seed by seed, method by method; the paired table pairs
    (edit, seed) with (edit, seed) and never one seed's result with another's."""
    from piva.noe.leaderboard import load_results, paired
    from piva.noe.runner import RunOptions, pending, result_path

    assert result_path(tmp_path, "piva", "e1").name == "e1.json"
    assert result_path(tmp_path, "piva", "e1", 2).name == "e1@seed2.json"
    manifest = {"objects": [{"id": "o"}], "edits": [{"id": "e1", "object": "o"}, {"id": "e2", "object": "o"}]}
    opts = RunOptions(out=tmp_path, methods=("piva", "dds"), seeds=(0, 1))
    _stored(opts, "dds", manifest["edits"][1], 1)  # stored by this run's settings: not pending
    todo = pending(manifest, manifest["edits"], opts)
    assert [(e["id"], m, s) for e, _, m, s in todo] == [
        ("e1", "piva", 0), ("e2", "piva", 0), ("e1", "dds", 0), ("e2", "dds", 0), ("e1", "piva", 1), ("e2", "piva", 1),
        ("e1", "dds", 1)]
    for f in (tmp_path / "results").rglob("*.json"):
        f.unlink()
    bg = {("piva", 0): 31.0, ("dds", 0): 30.0, ("piva", 1): 33.0, ("dds", 1): 30.5, ("piva", 2): 40.0}
    for (method, seed), value in bg.items():
        for i in range(3):
            _fake_result(tmp_path, method, f"e{i}", "addition", 0.3, 0.1, seed=seed,
                         toy={"judge_success_rate": 0.9, "background_psnr_vs_original": value + i})
    pairs = {(p["subset"][:4], p["figure"]): p for p in paired(load_results(tmp_path))}
    everything = pairs[("all ", "toy_background_psnr_vs_original")]
    assert everything["n"] == 6 and everything["mean"] == pytest.approx((1.0 + 2.5) / 2)  # seed 2 has no DDS


@pytest.mark.slow
def test_toy_benchmark_end_to_end_resumes_after_a_kill(tmp_path):
    """Seed 1 (not the registered config's 42, nor the plain-named seed 0): its own result files and run."""
    out = tmp_path / "noe"
    first = _run(out, "--methods", "no-edit,piva", "--seeds", "1", "--workers", "1")  # one by one: no-edit first
    done_ref = out / "results" / "no-edit" / "toy-red-cube-texturing-0@seed1.json"
    ckpts = out / "work" / "piva" / "toy-red-cube-texturing-0@seed1" / "piva-object" / "run" / "nerfstudio_models"
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None and not list(ckpts.glob("step-*.ckpt")):
        time.sleep(0.5)
    assert first.poll() is None, first.stdout.read()
    os.killpg(first.pid, signal.SIGKILL)  # killed mid-edit
    first.wait()
    assert done_ref.is_file(), "the finished no-edit result must already be stored"
    kept = done_ref.read_bytes(), done_ref.stat().st_mtime_ns
    source_ckpt = next((out / "objects" / "toy-red-cube" / "runs").rglob("step-*.ckpt"))
    source_mtime = source_ckpt.stat().st_mtime_ns
    assert not (out / "results" / "piva").exists() or not list((out / "results" / "piva").glob("*.json"))

    second = _run(out, "--methods", "no-edit,piva", "--seeds", "1", "--workers", "1")
    log = second.communicate(timeout=900)[0]
    assert second.returncode == 0, log
    assert "1 of 2 edits already done" in log
    assert (done_ref.read_bytes(), done_ref.stat().st_mtime_ns) == kept  # not redone
    assert source_ckpt.stat().st_mtime_ns == source_mtime  # the source scene was not retrained
    piva = json.loads((out / "results" / "piva" / "toy-red-cube-texturing-0@seed1.json").read_text())
    assert piva["seed"] == 1 and "seed: 1\n" in (ckpts.parent / "config.yml").read_text()
    steps = sorted(int(p.stem.split("-")[1]) for p in ckpts.glob("step-*.ckpt"))
    state = torch.load(ckpts / f"step-{steps[-1]:09d}.ckpt", map_location="cpu", weights_only=False)
    assert steps[-1] - state["pipeline"]["piva.meta"]["edit_start_step"] == 8 - 1  # 8 steps in all, none twice
    # The resumed edit's time is not an edit's time: kept apart, out of the leaderboard's time column.
    assert piva["wall_time_s"] is None and 1 <= piva["resumed_after_steps"] < 8 and piva["wall_time_after_resume_s"] > 0
    m = piva["metrics"]
    assert m["views"] == 8 and "judge_score" in m and "clip" in m["unavailable"]
    assert piva["registered_method"] == "piva-object"  # the benchmark runs the registered method
    assert 300 < piva["peak_memory"]["process_peak_rss_mb"] < 16_384  # torch + nerfstudio imports alone: ~850 MB
    noedit = json.loads(done_ref.read_text())["metrics"]
    assert noedit["psnr"] > 60 and noedit["ssim"] == pytest.approx(1.0)
    # exact toy figures at the benchmark's own cameras: the judge calls the unedited scene the red cube, not
    # blue, and its silhouette overlaps the exact cube's (a rough 150-step reconstruction: 0.32 measured;
    # 0.9 after 600 steps)
    toy = noedit["toy"]
    assert toy["judge_source_rate"] >= 0.5 and toy["judge_success_rate"] < 0.2, toy
    assert toy["silhouette_iou_vs_source_geometry"] > 0.2 and toy["background_psnr_vs_original"] > 60, toy
    assert toy["silhouette_iou_vs_original"] == pytest.approx(1.0)  # the unedited scene against itself
    assert set(m["toy"]) >= {"judge_success_rate", "background_psnr_vs_original", "silhouette_iou_vs_target_geometry"}
    # no-edit measures the source scene against the toy world's exact renders of held-out views:
    # 150 nerfacto steps give a rough but recognisable cube (well above a flat grey image's PSNR)
    recon = noedit["reconstruction"]
    from piva.toyworld.scenes import BACKGROUND

    grey = [np.asarray(iio.imread(p), np.float32)[..., :3] / 255 for p in
            sorted((out / "objects" / "toy-red-cube" / "data" / "test").glob("r_*.png"))]
    flat = np.mean([-10 * np.log10(np.mean((g - BACKGROUND) ** 2)) for g in grey])
    assert recon["views"] == len(grey) and recon["psnr"] > flat + 3, (recon, flat)
    md = (out / "leaderboard.md").read_text()
    assert "| no-edit | 1 |" in md and "| piva | 1 |" in md
    assert "| toy-red-cube | " in md.split("## Source scenes")[1]

    # After a metric's definition changes, --rescore measures a stored result again from its run: the figures
    # come back as measured, nothing trains, and the time recorded when it ran stays.
    path = out / "results" / "piva" / "toy-red-cube-texturing-0@seed1.json"
    stored = json.loads(path.read_text())
    stale = {**stored["metrics"], "psnr": -1.0, "toy": {**stored["metrics"]["toy"], "background_psnr_vs_original": -1.0}}
    path.write_text(json.dumps({**stored, "wall_time_s": 12345.0, "metrics": stale}))
    before = sorted(p.name for p in ckpts.glob("step-*.ckpt"))
    third = _run(out, "--methods", "piva", "--seeds", "1", "--rescore")
    log = third.communicate(timeout=600)[0]
    assert third.returncode == 0 and "measured again: 1;" in log, log
    again = json.loads(path.read_text())
    assert again["wall_time_s"] == 12345.0 and again["rescored"]["on"]
    assert again["metrics"]["psnr"] == pytest.approx(stored["metrics"]["psnr"], abs=0.01)
    assert again["metrics"]["toy"]["background_psnr_vs_original"] == pytest.approx(
        stored["metrics"]["toy"]["background_psnr_vs_original"], abs=0.01)
    assert sorted(p.name for p in ckpts.glob("step-*.ckpt")) == before

    # --workers 2: edits at once in processes of their own, each storing its result (two no-edit seeds: no training)
    fourth = _run(out, "--methods", "no-edit", "--seeds", "1,2,3", "--workers", "2")
    log = fourth.communicate(timeout=600)[0]
    assert fourth.returncode == 0 and "1 of 3 edits already done" in log and "[noe] 2 worker processes" in log, log
    assert "the source scenes of 1 object(s) first" in log
    for seed in (2, 3):
        again = json.loads((out / "results" / "no-edit" / f"toy-red-cube-texturing-0@seed{seed}.json").read_text())
        figures = {k: v for k, v in noedit["toy"].items() if isinstance(v, float)}
        assert again["seed"] == seed and {k: again["metrics"]["toy"][k] for k in figures} == pytest.approx(figures)


# ---------------------------------------------------------------------------- threestudio backend
def test_threestudio_backend_commands(tmp_path, monkeypatch):
    """What can be checked without threestudio: clear errors and the launch.py command lines."""
    from piva.threestudio import backend

    with pytest.raises(SystemExit, match="--threestudio PATH"):
        backend.check_backend(None)
    with pytest.raises(SystemExit, match="piva: error"):
        backend.check_backend(tmp_path / "no-threestudio")
    edit = {"id": "cake-translation-0", "source_prompt": "a round cake", "target_prompt": "a square cake, on a plate"}
    cmd, trial = backend.edit_command(tmp_path, "sds", tmp_path / "src.ckpt", edit, tmp_path / "out", steps=100)
    assert cmd[1:5] == ["launch.py", "--config", "custom/threestudio-piva/configs/dds-noe.yaml", "--train"]
    assert backend.launcher("cpu")[1:] == ["-m", "piva.threestudio.cpu", "launch.py"]  # CPU: the stand-ins
    monkeypatch.chdir(tmp_path)  # launch.py runs in the threestudio checkout: every path it gets is absolute
    rel, _ = backend.source_command(tmp_path, Path("data/cube"), Path("out"), "cube")
    rel += backend.edit_command(tmp_path, "piva", Path("out/src.ckpt"), edit, Path("out"))[0]
    paths = [c.split("=", 1)[1] for c in rel if c.split("=", 1)[0] in
             ("data.dataroot", "exp_root_dir", "system.geometry_convert_from")]
    assert len(paths) == 4 and all(Path(p).is_absolute() for p in paths), paths
    assert "custom/threestudio-piva/configs/dds-noe.yaml" in cmd and "system.guidance.mode=sds" in cmd
    assert 'system.guidance.target_prompt="a square cake, on a plate"' in cmd and "trainer.max_steps=100" in cmd
    assert not any(c.startswith("resume=") for c in cmd)
    (trial / "ckpts").mkdir(parents=True)
    torch.save({"global_step": 5}, trial / "ckpts" / "last.ckpt")  # a whole checkpoint: resumed from
    cmd, _ = backend.edit_command(tmp_path, "sds", tmp_path / "src.ckpt", edit, tmp_path / "out", steps=100)
    assert f"resume={trial / 'ckpts' / 'last.ckpt'}" in cmd  # a stopped edit resumes
    cmd, _ = backend.edit_command(tmp_path, "piva", tmp_path / "src.ckpt", edit, tmp_path / "out")
    assert "custom/threestudio-piva/configs/piva-noe.yaml" in cmd and not any("mode=" in c for c in cmd)
    assert not any(c.startswith("seed=") for c in cmd)  # seed 0: the configs' own
    cmd, seeded_trial = backend.edit_command(tmp_path, "piva", tmp_path / "src.ckpt", edit, tmp_path / "out", seed=2)
    assert "seed=2" in cmd and seeded_trial.name == "cake-translation-0-piva-seed2" and f"tag={seeded_trial.name}" in cmd


@pytest.mark.parametrize("method", ["piva", "dds", "sds"])
def test_threestudio_backend_configs_weight_the_loss_their_guidance_returns(tmp_path, method):
    """The merged config (YAML + the command's overrides, as launch.py merges them) has lambda_<mode>
    for the loss the guidance returns (loss_<mode>): sds through the dds config used to miss it."""
    from omegaconf import OmegaConf

    from piva.threestudio import backend

    edit = {"id": "cake-0", "source_prompt": "a round cake", "target_prompt": "a square cake"}
    cmd, _ = backend.edit_command(tmp_path, method, tmp_path / "src.ckpt", edit, tmp_path / "out")
    yaml = Path(__file__).parents[1] / "piva" / "threestudio" / "configs" / Path(cmd[3]).name
    cfg = OmegaConf.merge(OmegaConf.load(yaml), OmegaConf.from_dotlist([c for c in cmd[5:] if "=" in c]))
    assert cfg.system.guidance.mode == method
    assert cfg.system.loss[f"lambda_{method}"] == 1.0
    assert (cfg.data.eval_camera_distance, cfg.data.eval_fovy_deg) == (4.0, 50.0)  # the Noe protocol by default
    orbit = {"elevation": 30.0, "distance": 3.6, "fov_y": 40.0}  # e.g. a toy object, as it was captured
    cmd, _ = backend.edit_command(tmp_path, method, tmp_path / "src.ckpt", edit, tmp_path / "out", eval_orbit=orbit)
    cfg = OmegaConf.merge(OmegaConf.load(yaml), OmegaConf.from_dotlist([c for c in cmd[5:] if "=" in c]))
    assert (cfg.data.eval_elevation_deg, cfg.data.eval_camera_distance, cfg.data.eval_fovy_deg) == (30.0, 3.6, 40.0)


def _prepare_in_child(root: str, counter: str) -> None:
    """One worker preparing the toy red cube; each view it renders appends its pid to `counter`."""
    from piva.noe import prepare
    from piva.noe.presets import get_preset
    from piva.toyworld import scenes

    real_render = scenes.render

    def counting_render(*args, **kwargs):
        with open(counter, "a") as f:  # O_APPEND: lines from several processes do not mix
            f.write(f"{os.getpid()}\n")
        return real_render(*args, **kwargs)

    scenes.render = counting_render  # this forked child only
    preset = dataclasses.replace(get_preset("toy"), capture_views=12, capture_size=16)
    obj = {"id": "toy-red-cube", "source": "toyworld", "source_prompt": "a red cube"}
    prepare.prepare_object(obj, prepare.PrepareOptions(root=Path(root), preset=preset), train=False)


def test_default_workers_follow_the_preset_device_and_backend(monkeypatch):
    from piva.noe import runner

    monkeypatch.setattr(runner, "available_cores", lambda: 2)
    assert runner.default_workers(runner.RunOptions(out=Path("x"), preset="toy")) == 2  # measured: 1.5x an hour
    # threestudio's launch.py takes its worker's share of the threads (below): two one-thread fits run 1.3x an hour
    assert runner.default_workers(runner.RunOptions(out=Path("x"), preset="toy", backend="threestudio")) == 2
    assert runner.default_workers(runner.RunOptions(out=Path("x"), preset="full", backend="threestudio")) == 1
    monkeypatch.setattr(runner, "available_cores", lambda: 16)
    assert runner.default_workers(runner.RunOptions(out=Path("x"), preset="toy")) == 4
    monkeypatch.setattr(runner.RunOptions, "device", property(lambda self: "cuda"))
    assert runner.default_workers(runner.RunOptions(out=Path("x"), preset="toy")) == 1


def test_threestudio_launch_takes_the_workers_thread_count(tmp_path):
    """A benchmark worker's launch.py gets its share of the cores, not all of them (two would thrash)."""
    import sys

    from piva.threestudio import backend

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            check = f"import os, sys; sys.exit(0 if os.environ['OMP_NUM_THREADS'] == '{threads}' else 3)"
            backend.run([sys.executable, "-c", check], tmp_path)
        torch.set_num_threads(1)
        with pytest.raises(RuntimeError, match="exited with 3"):
            backend.run([sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['OMP_NUM_THREADS'] == '2' else 3)"],
                        tmp_path)
    finally:
        torch.set_num_threads(before)


def test_parallel_workers_prepare_an_object_once(tmp_path):
    """Three processes (as Ray tasks would) preparing the same object: one of them renders it, once; no clash."""
    import multiprocessing as mp

    counter = tmp_path / "renders.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path / "noe"), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    data = tmp_path / "noe" / "objects" / "toy-red-cube" / "data"
    frames = {f.name: len(json.loads(f.read_text())["frames"]) for f in data.glob("transforms_*.json")}
    assert frames == {"transforms_train.json": 12, "transforms_val.json": 4, "transforms_test.json": 4}
    renders = counter.read_text().splitlines() if counter.exists() else []
    assert len(renders) == sum(frames.values()), f"{len(renders)} views rendered for {sum(frames.values())} frames"
    assert len(set(renders)) == 1  # by one worker; the others found it prepared
    assert not (data.parent / "data.partial").exists()


def test_a_resumed_edit_refuses_other_prompts_knobs_or_source(tmp_path):
    """A run folder with a checkpoint is resumed only by the edit that made it: other prompts, other knobs or a
    changed source checkpoint are refused in one line before anything trains."""
    pytest.importorskip("nerfstudio")
    from piva.nerfstudio import runs
    from piva.noe.prepare import toy_object_scene

    load = tmp_path / "source" / "nerfstudio_models"
    load.mkdir(parents=True)
    (load / "step-000000599.ckpt").write_bytes(b"source scene v1")

    def config(target="a blue cube", **knobs):
        return runs.edit_config("piva-object", toy_object_scene(tmp_path / "data"), load, tmp_path / "out",
                                "a red cube", target, runs.TOY_SIZE, diffusion_model="m", guidance=knobs)

    first = config()
    run_dir = Path(first.get_base_dir())
    (run_dir / "nerfstudio_models").mkdir(parents=True)
    from piva.io import atomic_write_json

    atomic_write_json(run_dir / "piva_edit.json", {"config": runs._edit_identity(first),
                                                   "source_checkpoint": runs._source_fingerprint(load)})
    (run_dir / "nerfstudio_models" / "step-000000700.ckpt").write_bytes(b"an edit checkpoint")
    for other, what in ((config("a green cube"), "pipeline.guidance"), (config(identity_weight=0.1), "pipeline.guidance")):
        with pytest.raises(runs.RunMismatch, match=f"made with another {what}.*another output folder"):
            runs.edit(other)
    (load / "step-000000599.ckpt").write_bytes(b"source scene v2")  # the source was fitted again
    with pytest.raises(runs.RunMismatch, match="source scene"):
        runs.edit(config())


def test_each_run_gets_its_own_event_writers(tmp_path):
    """nerfstudio's module-level writers are closed and cleared between the runs of one process."""
    pytest.importorskip("nerfstudio")
    from nerfstudio.utils import writer

    from piva.nerfstudio import runs

    first = writer.TensorboardWriter(log_dir=tmp_path / "a")
    second = writer.TensorboardWriter(log_dir=tmp_path / "b")
    writer.EVENT_WRITERS.extend([first, second])
    runs._reset_event_writers()
    assert writer.EVENT_WRITERS == []
    assert first.tb_writer.file_writer is None and second.tb_writer.file_writer is None  # closed: no handles left
