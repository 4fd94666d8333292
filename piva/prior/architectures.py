"""The real model architectures, with random weights: Stable Diffusion 2.1-base and its depth ControlNet.

The configs under `configs/` are the public `config.json` values of
`stabilityai/stable-diffusion-2-1-base` and `thibaud/controlnet-sd21-depth-diffusers`
(no weights). Building them lets CPU tests check LoRA targets, routing and
ControlNet conditioning on the exact layer layout users load, and lets budget
scripts count FLOPs and memory at 512² without a download. On the meta device
nothing is allocated (parameter counts, FLOPs from shapes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from piva.prior.loading import DEFAULT_CONTROLNET, DEFAULT_MODEL, DiffusionPrior, resolve_dtype
from piva.prior.tiny import wake_zero_convs

CONFIG_ROOT = Path(__file__).parent / "configs"
# hub id -> folder of its shipped configs
ARCHITECTURES = {
    DEFAULT_MODEL: CONFIG_ROOT / "stable-diffusion-2-1-base",
    DEFAULT_CONTROLNET: CONFIG_ROOT / "controlnet-sd21-depth",
}
# The CLIP BPE vocabulary (the same files as SD 2.1's tokenizer folder), shipped with the toy prior.
_VOCABULARY = Path(__file__).parents[1] / "toyworld" / "weights" / "prior" / "tokenizer"


def _config(name: str, part: str = "") -> dict:
    if name not in ARCHITECTURES:
        raise ValueError(f"no shipped architecture {name!r}: choose one of {', '.join(ARCHITECTURES)}")
    folder = ARCHITECTURES[name] / part
    path = folder / ("scheduler_config.json" if part == "scheduler" else "config.json")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _tokenizer():
    from transformers import CLIPTokenizer

    config = json.loads((ARCHITECTURES[DEFAULT_MODEL] / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    return CLIPTokenizer(str(_VOCABULARY / "vocab.json"), str(_VOCABULARY / "merges.txt"), **config)


def build_random_prior(
    model: str = DEFAULT_MODEL,
    controlnet: Optional[str] = DEFAULT_CONTROLNET,
    device: Union[str, torch.device, None] = "cpu",
    dtype: Union[str, torch.dtype, None] = None,
    seed: int = 0,
) -> DiffusionPrior:
    """The architecture of `model` (+ `controlnet`) with random weights, built directly on `device`.

    `device="meta"` allocates nothing: for parameter counts and FLOPs from shapes.
    Weights are random, so outputs mean nothing; shapes, layer names, cost and memory are real.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = resolve_dtype(dtype, device if device.type != "meta" else torch.device("cpu"))
    with torch.random.fork_rng(devices=[]), torch.device(device):  # built where they live; the caller's RNG untouched
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_config(model, "unet"))
        vae = AutoencoderKL(**_config(model, "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config(model, "text_encoder")))
        control = wake_zero_convs(ControlNetModel(**_config(controlnet))) if controlnet is not None else None
    scheduler = DDPMScheduler.from_config(_config(model, "scheduler"))
    prior = DiffusionPrior(
        unet, vae, text_encoder, _tokenizer(), scheduler, control, f"{model} (random weights)",
        f"{controlnet} (random weights)" if controlnet else "",
    )
    if dtype != torch.float32:
        for m in prior.modules():
            m.to(dtype)
    if control is not None:
        prior.check_controlnet()
    return prior.freeze()


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
