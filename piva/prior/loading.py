"""Load the diffusion parts PiVa needs from a hub id or a local diffusers folder.

The same code path serves Stable Diffusion for GPU users and the tiny offline
priors used by tests and the toy world: only the folder differs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_CONTROLNET = "thibaud/controlnet-sd21-depth-diffusers"

# Sub-folders of a diffusers text-to-image checkpoint that PiVa reads.
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ModelNotFoundError(FileNotFoundError):
    """Raised at once (never after a hub retry loop) when weights are not available."""


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set, read now (tests and callers set it after import) and by
    huggingface_hub's own rule for true values, so piva and the hub client always agree."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES


def _hub_reachable(timeout: float = 3.0, host: Optional[str] = None) -> bool:
    """A bounded connectivity probe (the Hugging Face endpoint unless `host`): DNS can hang too, so it runs in a thread."""
    from huggingface_hub import constants

    host = host or constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def resolve_model_dir(model: Union[str, os.PathLike], parts: Sequence[str] = REQUIRED_PARTS) -> Path:
    """Turn a hub id or a local path into a local folder holding `parts`.

    Hub ids are looked up in the local cache first; a download is tried only when
    the hub answers within seconds, so a machine without network gets a clear
    error instead of a long retry loop.
    """
    text = str(model)
    if not text.strip():
        raise ModelNotFoundError("empty model name: pass a hub id (e.g. %s) or a local folder" % DEFAULT_MODEL)
    path = Path(text).expanduser()
    looks_local = path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ModelNotFoundError(f"model folder {text!r} does not exist: pass a diffusers folder or a hub id")
        _check_parts(path, parts, text)
        return path

    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(text, local_files_only=True))
        _check_parts(local, parts, text)
        return local
    except Exception:
        pass
    how = (
        f"download it on a connected machine with `huggingface-cli download {text}` "
        f"(then copy the cache or pass the folder path)"
    )
    if hf_offline():
        raise ModelNotFoundError(f"{text!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: {how}")
    if not _hub_reachable():
        raise ModelNotFoundError(f"{text!r} is not in the local cache and the model hub cannot be reached: {how}")
    local = Path(snapshot_download(text))
    _check_parts(local, parts, text)
    return local


def _check_parts(path: Path, parts: Sequence[str], name: str) -> None:
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{name!r} lacks {', '.join(missing)}: expected a diffusers folder with "
            f"{', '.join(parts)} (like {DEFAULT_MODEL})"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (half is slow or unsupported there); bf16/fp16 on GPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """A dtype from its name as configs write it (float32 | float16 | bfloat16); None: `default_dtype`."""
    if dtype is None or dtype == "":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


PAPER_GUIDANCE_SCALE = 7.5
"""The paper's classifier-free guidance of Stable Diffusion 2.1-base."""


def recommended_guidance_scale(root: Union[str, os.PathLike]) -> float:
    """`guidance_scale` from the model folder's `piva.json` (the model's own recommendation), else the paper's."""
    path = Path(root) / "piva.json"
    if not path.is_file():
        return PAPER_GUIDANCE_SCALE
    try:
        value = float(json.loads(path.read_text())["guidance_scale"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f'{path}: expected {{"guidance_scale": <number>}} ({exc!r}): fix or delete the file') from None
    if value < 1:
        raise ValueError(f"{path}: guidance_scale {value} must be >= 1")
    return value


@dataclass
class DiffusionPrior:
    """The frozen base model (UNet, VAE, text encoder) plus an optional depth ControlNet."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    controlnet: Optional[torch.nn.Module] = None
    name: str = ""
    controlnet_name: str = ""
    guidance_scale: float = PAPER_GUIDANCE_SCALE
    """The classifier-free guidance this model is scored with when the method sets none: `guidance_scale` in a
    `piva.json` beside the model's model_index.json (`recommended_guidance_scale`), else the paper's 7.5."""
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(
        cls,
        model: Union[str, os.PathLike] = DEFAULT_MODEL,
        controlnet: Optional[Union[str, os.PathLike]] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Union[str, torch.dtype, None] = None,
    ) -> "DiffusionPrior":
        """Load every part from a hub id or local folder; `controlnet=None` skips the ControlNet."""
        from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        device = torch.device(device) if device is not None else default_device()
        dtype = resolve_dtype(dtype, device)
        root = resolve_model_dir(model)
        control_root = resolve_model_dir(controlnet, parts=()) if controlnet is not None else None
        if control_root is not None and not (control_root / "config.json").is_file():
            raise ModelNotFoundError(f"ControlNet {str(controlnet)!r} has no config.json: pass a diffusers ControlNet folder")

        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        if len(tokenizer) < 1000:
            # transformers can silently build a near-empty tokenizer from a broken folder.
            raise ModelNotFoundError(
                f"tokenizer in {root / 'tokenizer'} has only {len(tokenizer)} tokens: "
                "vocab.json/merges.txt are missing or broken; re-download the model"
            )
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        control = ControlNetModel.from_pretrained(control_root, torch_dtype=dtype) if control_root else None

        prior = cls(unet, vae, text_encoder, tokenizer, scheduler, control, str(model), str(controlnet or ""),
                    guidance_scale=recommended_guidance_scale(root))
        if control is not None:
            prior.check_controlnet()
        return prior.to(device).freeze()

    # -- set-up -----------------------------------------------------------------
    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.controlnet) if m is not None]

    def to(self, device: Union[str, torch.device]) -> "DiffusionPrior":
        for m in self.modules():
            m.to(device)
        self._prompt_cache.clear()
        return self

    def freeze(self) -> "DiffusionPrior":
        """Base weights never change: only adapters (added later) are trainable."""
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()
        return self

    def check_controlnet(self) -> None:
        cn, un = self.controlnet.config, self.unet.config
        if tuple(cn.block_out_channels) != tuple(un.block_out_channels) or cn.cross_attention_dim != un.cross_attention_dim:
            raise ValueError(
                f"ControlNet {self.controlnet_name!r} does not match the base model {self.name!r} "
                f"(blocks {tuple(cn.block_out_channels)} vs {tuple(un.block_out_channels)}, "
                f"cross-attention {cn.cross_attention_dim} vs {un.cross_attention_dim}): use a ControlNet trained for it"
            )

    # -- properties -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be a multiple of this for the UNet's down/up blocks to line up."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The pixel resolution the model was trained at."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    # -- text -------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [N, 77, D], cached per prompt (the empty prompt is the unconditional one)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            embeds = self.text_encoder(tokens)[0].to(self.dtype)
            for p, e in zip(missing, embeds):
                self._prompt_cache[p] = e
        return torch.stack([self._prompt_cache[p] for p in prompts])

    # -- images <-> latents -----------------------------------------------------
    def encode_images(self, rgb: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> scaled latents; differentiable so gradients reach the renderer."""
        dist = self.vae.encode((2 * rgb - 1).to(self.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    # -- diffusion ---------------------------------------------------------------
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: Union[int, torch.Tensor]) -> torch.Tensor:
        """Forward diffusion z_t = sqrt(a_t) z + sqrt(1 - a_t) noise by the scheduler, in the model's dtype.

        Computed in fp32 (the scheduler would cast a_t to a bf16 input's dtype before the square roots).
        `t` is one timestep for the whole batch or one per sample.
        """
        t = torch.as_tensor(t, dtype=torch.long).expand(latents.shape[0])
        return self.scheduler.add_noise(latents.float(), noise.float(), t).to(self.dtype)

    # -- model outputs ----------------------------------------------------------
    def to_epsilon(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a UNet output to a noise prediction (v-prediction models predict v)."""
        if self.prediction_type == "epsilon":
            return output
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * output + (1 - a).sqrt() * z_t
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}: use an epsilon or v-prediction model")

    def training_target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output for the diffusion loss (eq. 7/8)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}: use an epsilon or v-prediction model")
