"""Quality bar of the toy prior and judge: prompt following, depth following, judge accuracy."""

from __future__ import annotations

from typing import Optional

import torch

from piva.guidance.adapters import depth_to_control
from piva.prior import DiffusionPrior
from piva.toyworld.judge import WEIGHTS, classify, create_judge, dominant_color, iou, silhouette
from piva.toyworld.scenes import COLORS, SHAPES, Scene

PRIOR_DIR = WEIGHTS / "prior"
CONTROLNET_DIR = WEIGHTS / "controlnet"


def load_toy_prior(device: str = "cpu", controlnet: bool = True) -> DiffusionPrior:
    if not (PRIOR_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"toy prior missing in {PRIOR_DIR}: run scripts/train_toy_prior.py")
    return DiffusionPrior.from_pretrained(PRIOR_DIR, controlnet=CONTROLNET_DIR if controlnet else None, device=device)


def pipeline(prior: DiffusionPrior, with_control: bool):
    """A stock diffusers (ControlNet) pipeline over the prior's modules, DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    parts = dict(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer, unet=prior.unet,
                 scheduler=DDIMScheduler.from_config(prior.scheduler.config), safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    if with_control:
        pipe = StableDiffusionControlNetPipeline(controlnet=prior.controlnet, **parts)
    else:
        pipe = StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(prior: DiffusionPrior, prompts: list[str], seed: int = 0, steps: int = 25, cfg: float = 5.0,
           control: Optional[torch.Tensor] = None) -> torch.Tensor:
    pipe = pipeline(prior, control is not None)
    kwargs = dict(image=control) if control is not None else {}
    size = prior.resolution
    out = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
               generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
    return out.float().clamp(0, 1)


def measure(samples_per_prompt: int = 8, seed: int = 0, progress: bool = True) -> dict:
    """The figures of the toy world's quality bar (issue: >= 90 % colour, >= 80 % shape)."""
    from tqdm.auto import tqdm

    from piva.toyworld.data import make_dataset

    prior = load_toy_prior()
    judge, _, tok = create_judge()
    base = [Scene(shape=s, color=c) for s in SHAPES for c in COLORS]
    prompts = [s.caption for s in base]
    colour_ok, shape_ok, judge_colour_ok, n = 0, 0, 0, 0
    for i in tqdm(range(0, len(prompts), 6), desc="prior samples", disable=not progress):
        batch = [p for p in prompts[i : i + 6] for _ in range(samples_per_prompt)]
        imgs = sample(prior, batch, seed=seed + i)
        probs = classify(judge, tok, imgs, prompts)
        picked = [base[j] for j in probs.argmax(-1).tolist()]
        found = dominant_color(imgs, silhouette(imgs))
        for p, got, col in zip(batch, picked, found):
            want = Scene.from_caption(p)
            colour_ok += col == want.color
            shape_ok += got.shape == want.shape
            judge_colour_ok += got.color == want.color
            n += 1

    # Depth following: sample with the ControlNet on held-out depth maps, compare silhouettes.
    held = make_dataset(48, seed=10_000 + seed)
    caps = [held["captions"][j] for j in held["caption_index"].tolist()]
    control = depth_to_control(held["depth"], (prior.resolution, prior.resolution))
    imgs = sample(prior, caps, seed=seed, control=control)
    sil_iou = iou(silhouette(imgs), held["alpha"]).mean().item()
    free = sample(prior, caps, seed=seed)
    free_iou = iou(silhouette(free), held["alpha"]).mean().item()

    # Judge on held-out renders, all captions (with parts).
    test = make_dataset(600, seed=20_000 + seed)
    probs = classify(judge, tok, test["rgb"], test["captions"])
    judge_top1 = (probs.argmax(-1) == test["caption_index"]).float().mean().item()
    return {
        "samples": n,
        "colour_accuracy_exact": colour_ok / n,
        "shape_accuracy_judge": shape_ok / n,
        "colour_accuracy_judge": judge_colour_ok / n,
        "depth_silhouette_iou_controlnet": sil_iou,
        "depth_silhouette_iou_without_control": free_iou,
        "judge_top1_heldout_all_captions": judge_top1,
        "judge_captions": len(test["captions"]),
    }
