"""`piva demo`: the whole 3D path in the toy world, offline on a CPU.

Builds a toy scene, reconstructs it with a small nerfacto, edits it with `ns-train
piva` (the registered method, toy prior), then renders before/after views and a
turntable and lets the judge score success and preservation.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from piva.metrics import psnr, ssim
from piva.nerfstudio.views import load_pipeline, render_views
from piva.toyworld import nerf
from piva.toyworld.judge import classify, create_judge, iou, object_hue_fraction, silhouette
from piva.toyworld.quality import CONTROLNET_DIR, PRIOR_DIR
from piva.toyworld.scenes import Camera, Scene, all_scenes, look_at, render, write_blender_dataset


def score(edited: torch.Tensor, original: torch.Tensor, source: Scene, target: Scene, cams: list[Camera]) -> dict:
    """Judge's success and the exact preservation figures, on the same cameras."""
    judge, _, tok = create_judge()
    captions = [s.caption for s in all_scenes()]
    probs = classify(judge, tok, edited, captions)
    top = probs.argmax(-1)
    ti, si = captions.index(target.caption), captions.index(source.caption)
    exact_target = [render(target, c) for c in cams]
    exact_source = [render(source, c) for c in cams]
    obj_t = torch.from_numpy(np.stack([r["object"] for r in exact_target]))[:, None]
    alpha_t = torch.from_numpy(np.stack([r["alpha"] for r in exact_target]))[:, None]
    alpha_s = torch.from_numpy(np.stack([r["alpha"] for r in exact_source]))[:, None]
    untouched = 1 - ((alpha_s + alpha_t) > 0.01).float()  # outside everything the edit may touch
    return {
        "judge_success_rate": float((top == ti).float().mean()),
        "judge_source_rate": float((top == si).float().mean()),
        "judge_p_target": float(probs[:, ti].mean()),
        "judge_p_source": float(probs[:, si].mean()),
        "target_colour_fraction": float(object_hue_fraction(edited, obj_t, target.color).mean()),
        "silhouette_iou_vs_target_geometry": float(iou(silhouette(edited), alpha_t).mean()),
        "psnr_vs_original": psnr(edited, original),
        "ssim_vs_original": ssim(edited, original),
        "background_psnr_vs_original": psnr(edited, original, untouched),
    }


def save_strip(path: Path, rows: list[torch.Tensor], scale: int = 4) -> None:
    import imageio.v3 as iio

    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    iio.imwrite(path, np.kron(arr, np.ones((scale, scale, 1), np.uint8)))


def _slug(caption: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", caption.lower()).strip("-")


def _key(**settings) -> str:
    """Short hash of what a cached step was built from, so a changed setting never reuses a stale result."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_demo(
    out_dir: Path,
    source: str = "a red cube",
    target: str = "a blue cube",
    method: str = "piva",
    source_steps: int = 600,
    edit_steps: int = 300,
    views: int = 40,
    seed: int = 0,
    geometry: str = "auto",
    same_latent: bool = False,
) -> dict:
    """`geometry`: "keep" trains only the colour head, "edit" the whole field, "auto" keeps it when
    source and target differ only in colour. `same_latent=False` (the true source latent, not the
    paper's shared z_t): in the toy world the shared-latent step does not stop at the target colour
    and carries the cube past blue to white (measured: docs/toyworld.md, 3D demo)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, tgt = Scene.from_caption(source), Scene.from_caption(target)
    if geometry not in ("auto", "keep", "edit"):
        raise ValueError(f"geometry must be auto, keep or edit, not {geometry!r}")
    edit_geometry = (src.shape, src.parts) != (tgt.shape, tgt.parts) if geometry == "auto" else geometry == "edit"
    for d in (PRIOR_DIR, CONTROLNET_DIR):
        if not d.is_dir():
            raise FileNotFoundError(f"toy prior missing ({d}): run scripts/train_toy_prior.py")
    t0 = time.perf_counter()
    timings = {}
    # Each cached step lives in a folder named by its settings: another caption, seed or step
    # count builds anew instead of reusing (or overwriting) an earlier result.
    scene_settings = dict(source=source, views=views, seed=seed, source_steps=source_steps,
                          model=nerf.model_settings(small=True, white_background=False))
    scene_dir = out_dir / "scenes" / f"{_slug(source)}-{_key(**scene_settings)}"
    data = scene_dir / "data"
    if not (data / "transforms_train.json").is_file():
        write_blender_dataset(src, data, n_train=views, n_val=4, size=64, seed=seed)

    source_run = scene_dir / "source" / "nerfacto" / "run"
    if not list((source_run / "nerfstudio_models").glob("*.ckpt")):
        print(f"[demo] 1/3 reconstructing '{source}' with nerfacto ({source_steps} steps)")
        nerf.run(nerf.source_scene_config(data, scene_dir, steps=source_steps))
    timings["source_scene_s"] = round(time.perf_counter() - t0, 1)

    what = "colour head only, geometry kept" if not edit_geometry else "whole field"
    print(f"[demo] 2/3 editing '{source}' -> '{target}' with {method} ({edit_steps} steps, {what}; "
          "resumes if interrupted)")
    cfg = nerf.edit_config(data, source_run / "nerfstudio_models", scene_dir / "edits", source, target, PRIOR_DIR,
                           CONTROLNET_DIR if method == "piva" else None, method=method, steps=edit_steps,
                           same_latent=same_latent, edit_geometry=edit_geometry)
    cfg.experiment_name = f"{_slug(target)}-{method}-{_key(steps=edit_steps, geometry=edit_geometry, same=same_latent)}"
    edit_run = nerf.edit_scene(cfg)
    timings["edit_s"] = round(time.perf_counter() - t0 - timings["source_scene_s"], 1)

    print("[demo] 3/3 rendering before/after and judging")
    original, _ = load_pipeline(source_run)
    edited, _ = load_pipeline(edit_run)
    eval_cams = [Camera(look_at(az, 30.0, 3.6), 40.0, 32, 32) for az in np.linspace(0, 360, 12, endpoint=False)]
    before = render_views(original, eval_cams)
    after = render_views(edited, eval_cams)
    metrics = score(after["rgb"], before["rgb"], src, tgt, eval_cams)
    save_strip(out_dir / f"before_after_{method}.png", [before["rgb"][:6], after["rgb"][:6]])
    turn_cams = [Camera(look_at(az, 30.0, 3.6), 40.0, 64, 64) for az in np.linspace(0, 360, 36, endpoint=False)]
    b, a = render_views(original, turn_cams)["rgb"], render_views(edited, turn_cams)["rgb"]
    import imageio.v3 as iio

    frames = (torch.cat([b, a], dim=3).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    frames = np.stack([np.kron(f, np.ones((3, 3, 1), np.uint8)) for f in frames])
    iio.imwrite(out_dir / f"turntable_{method}.gif", frames, duration=80, loop=0)
    timings["total_s"] = round(time.perf_counter() - t0, 1)
    result = {"source": source, "target": target, "method": method, "source_steps": source_steps,
              "edit_steps": edit_steps, "edit_geometry": edit_geometry, "same_latent": same_latent,
              "metrics": metrics, "timings": timings,
              "judge": "toy-world judge (tiny open_clip trained on toy renders), not CLIP",
              "outputs": {"before_after": f"before_after_{method}.png", "turntable": f"turntable_{method}.gif",
                          "edited_run": str(edit_run)}}
    (out_dir / f"result_{method}.json").write_text(json.dumps(result, indent=2))
    return result
