"""What an edit did in the toy world, measured against the exact scenes: the judge's verdict per view and
preservation outside everything the edit may touch. Used by `piva demo` and the toy Noe benchmark."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from piva.metrics import psnr, ssim
from piva.toyworld.judge import classify, create_judge, iou, object_hue_fraction, silhouette
from piva.toyworld.scenes import Camera, Scene, all_scenes, render


def exact_edit_figures(edited: torch.Tensor, original: torch.Tensor, source: Scene, target: Scene,
                       cams: Sequence[Camera], judge=None) -> dict:
    """Judge's success and the exact preservation figures of renders [N,3,H,W] at `cams`.

    Success: the judge ranks the target caption first among every toy caption. Background: PSNR
    against the original outside the exact source silhouette and every silhouette the target caption
    allows (`target_poses`); `..._exact_pose` keeps the target at the toy scene's own pose. Shape: silhouette
    IoU against the exact target, and against the target at the pose that fits best."""
    model, _, tok = judge if judge is not None else create_judge()
    captions = [s.caption for s in all_scenes()]
    probs = classify(model, tok, edited, captions)
    top = probs.argmax(-1)
    ti, si = captions.index(target.caption), captions.index(source.caption)
    exact_target = [render(target, c) for c in cams]
    exact_source = [render(source, c) for c in cams]
    obj_t = torch.from_numpy(np.stack([r["object"] for r in exact_target]))[:, None]
    alpha_t = torch.from_numpy(np.stack([r["alpha"] for r in exact_target]))[:, None]
    alpha_s = torch.from_numpy(np.stack([r["alpha"] for r in exact_source]))[:, None]
    posed = [alpha_t] + [torch.from_numpy(np.stack([render(p, c)["alpha"] for c in cams]))[:, None]
                         for p in target_poses(source, target)[1:]]  # [N,1,H,W] per pose the caption allows
    alpha_any = torch.stack(posed).amax(0)
    untouched = 1 - ((alpha_s + alpha_any) > 0.01).float()  # outside everything the edit may touch
    untouched_exact = 1 - ((alpha_s + alpha_t) > 0.01).float()
    return {
        "judge_success_rate": float((top == ti).float().mean()),
        "judge_source_rate": float((top == si).float().mean()),
        "judge_p_target": float(probs[:, ti].mean()),
        "judge_p_source": float(probs[:, si].mean()),
        "target_colour_fraction": float(object_hue_fraction(edited, obj_t, target.color).mean()),
        "silhouette_iou_vs_target_geometry": float(iou(silhouette(edited), alpha_t).mean()),
        # The same at the target pose that fits best (one pose for every view: the object has one yaw).
        "silhouette_iou_vs_target_any_pose": max(float(iou(silhouette(edited), a).mean()) for a in posed),
        "silhouette_iou_vs_source_geometry": float(iou(silhouette(edited), alpha_s).mean()),
        # Against the original scene's own silhouette: what the edit changed, not what the reconstruction missed.
        "silhouette_iou_vs_original": float(iou(silhouette(edited), silhouette(original)).mean()),
        # The same two measures on the original scene's renders: how far the edit moved.
        "judge_p_target_original": float(classify(model, tok, original, captions)[:, ti].mean()),
        "target_colour_fraction_original": float(object_hue_fraction(original, obj_t, target.color).mean()),
        "silhouette_iou_vs_target_geometry_original": float(iou(silhouette(original), alpha_t).mean()),
        "object_rgb": _mean_rgb(edited, obj_t),
        "object_rgb_original": _mean_rgb(original, obj_t),
        "psnr_vs_original": psnr(edited, original),
        "ssim_vs_original": ssim(edited, original),
        "background_psnr_vs_original": psnr(edited, original, untouched),
        "background_psnr_vs_original_exact_pose": psnr(edited, original, untouched_exact),
    }


def target_poses(source: Scene, target: Scene, samples: int = 16) -> list[Scene]:
    """Every pose of the target scene its caption allows, the scene itself first. A caption fixes shape, colour and parts, and an
    edit keeps the source object's pose, but a shape change to a cube leaves the new cube's yaw open: any
    yaw is as right as the toy scene's own 0.35 rad, and the corners of another yaw are not background
    damage. A cube repeats every quarter turn, so the scene's own yaw and `samples` more over [0, pi/2) cover it."""
    if target.shape != "cube" or source.shape == "cube":
        return [target]
    return [target] + [target.with_(yaw=k * (math.pi / 2) / samples) for k in range(samples)]


def _mean_rgb(rgb: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Mean colour of the pixels inside `mask` (the target object's exact silhouette)."""
    m = (mask > 0.5).float()
    return ((rgb * m).sum((0, 2, 3)) / m.sum().clamp(min=1)).tolist()
