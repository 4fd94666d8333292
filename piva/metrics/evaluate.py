"""The Noe evaluator (ARCHITECTURE.md section 5), shared by benchmark/run.py and the plugins.

Scores edited renders against the ORIGINAL scene's renders at the same cameras.
The models behind CLIP and LPIPS are loaded only from local files or the normal
caches; when they are missing the metric is reported as unavailable with the reason,
never computed from random weights. In the toy world the toy judge
(`piva.toyworld.judge.load_toy_judge`, an `ImageTextModel`) stands in for CLIP and
every figure it produces is labelled as such.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from piva.metrics import clip_consistency, clip_direction, clip_score, psnr, ssim

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
"""torchvision's AlexNet weights, which LPIPS (here and in nerfacto) loads from the torch hub cache."""


class MetricUnavailable(RuntimeError):
    """A metric's model weights are not on this machine."""


def alexnet_cached() -> bool:
    """Whether LPIPS can be built without a download (it would otherwise fetch AlexNet at start-up)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE).is_file()


@dataclass
class ImageTextModel:
    """A CLIP-like model: embeds [N,3,H,W] images in [0,1] and captions in one space."""

    name: str
    encode_images: Callable[[torch.Tensor], torch.Tensor]
    encode_texts: Callable[[Sequence[str]], torch.Tensor]
    is_clip: bool = True


def _clip_preprocess(rgb: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """Instruct-NeRF2NeRF's preprocessing: [0,1] -> bicubic size x size (no crop) -> CLIP mean/std."""
    x = F.interpolate(rgb.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def find_clip_weights(model: str = "ViT-B-32", pretrained: str = "openai") -> Optional[Path]:
    """The cached weights file of an open_clip pretrained tag, or None; never downloads."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    hub = (cfg or {}).get("hf_hub", "").rstrip("/")
    if not hub:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        hit = try_to_load_from_cache(hub, filename)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _file_key(path: Path) -> tuple:
    """What identifies a weights file's contents for the per-process caches: a replaced file is loaded again."""
    st = path.stat()  # of the file a cache symlink points to; the name keeps its suffix (open_clip reads the format off it)
    return str(path.absolute()), st.st_size, st.st_mtime_ns


def load_clip(
    model: str = "ViT-B-32", pretrained: str = "openai", weights: Optional[Union[str, Path]] = None, device: str = "cpu"
) -> ImageTextModel:
    """CLIP through open_clip (OpenAI ViT-B/32 by default; ViT-L-14 as an option), local weights only.

    Built once per process for each model, weights file and device (every edit of a benchmark scores with it)."""
    path = Path(weights) if weights else find_clip_weights(model, pretrained)
    if path is None or not path.is_file():
        raise MetricUnavailable(
            f"CLIP {model}/{pretrained} weights are not in the Hugging Face cache"
            + (f" ({weights} does not exist)" if weights else "")
            + ": pass --clip-weights FILE or run once with network to fill the cache"
        )
    return _build_clip(model, pretrained, _file_key(path), str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _build_clip(model: str, pretrained: str, weights: tuple, device: str) -> ImageTextModel:
    import open_clip

    clip, _, _ = open_clip.create_model_and_transforms(model, pretrained=weights[0], device=device)
    clip.eval().requires_grad_(False)  # shared by every caller of the process: inference only
    tok = open_clip.get_tokenizer(model)
    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size

    @torch.no_grad()
    def images(rgb: torch.Tensor) -> torch.Tensor:
        return torch.cat([clip.encode_image(_clip_preprocess(b, size, mean, std).to(device)).float().cpu()
                          for b in rgb.split(16)])

    @torch.no_grad()
    def texts(captions: Sequence[str]) -> torch.Tensor:
        return clip.encode_text(tok(list(captions)).to(device)).float().cpu()

    return ImageTextModel(f"open_clip {model} ({pretrained})", images, texts, is_clip=True)


LPIPS_NAME = "LPIPS AlexNet (torchmetrics, inputs [0,1] -> [-1,1])"


def load_lpips(net: str = "alex", device: str = "cpu") -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """torchmetrics' LPIPS (AlexNet; inputs in [0,1], scaled to [-1,1] inside), cached weights only.

    The network is built here, once per process for each AlexNet file and device (torchmetrics' functional
    LPIPS builds it again on every call: an AlexNet per view), so an unreadable file fails here, not mid-run."""
    if net != "alex":
        raise MetricUnavailable(f"LPIPS net {net!r}: only 'alex' (the Noe protocol) is supported")
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not path.is_file():
        raise MetricUnavailable(
            f"LPIPS needs AlexNet weights ({ALEXNET_FILE}) in {torch.hub.get_dir()}/checkpoints: copy them there"
        )
    return _build_lpips(_file_key(path), str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _build_lpips(alexnet: tuple, device: str) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    try:  # torchvision reads the file from the hub cache (the key's path)
        net = _NoTrainLpips(net="alex").to(device)
    except Exception as exc:  # an empty, truncated or foreign file
        raise MetricUnavailable(
            f"AlexNet weights {alexnet[0]} ({alexnet[1]} bytes) cannot be read ({type(exc).__name__}): "
            f"replace the file with torchvision's {ALEXNET_FILE}"
        ) from None
    net.eval().requires_grad_(False)  # shared by every caller of the process: inference only (train() is a no-op)

    @torch.no_grad()
    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pair LPIPS [N] of [N,3,H,W] images in [0,1], 16 pairs a batch."""
        a, b = a.clamp(0, 1).float(), b.clamp(0, 1).float()
        return torch.cat([net(x.to(device), y.to(device), normalize=True).flatten().cpu()
                          for x, y in zip(a.split(16), b.split(16))])

    return LPIPS_NAME, fn


def evaluate_views(
    edited: torch.Tensor,
    original: torch.Tensor,
    source_prompt: str,
    target_prompt: str,
    unique: Optional[torch.Tensor] = None,
    image_text: Optional[ImageTextModel] = None,
    lpips: Optional[tuple[str, Callable]] = None,
    unavailable: Optional[dict] = None,
    wrap: bool = True,
) -> dict:
    """All Noe figures for one edit: edited/original are [N,3,H,W] in [0,1] at the same cameras.

    `unique` marks the views averaged over (the orbit's duplicated end view is left
    out; consistency wraps from the last unique view to the first, unless `wrap` is off:
    views along an open path, such as a capture's held-out frames).
    """
    if edited.shape != original.shape or edited.ndim != 4:
        raise ValueError(f"edited {tuple(edited.shape)} and original {tuple(original.shape)} renders must be [N,3,H,W] alike")
    if not torch.isfinite(edited).all():
        raise ValueError("edited renders contain NaN/inf: the edit diverged")
    if unique is not None:
        keep = torch.as_tensor(unique, dtype=torch.bool)
        edited, original = edited[keep], original[keep]
    out: dict = {
        "views": int(edited.shape[0]),
        "psnr": sum(psnr(e, o) for e, o in zip(edited, original)) / len(edited),
        "ssim": ssim(edited, original),
    }
    models = {}
    missing = dict(unavailable or {})
    if image_text is not None:
        e, o = image_text.encode_images(edited), image_text.encode_images(original)
        t_tgt, t_src = image_text.encode_texts([target_prompt, source_prompt])
        prefix = "clip" if image_text.is_clip else "judge"
        out[f"{prefix}_score"] = clip_score(e, t_tgt)
        out[f"{prefix}_score_original"] = clip_score(o, t_tgt)
        out[f"{prefix}_direction"] = clip_direction(e, o, t_tgt, t_src)
        out[f"{prefix}_consistency"] = clip_consistency(e, o, wrap=wrap)
        models[prefix] = image_text.name
    if lpips is not None:
        name, fn = lpips
        out["lpips"] = float(fn(edited, original).mean())
        models["lpips"] = name
    out["models"] = models
    if missing:
        out["unavailable"] = missing
    return out
