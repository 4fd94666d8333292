"""Scoring of the paper's 2D experiment in miniature: appearance / addition / shape edits.

The experiment itself (editing with SDS, DDS and PiVa through `piva.image`) is run by
scripts/toy_edit_experiment.py, above both front ends; this module scores and tabulates.
Each edit starts from an exact toy render; success is judged by the toy judge and the
exact colour check, preservation by PSNR/SSIM to the source, a judge-feature
distance (a stand-in for LPIPS, whose AlexNet weights are not available offline)
and the error outside everything the edit may touch (known exactly here).
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import torch
import torch.nn.functional as F

from piva.metrics import psnr, ssim
from piva.toyworld.judge import classify, create_judge, normalize, object_hue_fraction
from piva.toyworld.data import random_camera
from piva.toyworld.scenes import Camera, Scene, all_scenes, render

EDITS = {
    "appearance": ("a red cube", "a blue cube"),
    "addition": ("a red cube", "a red cube on a white plate"),
    "shape": ("a red cube", "a red sphere"),
}


def source_view(source: Scene, target: Scene, seed: int) -> tuple[Camera, Scene, Scene, torch.Tensor]:
    """The seed's toy camera and cube yaw, the scenes turned to it, and the source render [1,3,H,W]."""
    rng = np.random.default_rng(1000 + seed)
    cam = random_camera(rng)
    yaw = float(rng.uniform(0, np.pi / 2))
    source, target = source.with_(yaw=yaw), target.with_(yaw=yaw)
    img = torch.from_numpy(render(source, cam)["rgb"]).permute(2, 0, 1)[None]
    return cam, source, target, img


def evaluate(edited: torch.Tensor, source_img: torch.Tensor, source: Scene, target: Scene, cam, judge, tok) -> dict:
    captions = [s.caption for s in all_scenes()]
    probs = classify(judge, tok, edited, captions)[0]
    ti, si = captions.index(target.caption), captions.index(source.caption)
    rs, rt = render(source, cam), render(target, cam)
    touch = torch.from_numpy(((rs["alpha"] + rt["alpha"]) > 0.01).astype(np.float32))[None, None]
    obj_t = torch.from_numpy(rt["object"])[None, None]
    with torch.no_grad():
        fe = F.normalize(judge.encode_image(normalize(edited)), dim=-1)
        fs = F.normalize(judge.encode_image(normalize(source_img)), dim=-1)
    return {
        "success": float(probs.argmax() == ti),
        "p_target": float(probs[ti]),
        "p_source": float(probs[si]),
        "target_colour": float(object_hue_fraction(edited, obj_t, target.color)[0]),
        "psnr": psnr(edited, source_img),
        "ssim": ssim(edited, source_img),
        "judge_feature_distance": float(1 - (fe * fs).sum()),
        "psnr_outside_edit": psnr(edited, source_img, 1 - touch),
    }


def summarize(rows: list[dict]) -> list[dict]:
    keys = ["success", "p_target", "target_colour", "psnr", "ssim", "judge_feature_distance", "psnr_outside_edit", "seconds"]
    out = []
    for kind in dict.fromkeys(r["edit"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["edit"] == kind and r["method"] == method]
            if sel:
                out.append({"edit": kind, "method": method, "n": len(sel),
                            **{k: statistics.fmean(r[k] for r in sel) for k in keys}})
    return out


def markdown(table: list[dict], settings: dict) -> str:
    head = ("| edit | method | n | success (judge) | p(target) | target colour | PSNR ↑ | SSIM ↑ | judge-feature dist ↓ "
            "| PSNR outside edit ↑ | s/edit |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['edit']} | {r['method']} | {r['n']} | {r['success']:.2f} | {r['p_target']:.2f} | {r['target_colour']:.2f} "
        f"| {r['psnr']:.1f} | {r['ssim']:.3f} | {r['judge_feature_distance']:.3f} | {r['psnr_outside_edit']:.1f} "
        f"| {r['seconds']:.0f} |\n"
        for r in table
    )
    return f"Settings: {json.dumps(settings)}\n\n" + head + body
