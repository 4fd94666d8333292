"""splatfacto scenes on CPU end to end: a fit, a piva-splat recolour, a resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch


# ---------------------------------------------------------------------------- splatfacto on CPU, end to end
@pytest.mark.slow
def test_toy_splat_scene_recolour_keeps_the_gaussians_and_resumes(tmp_path):
    """A splatfacto scene of the red cube fitted on CPU, then `piva-splat` towards "a blue cube": the object's
    pixels turn blue, the Gaussians stay where they were (a colour edit grows none), and a resumed edit
    continues the step count with both adapters."""
    import dataclasses

    from piva.nerfstudio import runs
    from piva.nerfstudio.views import load_pipeline, render_views
    from piva.noe.prepare import toy_object_scene
    from piva.toyworld.judge import object_hue_fraction
    from piva.toyworld.quality import CONTROLNET_DIR, PRIOR_DIR
    from piva.toyworld.scenes import BACKGROUND, Scene, render, write_blender_dataset
    from piva.data.views import read_views

    data = write_blender_dataset(Scene("cube", "red"), tmp_path / "data", n_train=16, n_val=3, size=32)
    scene = toy_object_scene(data)
    size = dataclasses.replace(runs.TOY_SIZE, source_steps=SOURCE_STEPS, edit_steps=EDIT_STEPS, anneal_step=EDIT_STEPS // 2)
    source = runs.reconstruct(scene, tmp_path / "source", size, splats=True)
    views = read_views(data, "test").cameras
    truth = [render(Scene("cube", "red"), cam) for cam in views]
    exact = torch.stack([torch.as_tensor(np.asarray(t["rgb"])).permute(2, 0, 1).float() for t in truth])
    mask = torch.stack([torch.as_tensor(np.asarray(t["alpha"])).float()[None] for t in truth])
    pipe, _ = load_pipeline(source, device="cpu")
    assert pipe.model.config.rasterize_mode == "antialiased"  # piva's fit: drawn below 32 px without swelling
    before = render_views(pipe, views)["rgb"]
    n_source = pipe.model.num_points
    means_source = pipe.model.means.detach().clone()
    psnr = -10 * torch.log10(((before - exact) ** 2).mean())
    flat = -10 * torch.log10(((exact - BACKGROUND) ** 2).mean())
    assert psnr > flat + 5, (float(psnr), float(flat))  # a recognisable cube
    assert object_hue_fraction(before, mask, "red").mean() > 0.8

    cfg = runs.edit_config("piva-splat", scene, source / "nerfstudio_models", tmp_path / "edit", "a red cube",
                           "a blue cube", size, diffusion_model=str(PRIOR_DIR), controlnet_model=str(CONTROLNET_DIR))
    run = runs.edit(cfg)
    pipe, _ = load_pipeline(run, device="cpu")
    after = render_views(pipe, views)["rgb"]
    blue = object_hue_fraction(after, mask, "blue").mean()
    assert object_hue_fraction(before, mask, "blue").mean() < 0.05  # the source has none
    assert blue > 0.3 and object_hue_fraction(after, mask, "red").mean() < 0.05, float(blue)
    assert pipe.model.num_points == n_source and torch.equal(pipe.model.means.detach(), means_source)

    ckpt = runs.latest_checkpoint(run / "nerfstudio_models")
    assert runs.edit_steps_done(ckpt) == EDIT_STEPS
    cfg = runs.edit_config("piva-splat", scene, source / "nerfstudio_models", tmp_path / "edit", "a red cube",
                           "a blue cube", dataclasses.replace(size, edit_steps=EDIT_STEPS + 4),
                           diffusion_model=str(PRIOR_DIR), controlnet_model=str(CONTROLNET_DIR))
    runs.edit(cfg)
    resumed = runs.latest_checkpoint(run / "nerfstudio_models")
    assert runs.edit_steps_done(resumed) == EDIT_STEPS + 4
    state = torch.load(resumed, map_location="cpu", weights_only=False)["pipeline"]
    assert set(state["piva.adapters"]["weights"]) == {"source", "target"}
    assert state["piva.meta"]["rasterize_mode"] == "antialiased"  # the mode the edit drew the scene in
    steps = [int(v["step"]) for v in state["piva.adapters"]["optimizer"]["state"].values()]
    assert steps and all(s == EDIT_STEPS + 4 for s in steps)  # the adapters' AdamW continued

    # A geometry edit grows Gaussians on the edit's own clock, within its budget (refining every 10 steps here).
    cfg = runs.edit_config("piva-splat", scene, source / "nerfstudio_models", tmp_path / "grow", "a red cube",
                           "a red cube on a white plate", dataclasses.replace(size, edit_steps=GROW_STEPS),
                           diffusion_model=str(PRIOR_DIR), controlnet_model=str(CONTROLNET_DIR), edit_geometry=True)
    cfg.pipeline.model = dataclasses.replace(cfg.pipeline.model, warmup_length=5, refine_every=10, edit_growth_limit=1.25)
    grown = torch.load(runs.latest_checkpoint(runs.edit(cfg) / "nerfstudio_models"), map_location="cpu",
                       weights_only=False)["pipeline"]
    n_grown = grown["_model.gauss_params.means"].shape[0]
    assert grown["piva.meta"]["gaussians_at_edit_start"] == n_source
    assert n_source < n_grown <= 1.25 * n_source, (n_source, n_grown)


SOURCE_STEPS = 300
EDIT_STEPS = 100
GROW_STEPS = 40
