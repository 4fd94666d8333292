"""The paper's 2D experiment in miniature: appearance / addition / shape edits with SDS, DDS and PiVa.

Each edit starts from an exact toy render; success is judged by the toy judge and the
exact colour check, preservation by PSNR/SSIM to the source, a judge-feature
distance (a stand-in for LPIPS, whose AlexNet weights are not available offline)
and the error outside everything the edit may touch (known exactly here).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from piva.guidance import GuidanceConfig
from piva.image.edit import ImageEditConfig, edit_image, load_image
from piva.metrics import psnr, ssim
from piva.toyworld.data import random_camera
from piva.toyworld.judge import classify, create_judge, normalize, object_hue_fraction
from piva.toyworld.quality import load_toy_prior
from piva.toyworld.scenes import Scene, all_scenes, render

EDITS = {
    "appearance": ("a red cube", "a blue cube"),
    "addition": ("a red cube", "a red cube on a white plate"),
    "shape": ("a red cube", "a red sphere"),
}


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


def run_experiment(
    out_dir: Path,
    methods: Sequence[str] = ("sds", "dds", "piva"),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 300,
    lr: float = 0.01,
    identity_weight: float = 0.4,
    edits: dict = EDITS,
    progress: bool = False,
    same_latent: Optional[bool] = None,
) -> dict:
    out_dir = Path(out_dir)
    judge, _, tok = create_judge()
    rows = []
    for kind, (src_cap, tgt_cap) in edits.items():
        source, target = Scene.from_caption(src_cap), Scene.from_caption(tgt_cap)
        for seed in seeds:
            rng = np.random.default_rng(1000 + seed)
            cam = random_camera(rng)
            yaw = float(rng.uniform(0, np.pi / 2))
            source, target = source.with_(yaw=yaw), target.with_(yaw=yaw)
            img = torch.from_numpy(render(source, cam)["rgb"]).permute(2, 0, 1)[None]
            for method in methods:
                prior = load_toy_prior(controlnet=False)  # 2D: LoRA on the UNet only
                run_dir = out_dir / kind / f"{method}-seed{seed}"
                guidance = GuidanceConfig(mode=method, source_prompt=src_cap, target_prompt=tgt_cap,
                                          identity_weight=identity_weight, use_controlnet=False,
                                          same_latent=same_latent)
                record = edit_image(img, prior, guidance, run_dir, ImageEditConfig(steps=steps, lr=lr, seed=seed),
                                    progress=progress)
                edited = load_image(run_dir / "edited.png", img.shape[-1], 1)
                row = {"edit": kind, "method": method, "seed": seed, "seconds": record["seconds"],
                       **evaluate(edited, img, source, target, cam, judge, tok)}
                rows.append(row)
                print(json.dumps(row))
    table = summarize(rows)
    result = {"settings": {"steps": steps, "lr": lr, "identity_weight": identity_weight, "seeds": list(seeds),
                           "same_latent": same_latent},
              "rows": rows, "summary": table}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(markdown(table, result["settings"]))
    return result


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
