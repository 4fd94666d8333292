"""The threestudio front end, checked without threestudio (it needs tiny-cuda-nn and a GPU).

What is checked here: the YAMLs use threestudio's real config keys and carry the
paper's values; the glue in `piva.threestudio.glue` gives exactly what calling
`piva.guidance.ScoreDistillation` on the same channels-first input gives; the
registered modules fail with one line without threestudio; the installer on a fake
checkout. What only threestudio can check is listed in piva/threestudio/README.md.
"""

import importlib
import importlib.util
import inspect
import json
import math
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import randomize_adapters
from piva.data.cameras import look_at, noe_cameras
from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.prior import DiffusionPrior
from piva.prior.loading import PAPER_GUIDANCE_SCALE
from piva.threestudio import blender, install
from piva.threestudio import config as ts
from piva.threestudio.glue import ChannelsLastGuidance, channels_first, depth_for_control

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "piva" / "threestudio" / "configs"
SRC, TGT = "a red cube", "a blue cube on a white plate"
T = 437

# Config fields of threestudio at the mirrored commit 28d9d80 (Dec 2024), read from its source:
# ExperimentConfig (threestudio/utils/config.py), BaseSystem/BaseLift3DSystem.Config
# (threestudio/systems/base.py), RandomCameraDataModuleConfig (threestudio/data/uncond.py),
# ImplicitVolume.Config + BaseImplicitGeometry.Config, NoMaterial.Config, SolidColorBackground.Config,
# NeRFVolumeRenderer.Config; every BaseModule.Config also has `weights`.
EXPERIMENT_KEYS = {"name", "description", "tag", "seed", "use_timestamp", "timestamp", "exp_root_dir", "exp_dir",
                   "trial_name", "trial_dir", "n_gpus", "resume", "data_type", "data", "system_type", "system",
                   "trainer", "checkpoint"}
LIFT3D_KEYS = {"loggers", "loss", "optimizer", "scheduler", "weights", "weights_ignore_modules",
               "cleanup_after_validation_step", "cleanup_after_test_step", "geometry_type", "geometry",
               "geometry_convert_from", "geometry_convert_inherit_texture", "geometry_convert_override",
               "material_type", "material", "background_type", "background", "renderer_type", "renderer",
               "guidance_type", "guidance", "prompt_processor_type", "prompt_processor", "exporter_type", "exporter"}
RANDOM_CAMERA_KEYS = {"height", "width", "batch_size", "resolution_milestones", "eval_height", "eval_width",
                      "eval_batch_size", "n_val_views", "n_test_views", "elevation_range", "azimuth_range",
                      "camera_distance_range", "fovy_range", "camera_perturb", "center_perturb", "up_perturb",
                      "light_position_perturb", "light_distance_range", "eval_elevation_deg", "eval_camera_distance",
                      "eval_fovy_deg", "light_sample_strategy", "batch_uniform_azimuth", "progressive_until",
                      "rays_d_normalize"}
MODULE_KEYS = {
    "implicit-volume": {"weights", "radius", "isosurface", "isosurface_method", "isosurface_resolution",
                        "isosurface_threshold", "isosurface_chunk", "isosurface_coarse_to_fine",
                        "isosurface_deformable_grid", "isosurface_remove_outliers",
                        "isosurface_outlier_n_faces_threshold", "n_input_dims", "n_feature_dims",
                        "density_activation", "density_bias", "density_blob_scale", "density_blob_std",
                        "pos_encoding_config", "mlp_network_config", "normal_type", "finite_difference_normal_eps",
                        "anneal_density_blob_std_config"},
    "no-material": {"weights", "n_output_dims", "color_activation", "input_feature_dims", "mlp_network_config",
                    "requires_normal"},
    "solid-color-background": {"weights", "n_output_dims", "color", "learned", "random_aug", "random_aug_prob"},
    "nerf-volume-renderer": {"weights", "radius", "num_samples_per_ray", "eval_chunk_size", "randomized",
                             "near_plane", "far_plane", "return_comp_normal", "return_normal_perturb", "estimator",
                             "grid_prune", "prune_alpha_threshold", "proposal_network_config",
                             "prop_optimizer_config", "prop_scheduler_config", "num_samples_per_ray_proposal",
                             "num_samples_per_ray_importance"},
}
THREESTUDIO_TYPES = set(MODULE_KEYS) | {"random-camera-datamodule"}
# OmegaConf resolvers threestudio registers (threestudio/utils/config.py).
RESOLVERS = {"calc_exp_lr_decay_rate", "add", "sub", "mul", "div", "idiv", "basename", "rmspace", "tuple2", "gt0",
             "cmaxgt0", "not", "cmaxgt0orcmaxgt0"}


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


ALL = ["source-noe.yaml", "piva-noe.yaml", "dds-noe.yaml", "noe-eval-cameras.yaml"]
EDITS = {"piva-noe.yaml": "piva", "dds-noe.yaml": "dds"}


# -- configs -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_config_uses_threestudio_keys(name):
    cfg = load(name)
    assert set(cfg) <= EXPERIMENT_KEYS
    sys_keys = LIFT3D_KEYS | ({"save_adapters"} if cfg["system_type"] == ts.EDIT_SYSTEM_NAME else set())
    assert set(cfg["system"]) <= sys_keys, set(cfg["system"]) - sys_keys
    for kind in ("geometry", "material", "background", "renderer"):
        module = cfg["system"][f"{kind}_type"]
        assert set(cfg["system"][kind]) <= MODULE_KEYS[module], (kind, set(cfg["system"][kind]) - MODULE_KEYS[module])
    if cfg["data_type"] == "random-camera-datamodule":
        assert set(cfg["data"]) <= RANDOM_CAMERA_KEYS, set(cfg["data"]) - RANDOM_CAMERA_KEYS
    else:
        assert cfg["data_type"] == ts.DATAMODULE_NAME
        assert set(cfg["data"]) <= {f.name for f in fields(blender.BlenderDataSettings)}
    types = [cfg["data_type"], cfg["system_type"]] + [v for k, v in cfg["system"].items() if k.endswith("_type") and v]
    assert set(types) <= THREESTUDIO_TYPES | set(ts.REGISTERED), types
    # Every ${a.b} points at a key of this file; every ${f:...} is a resolver threestudio registers.
    text = (CONFIGS / name).read_text()
    for ref in re.findall(r"\$\{([A-Za-z_][\w.]*)\}", text):
        get(cfg, ref)
    assert set(re.findall(r"\$\{(\w+):", text)) <= RESOLVERS


def test_scene_modules_are_the_same_in_every_config():
    """system.weights loads modules by name, so the edit and eval configs must build the source's field."""
    ref = load("source-noe.yaml")["system"]
    for name in ALL[1:]:
        cfg = load(name)["system"]
        for key in ("geometry_type", "geometry", "material_type", "material", "background_type", "background",
                    "renderer_type", "renderer"):
            assert cfg[key] == ref[key], (name, key)


def test_source_config_is_the_papers_instant_ngp():
    cfg = load("source-noe.yaml")
    assert cfg["system_type"] == ts.RECONSTRUCTION_SYSTEM_NAME
    assert cfg["trainer"]["max_steps"] == 10000
    assert cfg["system"]["optimizer"]["name"] == "Adam"
    geo = cfg["system"]["geometry"]
    assert cfg["system"]["geometry_type"] == "implicit-volume" and geo["pos_encoding_config"]["otype"] == "HashGrid"
    assert geo["radius"] == 2.0  # Noe objects are rescaled to a bounding box of radius 2
    assert cfg["data"]["dataroot"] == "???"


@pytest.mark.parametrize("name,mode", EDITS.items())
def test_edit_config_carries_the_papers_values(name, mode):
    cfg = load(name)
    data, system = cfg["data"], cfg["system"]
    assert cfg["system_type"] == ts.EDIT_SYSTEM_NAME
    assert cfg["trainer"]["max_steps"] == 15000
    assert (data["width"], data["height"], data["batch_size"]) == (512, 512, 1)
    assert data["elevation_range"] == [10, 60]
    assert data["fovy_range"] == [40, 70]
    assert data["camera_distance_range"] == [3, 4]
    assert system["optimizer"]["name"] == "Adam"
    assert system["optimizer"]["params"]["geometry.encoding"]["lr"] == 0.01
    assert "guidance" not in system["optimizer"]["params"]  # adapters train with piva's own optimizer
    assert system["geometry_convert_inherit_texture"] is True
    guidance = system["guidance"]
    assert system["guidance_type"] == ts.GUIDANCE_NAME
    assert guidance["mode"] == mode
    assert guidance["adapter_lr"] == 1e-4
    assert guidance["identity_weight"] == 0.4
    # null: the model's own recommendation, which Stable Diffusion (no piva.json) leaves at the paper's 7.5
    assert guidance["guidance_scale"] is None and PAPER_GUIDANCE_SCALE == 7.5 and guidance["adapter_guidance_scale"] == 1.0
    assert guidance["view_dependent_prompting"] is False and system["prompt_processor_type"] == ""
    assert system["loss"] == {f"lambda_{mode}": 1.0}
    assert guidance["source_prompt"] == guidance["target_prompt"] == "???"
    # The section builds piva's GuidanceConfig (the threestudio Config accepts exactly these keys).
    section = {**guidance, "source_prompt": SRC, "target_prompt": TGT}
    ts.GuidanceSettings(**section)
    config = ts.guidance_config(section)
    assert (config.mode, config.identity_weight, config.adapter_lr) == (mode, 0.4, 1e-4)
    assert config.t_range == (0.02, 0.98) and config.annealed_range == (0.02, 0.5)
    assert config.uses_same_latent is False  # the true source latent, as the registered nerfstudio methods
    assert ts.needs_original(config)


@pytest.mark.parametrize("name", ["piva-noe.yaml", "dds-noe.yaml", "noe-eval-cameras.yaml"])
def test_eval_cameras_are_the_noe_protocol(name):
    data = load(name)["data"]
    defaults = {k: p.default for k, p in inspect.signature(noe_cameras).parameters.items()}
    assert data["n_test_views"] == defaults["n_views"] == 120
    assert data["eval_elevation_deg"] == defaults["elevation"] == 15
    assert data["eval_camera_distance"] == defaults["distance"] == 4
    assert data["eval_fovy_deg"] == defaults["fov_y"] == 50
    assert (data["eval_width"], data["eval_height"]) == (512, 512)


def test_guidance_config_rejects_what_piva_guidance_cannot_do():
    base = {"source_prompt": SRC, "target_prompt": TGT}
    with pytest.raises(ValueError, match="view-dependent"):
        ts.guidance_config({**base, "view_dependent_prompting": True})
    with pytest.raises(ValueError, match="unknown piva-guidance settings: guidance_scle"):
        ts.guidance_config({**base, "guidance_scle": 7.5})
    with pytest.raises(ValueError, match="unknown guidance mode"):
        ts.guidance_config({**base, "mode": "vsd"})
    with pytest.raises(ValueError, match="dtype must be one of"):
        ts.guidance_config({**base, "dtype": "fp8"})
    with pytest.raises(ValueError, match="source prompt"):
        ts.guidance_config({"target_prompt": TGT, "mode": "dds"})
    assert not ts.needs_original(ts.guidance_config({"target_prompt": TGT, "mode": "sds"}))
    assert not ts.needs_original(ts.guidance_config({**base, "mode": "dds", "same_latent": True}))


def test_yaml_section_has_every_guidance_field_with_its_default():
    """threestudio's Config takes GuidanceConfig's fields with the same defaults, so a new option reaches YAML."""
    settings = {f.name: f.default for f in fields(ts.GuidanceSettings)}
    for f in fields(GuidanceConfig):
        assert f.name in settings and settings[f.name] == f.default, f.name
    extra = set(settings) - {f.name for f in fields(GuidanceConfig)}
    assert extra == {"pretrained_model_name_or_path", "controlnet_name_or_path", "dtype", "min_opacity",
                     "view_dependent_prompting"}
    base = {"source_prompt": SRC, "target_prompt": TGT}
    assert ts.guidance_config({**base, "pixel_gradient": "decoded"}).pixel_gradient == "decoded"
    with pytest.raises(ValueError, match="pixel_gradient 'pixels'"):
        ts.guidance_config({**base, "pixel_gradient": "pixels"})
    # threestudio builds its Config with OmegaConf.structured (omegaconf is in the dev set: no skip).
    from omegaconf import OmegaConf

    node = OmegaConf.structured(ts.GuidanceSettings(**base, pixel_gradient="decoded"))
    assert node.pixel_gradient == "decoded" and tuple(node.t_range) == (0.02, 0.98)


# -- tensor glue -------------------------------------------------------------------


def test_channels_first_and_depth_conversion():
    rgb = torch.rand(2, 5, 7, 3)
    x = channels_first(rgb)
    assert x.shape == (2, 3, 5, 7) and x.is_contiguous() and torch.equal(x[1, 2], rgb[1, :, :, 2])
    with pytest.raises(ValueError, match=r"channels-last \[B,H,W,3\]"):
        channels_first(x)

    depth = torch.full((1, 2, 2, 1), 3.0)
    opacity = torch.tensor([1.0, 0.8, 0.5, 0.2]).view(1, 2, 2, 1)
    d = depth_for_control(depth, opacity, min_opacity=0.5)
    assert d.shape == (1, 1, 2, 2)
    # threestudio's depth is sum(w * t): divided by the opacity it is the surface distance; thin pixels are background.
    assert d.flatten().tolist() == [3.0, pytest.approx(3.75), 6.0, math.inf]



def direct_depth(depth_hwc, opacity_hwc):
    """The same conversion written out independently of the glue."""
    d = torch.where(opacity_hwc >= 0.5, depth_hwc / opacity_hwc, torch.tensor(float("inf")))
    return d.permute(0, 3, 1, 2)


def inputs(seed=0, b=1, size=32):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.rand(b, size, size, 3, generator=g) * 0.9 + 0.05
    source = torch.rand(b, size, size, 3, generator=g) * 0.9 + 0.05
    depth = torch.rand(b, size, size, 1, generator=g) * 2 + 2
    opacity = torch.rand(b, size, size, 1, generator=g) * 0.6 + 0.4  # some pixels below 0.5: background
    noise = torch.randn(b, 4, size // 2, size // 2, generator=g)
    return rgb, source, depth, opacity, noise


def run_both(glue, direct, mode, rgb, source, depth, opacity, noise):
    """Glue on channels-last input vs ScoreDistillation.step on the same channels-first tensors."""
    x_last = rgb.clone().requires_grad_(True)
    out = glue(x_last, depth=depth, opacity=opacity, source_rgb=source, t=T, noise=noise,
               generator=torch.Generator().manual_seed(5))
    out[f"loss_{mode}"].backward()

    x_first = rgb.permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    ref = direct.step(
        x_first,
        depth=direct_depth(depth, opacity) if mode == "piva" else None,
        source_rgb=source.permute(0, 3, 1, 2).contiguous() if mode == "dds" else None,
        t=T, noise=noise, generator=torch.Generator().manual_seed(5),
    )
    ref.loss.backward()
    return out, x_last.grad.permute(0, 3, 1, 2), ref, x_first.grad


@pytest.mark.parametrize("mode,same_latent", [("sds", None), ("dds", False), ("dds", True)])
def test_glue_equals_score_distillation_sds_dds(prior_2d, mode, same_latent):
    settings = {"mode": mode, "source_prompt": SRC, "target_prompt": TGT, "same_latent": same_latent}
    glue = ChannelsLastGuidance.from_settings(settings, prior=prior_2d)
    direct = ScoreDistillation(prior_2d, GuidanceConfig(mode=mode, source_prompt=SRC, target_prompt=TGT,
                                                        same_latent=same_latent))
    out, grad, ref, ref_grad = run_both(glue, direct, mode, *inputs())
    assert torch.equal(out[f"loss_{mode}"], ref.loss)
    assert torch.equal(grad, ref_grad) and grad.abs().sum() > 0
    assert out["timestep"] == T and out["grad_norm"].item() == pytest.approx(ref.diagnostics["grad_norm"])


def test_glue_equals_score_distillation_piva_and_adapter_update(tiny_dir):
    settings = {"mode": "piva", "source_prompt": SRC, "target_prompt": TGT, "identity_weight": 0.4}
    priors = [DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu") for _ in range(2)]
    glue = ChannelsLastGuidance.from_settings(settings, prior=priors[0])
    direct = ScoreDistillation(priors[1], ts.guidance_config(settings))
    for p in priors:  # same non-zero adapters on both, so the identity term is not trivially zero
        randomize_adapters(p.unet, 1)
        randomize_adapters(p.controlnet, 2)
    rgb, source, depth, opacity, noise = inputs(seed=1)
    out, grad, ref, ref_grad = run_both(glue, direct, "piva", rgb, source, depth, opacity, noise)
    assert out["identity_norm"] > 0 and out["identity_norm"] == ref.diagnostics["identity_norm"]
    assert torch.equal(out["loss_piva"], ref.loss)
    assert torch.equal(grad, ref_grad)

    # The adapter step: glue on channels-last renders vs update_adapters on channels-first ones.
    src_depth, src_opacity = depth * 1.1, torch.ones_like(opacity)
    losses = glue.update_adapters(rgb, depth=depth, opacity=opacity, source_rgb=source, source_depth=src_depth,
                                  source_opacity=src_opacity, generator=torch.Generator().manual_seed(7))
    ref_losses = direct.update_adapters(
        rgb.permute(0, 3, 1, 2).contiguous(), depth=direct_depth(depth, opacity),
        source_rgb=source.permute(0, 3, 1, 2).contiguous(), source_depth=direct_depth(src_depth, src_opacity),
        generator=torch.Generator().manual_seed(7),
    )
    assert losses == ref_losses
    for name in ("source", "target"):
        for a, b in zip(glue.distillation.adapters.parameters[name], direct.adapters.parameters[name]):
            assert torch.equal(a, b)

    # Checkpoint round trip of the adapters (they are not threestudio modules).
    state = glue.adapter_state()
    fresh = ChannelsLastGuidance.from_settings(
        settings, prior=DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu"))
    fresh.load_adapter_state(state)
    for name in ("source", "target"):
        for a, b in zip(fresh.distillation.adapters.parameters[name], glue.distillation.adapters.parameters[name]):
            assert torch.equal(a, b)
    assert fresh.distillation.adapters.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()


def test_glue_errors_are_clear(prior_2d):
    glue = ChannelsLastGuidance.from_settings({"mode": "dds", "source_prompt": SRC, "target_prompt": TGT},
                                                   prior=prior_2d)
    rgb = torch.rand(1, 32, 32, 3)
    with pytest.raises(ValueError, match="needs the original scene's render"):
        glue(rgb)
    with pytest.raises(ValueError, match="channels-last"):
        glue(rgb.permute(0, 3, 1, 2), source_rgb=rgb)
    assert glue.update_adapters(rgb) == {}  # no adapters in DDS


# -- Blender-layout data -------------------------------------------------------------


def write_views(root: Path, width: int, height: int, meta: dict, azimuths=(0.0, 90.0)) -> None:
    """A Blender-layout split: top half opaque red, bottom half transparent."""
    import imageio.v3 as iio

    frames = []
    for i, az in enumerate(azimuths):
        img = np.zeros((height, width, 4), np.uint8)
        img[..., 0] = 255
        img[: height // 2, :, 3] = 255
        iio.imwrite(root / f"r_{i}.png", img)
        frames.append({"file_path": f"./r_{i}", "transform_matrix": look_at(az, 30.0, 4.0).tolist()})
    (root / meta.pop("_name", "transforms_train.json")).write_text(json.dumps({**meta, "frames": frames}))


def test_read_views_and_rays(tmp_path):
    size, fov = 8, 40.0
    write_views(tmp_path, size, size, {"camera_angle_x": math.radians(fov)})
    views = blender.read_views(tmp_path, "train")
    cam = views.cameras[1]
    assert (cam.width, cam.height) == (size, size) and len(views.image_paths) == 2
    assert cam.focal == pytest.approx(0.5 * size / math.tan(math.radians(fov) / 2))
    np.testing.assert_allclose(cam.c2w, look_at(90.0, 30.0, 4.0))
    o, d = blender.image_rays(cam)
    assert o.shape == d.shape == (size, size, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(size, size))
    # The four centre pixels' rays pass the origin symmetrically: their mean points at it.
    centre = d[size // 2 - 1 : size // 2 + 1, size // 2 - 1 : size // 2 + 1].reshape(-1, 3).mean(0)
    eye = torch.tensor(look_at(90.0, 30.0, 4.0)[:3, 3], dtype=torch.float32)
    assert torch.allclose(torch.nn.functional.normalize(centre, dim=0), -eye / eye.norm(), atol=1e-6)
    # Top rows of the image look up (+z in threestudio's z-up world).
    assert d[0, :, 2].mean() > d[-1, :, 2].mean()

    rgb, alpha = blender.load_rgba(views.image_paths[0], background=(1.0, 1.0, 1.0))
    assert torch.equal(rgb[0, 0], torch.tensor([1.0, 0.0, 0.0])) and torch.equal(rgb[-1, 0], torch.ones(3))
    assert alpha[0, 0, 0] == 1 and alpha[-1, 0, 0] == 0

    with pytest.raises(FileNotFoundError, match="transforms_val.json"):
        blender.read_views(tmp_path / "nowhere", "val")


def test_training_rays_are_the_views_rays(tmp_path):
    """Random training rays must be the whole-view (evaluation) rays at the same pixels, also after downsampling."""
    width, height, fov = 8, 6, 40.0
    write_views(tmp_path, width, height, {"camera_angle_x": math.radians(fov)})
    for downsample in (1, 2):
        images = blender.PosedImages(tmp_path, "train", (1.0, 1.0, 1.0), downsample)
        assert (images.width, images.height) == (width // downsample, height // downsample)
        assert images.cameras[0].focal == pytest.approx(0.5 * width / math.tan(math.radians(fov) / 2) / downsample)
        batch = images.random_rays(64, torch.Generator().manual_seed(0))
        assert len(set(batch["index"].tolist())) == 2  # both views are drawn
        for j in range(64):
            k, v, u = (int(batch[key][j]) for key in ("index", "v", "u"))
            o, d = images.rays(k)
            assert torch.allclose(batch["rays_o"][j], o[v, u]) and torch.allclose(batch["rays_d"][j], d[v, u], atol=1e-6)
            assert torch.equal(batch["rgb"][j], images.rgb[k, v, u]) and torch.equal(batch["mask"][j], images.mask[k, v, u])


def test_nerfstudio_intrinsics_are_read_and_unsupported_cameras_refused(tmp_path):
    w, h, f = 8, 6, 9.0
    write_views(tmp_path, w, h, {"_name": "transforms.json", "fl_x": f, "fl_y": f, "cx": w / 2, "cy": h / 2,
                                 "camera_model": "OPENCV"})
    assert blender.read_views(tmp_path, "train").cameras[0].focal == pytest.approx(f)
    write_views(tmp_path, w, h, {"_name": "transforms.json", "fl_x": f, "fl_y": f, "cx": w / 2 + 1, "cy": h / 2})
    with pytest.raises(ValueError, match="centred pinholes with square pixels"):
        blender.read_views(tmp_path, "train")
    write_views(tmp_path, w, h, {"_name": "transforms.json", "fl_x": f, "fl_y": f, "cx": w / 2, "cy": h / 2, "k1": 0.1})
    with pytest.raises(ValueError, match="lens distortion"):
        blender.read_views(tmp_path, "train")


# -- imports without threestudio -----------------------------------------------------

threestudio_missing = pytest.mark.skipif(
    importlib.util.find_spec("threestudio") is not None, reason="threestudio is importable here"
)


@threestudio_missing
@pytest.mark.parametrize("module", ["extension", "guidance", "system", "data"])
def test_threestudio_modules_fail_with_one_line(module):
    with pytest.raises(ImportError) as info:
        importlib.import_module(f"piva.threestudio.{module}")
    message = str(info.value)
    assert "threestudio" in message and "\n" not in message
    assert "python -m piva.threestudio.install" in message


def test_package_glue_and_installer_import_without_threestudio():
    """The threestudio-free modules must import anywhere, and no front end may import another."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, piva.threestudio, piva.threestudio.config, piva.threestudio.glue, "
                               "piva.threestudio.blender, piva.threestudio.install, piva.threestudio.backend, piva.threestudio.cpu; "
                               "print(sorted(m for m in ('threestudio', 'piva.nerfstudio', 'piva.toyworld', "
                               "'piva.image') if m in sys.modules))"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert out.stdout.strip() == "[]"  # none of them imports threestudio or another front end


# -- installer ---------------------------------------------------------------------------


def fake_threestudio(root: Path, requirements: str = "diffusers<0.20\ntransformers==4.28.1\n") -> Path:
    (root / "threestudio").mkdir(parents=True)
    (root / "custom").mkdir()
    (root / "custom" / "put_custom_extensions_here").write_text("")
    (root / "launch.py").write_text("def load_custom_modules():\n    pass\n")
    (root / "threestudio" / "__init__.py").write_text('__version__ = "0.2.3"\n')
    (root / "requirements.txt").write_text(
        "lightning==2.0.0\n# comment\ngit+https://github.com/KAIR-BAIR/nerfacc.git@v0.5.2\n"
        + requirements + "imageio[ffmpeg]\nsafetensors\n"
    )
    return root


def test_installer_links_the_extension_and_reports_the_pins(tmp_path, capsys):
    ts = fake_threestudio(tmp_path / "threestudio")
    assert install.main([str(ts)]) == 0
    text = capsys.readouterr().out
    dest = ts / "custom" / install.EXTENSION_DIR
    assert install.MARKER in (dest / "__init__.py").read_text()
    assert (dest / "configs").is_symlink() and (dest / "configs").resolve() == CONFIGS.resolve()
    assert (dest / "configs" / "piva-noe.yaml").is_file()
    assert "threestudio 0.2.3" in text
    assert re.search(r"diffusers<0\.20\s+->\s+diffusers>=0\.32", text)
    assert re.search(r"transformers==4\.28\.1\s+->\s+transformers>=4\.40", text)
    assert not re.search(r"peft\S*\s+->", text)  # threestudio does not pin peft
    assert "LoRAAttnProcessor" in text

    # Installing again replaces our own folder; --strict turns the conflict into an exit status.
    assert install.main([str(ts), "--copy", "--strict"]) == 3
    assert (dest / "configs").is_dir() and not (dest / "configs").is_symlink()
    assert (dest / "configs" / "dds-noe.yaml").read_text() == (CONFIGS / "dds-noe.yaml").read_text()


def test_installer_refuses_what_it_should(tmp_path, capsys):
    assert install.main([str(tmp_path / "missing")]) == 2
    not_ts = tmp_path / "other"
    not_ts.mkdir()
    (not_ts / "launch.py").write_text("")
    assert install.main([str(not_ts)]) == 2
    assert "does not look like a threestudio checkout" in capsys.readouterr().err

    old = fake_threestudio(tmp_path / "old")
    (old / "launch.py").write_text("print('no extension system')\n")
    assert install.main([str(old)]) == 2
    assert "predates threestudio's custom extensions" in capsys.readouterr().err

    ts = fake_threestudio(tmp_path / "ts", requirements="diffusers>=0.25\n")
    foreign = ts / "custom" / install.EXTENSION_DIR
    foreign.mkdir()
    (foreign / "__init__.py").write_text("# someone else's\n")
    assert install.main([str(ts)]) == 2
    assert install.main([str(ts), "--force"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"diffusers\S*\s+->", out)  # >=0.25 admits 0.32: nothing to change in the file

    (ts / "custom" / "piva").mkdir()  # launch.py would import this as `piva`
    assert install.main([str(ts), "--check"]) == 0
    assert "hide the real piva package" in capsys.readouterr().out


def test_installed_extension_loads_like_launch_py_and_keeps_piva(tmp_path):
    """launch.py imports custom/<dir>/__init__.py as module <dir>; ours must not shadow `piva`."""
    ts = fake_threestudio(tmp_path / "threestudio")
    assert install.main([str(ts), "--check"]) == 0 and not (ts / "custom" / install.EXTENSION_DIR).exists()
    install.link_extension(ts)
    import piva

    folder = ts / "custom" / install.EXTENSION_DIR
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[folder.name] = module
    try:
        if importlib.util.find_spec("threestudio") is None:
            with pytest.raises(ImportError, match="needs threestudio"):
                spec.loader.exec_module(module)
        else:
            spec.loader.exec_module(module)
    finally:
        sys.modules.pop(folder.name, None)
    assert sys.modules["piva"] is piva


def test_version_ranges(tmp_path):
    assert not install.compatible("<0.20", ">=0.32")
    assert not install.compatible("==4.28.1", ">=4.40")
    assert install.compatible("", ">=0.13")
    assert install.compatible(">=0.25", ">=0.32")
    assert install.compatible("~=4.28", ">=4.40")
    assert install.compatible("!=4.40.0", ">=4.40")
    assert not install.compatible("<4.40", ">=4.40")
    assert install.compatible("==4.*", ">=4.40") and not install.compatible("==3.*", ">=4.40")
    assert install.compatible(">0.32", ">=0.32") and not install.compatible("<=0.31.9", ">=0.32")
    pins = install.read_pins(fake_threestudio(tmp_path / "ts") / "requirements.txt")
    assert pins == {"diffusers": "<0.20", "transformers": "==4.28.1"}


def test_install_runs_as_a_module(tmp_path):
    ts = fake_threestudio(tmp_path / "threestudio")
    out = subprocess.run([sys.executable, "-m", "piva.threestudio.install", str(ts), "--check"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "diffusers<0.20" in out.stdout


# -- the benchmark backend: checkpoints it resumes from, the processes it starts ----------


def _save_ckpt(path: Path, step: int) -> bytes:
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(4096)}}, path)
    return path.read_bytes()


def test_resume_takes_the_newest_checkpoint_that_loads_and_keeps_only_it(tmp_path):
    """A kill while Lightning writes a .ckpt in place leaves it cut short: the command resumes from the newest
    checkpoint that loads and clears the rest of ckpts/ (older steps, the cut-short file, stale links)."""
    from piva.threestudio import backend

    edit = {"id": "e", "source_prompt": "a red cube", "target_prompt": "a blue cube"}
    cmd, trial = backend.edit_command(tmp_path, "piva", tmp_path / "src.ckpt", edit, tmp_path / "out")
    assert not any(c.startswith("resume=") for c in cmd)  # nothing saved yet: from the start
    ckpts = trial / "ckpts"
    ckpts.mkdir(parents=True)
    _save_ckpt(ckpts / "epoch=0-step=10.ckpt", 10)
    _save_ckpt(ckpts / "epoch=0-step=20.ckpt", 20)
    whole = _save_ckpt(ckpts / "epoch=0-step=30.ckpt", 30)
    (ckpts / "epoch=0-step=30.ckpt").write_bytes(whole[: len(whole) - 100])  # killed mid-write
    (ckpts / "last.ckpt").symlink_to("epoch=0-step=10.ckpt")  # Lightning's link, one save behind
    (ckpts / "last-v1.ckpt").symlink_to("epoch=0-step=5.ckpt")  # dangling
    assert backend.checkpoint_step(ckpts / "epoch=0-step=30.ckpt") is None
    assert backend.checkpoint_step(ckpts / "epoch=0-step=20.ckpt") == 20
    cmd, _ = backend.edit_command(tmp_path, "piva", tmp_path / "src.ckpt", edit, tmp_path / "out")
    assert cmd[-1] == f"resume={ckpts / 'epoch=0-step=20.ckpt'}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=20.ckpt"]
    # Lightning's usual layout: last.ckpt links to the newest step; the run resumes from the name the README gives
    (ckpts / "last.ckpt").symlink_to("epoch=0-step=20.ckpt")
    cmd, _ = backend.edit_command(tmp_path, "piva", tmp_path / "src.ckpt", edit, tmp_path / "out")
    assert cmd[-1] == f"resume={ckpts / 'last.ckpt'}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=20.ckpt", "last.ckpt"]
    # the source fit resumes the same way
    source_ckpts = tmp_path / "out" / "piva-source-noe" / "cube" / "ckpts"
    source_ckpts.mkdir(parents=True)
    (source_ckpts / "last.ckpt").write_bytes(b"")  # killed before a byte was written
    cmd, _ = backend.source_command(tmp_path, tmp_path / "data", tmp_path / "out", "cube")
    assert not any(c.startswith("resume=") for c in cmd) and not any(source_ckpts.iterdir())


def test_launch_settings_save_a_few_checkpoints_in_a_short_run():
    """A toy edit saves about four times (a kill loses few steps), a full-size run every 1000 steps (the configs')."""
    from omegaconf import OmegaConf

    from piva.threestudio import backend

    edit = {"id": "e", "source_prompt": "a red cube", "target_prompt": "a blue cube"}
    toy = backend.LaunchSettings(device="cpu", source_steps=150, edit_steps=60)
    cmd, _ = backend.edit_command(Path("ts"), "piva", Path("src.ckpt"), edit, Path("out"), settings=toy)
    assert "checkpoint.every_n_train_steps=15" in cmd
    cmd, _ = backend.source_command(Path("ts"), Path("data"), Path("out"), "cube", settings=toy)
    assert "checkpoint.every_n_train_steps=37" in cmd  # 150 is no multiple: the systems save the end step
    cmd, _ = backend.edit_command(Path("ts"), "dds", Path("src.ckpt"), edit, Path("out"), steps=3000)
    assert "checkpoint.every_n_train_steps=750" in cmd
    cmd, _ = backend.edit_command(Path("ts"), "piva", Path("src.ckpt"), edit, Path("out"))  # full size: the configs'
    assert not any(c.startswith("checkpoint.") for c in cmd)
    for name in ("source-noe.yaml", "piva-noe.yaml", "dds-noe.yaml"):
        cfg = OmegaConf.load(CONFIGS / name)
        assert cfg.checkpoint.every_n_train_steps == backend.CHECKPOINT_EVERY
        assert backend.checkpoint_interval(cfg.trainer.max_steps) == backend.CHECKPOINT_EVERY
        assert cfg.checkpoint.save_top_k == 1 and cfg.checkpoint.save_last == "link"  # one checkpoint on disk


def test_run_reports_the_launched_process_peak_memory_not_its_own(tmp_path):
    """launch.py's peak memory is its own (the kernel's account of the child), not the waiting runner's."""
    import resource

    from piva.threestudio import backend

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    small = backend.run([sys.executable, "-c", "import time; time.sleep(0.3)"], tmp_path)["process_peak_rss_mb"]
    big = backend.run([sys.executable, "-c", "import time; x = b'1' * (300 * 2**20); time.sleep(0.3)"],
                      tmp_path)["process_peak_rss_mb"]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert before > 100, before  # pytest with torch: a figure of the runner's would show in the small child's
    assert 0 < small < 50 and 300 < big < 350, (small, big)
    assert grown < 50, grown  # the runner itself did not hold the child's 300 MB


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_caller_takes_launch_py_with_it(tmp_path):
    """A benchmark worker killed by SIGKILL cannot clean up: the launch.py it started must not train on as an orphan."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    caller = subprocess.Popen([sys.executable, "-c", "import sys; from piva.threestudio import backend; "
                               f"backend.run([sys.executable, '-c', {child!r}], {str(tmp_path)!r})"], cwd=REPO)
    pid = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and caller.poll() is None and not (pid_file.is_file() and pid_file.read_text()):
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        assert _alive(pid)
        caller.kill()
        caller.wait()
        deadline = time.time() + 10
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        assert not _alive(pid), "launch.py outlived the process that started it"
    finally:
        if caller.poll() is None:
            caller.kill()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
