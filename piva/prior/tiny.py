"""Tiny diffusers checkpoints built from configs, in the stable-diffusion-2-1-base layout.

Tests and offline demos load these through `DiffusionPrior.from_pretrained`, the
same path real weights take. The tokenizer is the real CLIP BPE, rebuilt from the
vocabulary open_clip ships, so prompts tokenize exactly as with Stable Diffusion.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Sequence, Union

import torch


def write_clip_tokenizer(out_dir: Union[str, Path]) -> Path:
    """Write vocab.json + merges.txt for OpenAI CLIP's BPE (49408 tokens) from open_clip's vocabulary file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # same slice as CLIP's reference tokenizer
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(out)
    # Same files as stable-diffusion-2-1-base's tokenizer folder; the fast-tokenizer
    # JSON is derived from them and would double the committed size.
    (out / "tokenizer.json").unlink(missing_ok=True)
    return out


def tiny_configs(
    block_out_channels: Sequence[int] = (32, 64),
    vae_channels: Sequence[int] = (32, 64),
    sample_size: int = 16,
    text_dim: int = 32,
    prediction_type: str = "epsilon",
) -> dict:
    """Configs for a tiny SD-style model; `sample_size` is the latent side."""
    n = len(block_out_channels)
    unet = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=list(block_out_channels),
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    controlnet = {k: v for k, v in unet.items() if k not in ("out_channels", "up_block_types", "sample_size")}
    controlnet.update(
        sample_size=sample_size,
        conditioning_embedding_out_channels=[16] * len(vae_channels),
        conditioning_channels=3,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        block_out_channels=list(vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size * 2 ** (len(vae_channels) - 1),
    )
    text = dict(
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    scheduler = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )
    return dict(unet=unet, controlnet=controlnet, vae=vae, text_encoder=text, scheduler=scheduler)


def build_tiny_prior(
    out_dir: Union[str, Path],
    seed: int = 0,
    with_controlnet: bool = True,
    **config_kwargs,
) -> Path:
    """Write a randomly initialised tiny checkpoint; the ControlNet goes to `<out_dir>/controlnet`."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    cfg = tiny_configs(**config_kwargs)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    unet.save_pretrained(out / "unet")
    AutoencoderKL(**cfg["vae"]).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).save_pretrained(out / "text_encoder")
    DDPMScheduler(**cfg["scheduler"]).save_pretrained(out / "scheduler")
    write_clip_tokenizer(out / "tokenizer")
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
            indent=2,
        )
    )
    if with_controlnet:
        # A ControlNet starts as a copy of the UNet's encoder (zero convs keep it neutral).
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=tuple(cfg["controlnet"]["conditioning_embedding_out_channels"])
        )
        wake_zero_convs(controlnet)
        controlnet.save_pretrained(out / "controlnet")
    return out


def wake_zero_convs(controlnet: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Small random weights for a new ControlNet's zero convolutions.

    A trained ControlNet's are not zero; a random one with silent zero convs would give
    its LoRA layers no gradient and hide depth-routing bugs in tests."""
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, std)
    return controlnet
