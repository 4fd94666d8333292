"""The toy world's judge: a tiny open_clip model trained on toy renders.

It is loaded through open_clip exactly like a real CLIP (`create_model_and_transforms`
with a registered config and a checkpoint path), so the evaluator's CLIP metrics
run on it through the same code. The exact checks the toy world allows (colour
of the object's pixels, silhouette against the true geometry) live here too.
"""

from __future__ import annotations

import colorsys
import functools
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from piva.io import atomic_write_json
from piva.metrics.evaluate import ImageTextModel
from piva.toyworld.scenes import BACKGROUND, COLORS

JUDGE_NAME = "piva-toy-judge"
JUDGE_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 96, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
WEIGHTS = Path(__file__).resolve().parent / "weights"


def register_judge_config(directory: Optional[Path] = None) -> None:
    import open_clip

    directory = Path(directory or WEIGHTS / "judge")
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / f"{JUDGE_NAME}.json"
    if not cfg.is_file():  # atomic: another process may register (and read) it at the same time
        atomic_write_json(cfg, JUDGE_CONFIG)
    open_clip.add_model_config(cfg)


def create_judge(pretrained: Optional[Union[str, Path]] = None):
    """(model, preprocess, tokenizer) via open_clip; `pretrained` defaults to the committed weights.

    Built once per process for each weights file (a rewritten file is loaded again): every edit of a run
    is judged, and the model is shared, in eval mode and frozen, by all who ask for it."""
    path = Path(pretrained) if pretrained else WEIGHTS / "judge" / "open_clip_model.safetensors"
    if pretrained is None and not path.is_file():
        raise FileNotFoundError(f"judge weights {path} missing: run scripts/train_toy_prior.py")
    key = (str(path.absolute()),) + ((path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else ())
    return _build_judge(key)


@functools.lru_cache(maxsize=4)
def _build_judge(key: tuple):
    import open_clip

    register_judge_config()
    path = key[0] if len(key) > 1 else None  # no file: an untrained judge, as open_clip builds it
    model, _, preprocess = open_clip.create_model_and_transforms(JUDGE_NAME, pretrained=path)
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(JUDGE_NAME)


def load_toy_judge(created: Optional[tuple] = None) -> ImageTextModel:
    """The judge behind the evaluator's CLIP interface, labelled so no figure passes for CLIP's.

    `created`: what `create_judge()` returned, to share one loaded judge with the exact figures."""
    judge, _, tok = created if created is not None else create_judge()

    @torch.no_grad()
    def images(rgb: torch.Tensor) -> torch.Tensor:
        return judge.encode_image(normalize(rgb.float())).float()

    @torch.no_grad()
    def texts(captions: Sequence[str]) -> torch.Tensor:
        return judge.encode_text(tok(list(captions))).float()

    return ImageTextModel("toy-world judge (tiny open_clip trained on toy renders; NOT CLIP)", images, texts, False)


def normalize(rgb: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[0,1] images -> CLIP input: bicubic resize (no crop), OpenAI mean/std (the IN2N protocol)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=rgb.device).view(1, 3, 1, 1)
    if rgb.shape[-1] != size or rgb.shape[-2] != size:
        rgb = F.interpolate(rgb, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (rgb - mean) / std


@torch.no_grad()
def classify(model, tokenizer, rgb: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Probabilities [N, len(captions)] that each image shows each caption."""
    img = F.normalize(model.encode_image(normalize(rgb.float())), dim=-1)
    txt = F.normalize(model.encode_text(tokenizer(list(captions))), dim=-1)
    return (model.logit_scale.exp() * img @ txt.T).softmax(-1)


def train_judge(data: dict, steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0, progress=True):
    """Train image->caption over the whole caption set (every other caption is a negative)."""
    from tqdm.auto import tqdm

    register_judge_config()
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(JUDGE_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(JUDGE_NAME)
    tokens = tokenizer(data["captions"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / max(1, steps // 10)) * 0.5 * (1 + np.cos(np.pi * i / steps))
    )
    g = torch.Generator().manual_seed(seed)
    n = data["rgb"].shape[0]
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    model.train()
    for _ in bar:
        i = torch.randint(0, n, (batch,), generator=g)
        x = data["rgb"][i]
        # light augmentation: brightness jitter and small shifts keep it from memorising pixels
        x = (x * (0.9 + 0.2 * torch.rand(batch, 1, 1, 1, generator=g))).clamp(0, 1)
        shift = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        img = F.normalize(model.encode_image(normalize(x)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        loss = F.cross_entropy(logits, data["caption_index"][i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------- exact checks
HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLORS.items()}


def object_hue_fraction(rgb: torch.Tensor, mask: torch.Tensor, color: str, tol: float = 0.06) -> torch.Tensor:
    """Fraction of the saturated pixels inside `mask` whose hue is within `tol` of `color`'s hue."""
    arr = rgb.permute(0, 2, 3, 1).cpu().numpy()
    hsv = _rgb_to_hsv(arr)
    m = mask[:, 0].cpu().numpy() > 0.5
    sat = (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.15) & m
    d = np.abs(hsv[..., 0] - HUES[color])
    d = np.minimum(d, 1 - d)
    hits = (d < tol) & sat
    out = hits.reshape(len(arr), -1).sum(1) / np.maximum(sat.reshape(len(arr), -1).sum(1), 1)
    return torch.from_numpy(out).float()


def dominant_color(rgb: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The toy colour whose hue is nearest the circular mean hue of the saturated object pixels."""
    hsv = _rgb_to_hsv(rgb.permute(0, 2, 3, 1).cpu().numpy())
    m = mask[:, 0].cpu().numpy() > 0.5
    names = list(HUES)
    ref = np.array([HUES[c] for c in names]) * 2 * np.pi
    out = []
    for h, s, v, mm in zip(hsv[..., 0], hsv[..., 1], hsv[..., 2], m):
        sel = mm & (s > 0.35) & (v > 0.15)
        if sel.sum() == 0:
            out.append("none")
            continue
        ang = h[sel] * 2 * np.pi
        mean = np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())
        dist = np.abs(np.angle(np.exp(1j * (ref - mean))))
        out.append(names[int(dist.argmin())])
    return out


def silhouette(rgb: torch.Tensor, threshold: float = 0.06) -> torch.Tensor:
    """Pixels that differ from the flat background: the visible silhouette of an image."""
    return ((rgb - BACKGROUND).abs().amax(1, keepdim=True) > threshold).float()


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a > 0.5, b > 0.5
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float().clamp_min(1)
    return inter / union


_RGB_TO_HSV = np.vectorize(colorsys.rgb_to_hsv, otypes=[float, float, float])


def _rgb_to_hsv(arr: np.ndarray) -> np.ndarray:
    """[..., 3] RGB in [0,1] -> [..., 3] HSV by the standard library's definition, the one HUES uses
    (toy images are a few thousand pixels, so the per-pixel call costs milliseconds)."""
    return np.stack(_RGB_TO_HSV(arr[..., 0], arr[..., 1], arr[..., 2]), -1)
