"""2D image editing (paper section 5): the generator g is the identity, theta is the image latent."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from piva.data.images import save_image_grid
from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.io import atomic_write_json
from piva.prior import DiffusionPrior


@dataclass
class ImageEditConfig:
    steps: int = 1000
    """Optimisation steps (paper: 1000; most edits settle in 300-500)."""
    lr: float = 0.01
    """SGD learning rate on the latent, cosine-annealed to zero."""
    seed: int = 0
    snapshot_every: int = 0
    """Steps between images of the progress strip (0: 8 snapshots over the run)."""
    resolution: Optional[int] = None
    """Short side in pixels; None: the model's native resolution."""


def load_image(path: Union[str, Path], short_side: int, multiple: int) -> torch.Tensor:
    """Image file -> [1,3,H,W] in [0,1], short side resized and both sides cropped to `multiple`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except Exception as exc:  # PIL raises several types for non-images
        raise ValueError(f"{str(path)!r} is not a readable image ({exc})") from None
    w, h = img.size
    scale = short_side / min(w, h)
    w, h = max(multiple, round(w * scale)), max(multiple, round(h * scale))
    img = img.resize((w, h), Image.BICUBIC)
    cw, ch = w - w % multiple, h - h % multiple
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def edit_image(
    image: Union[str, Path, torch.Tensor],
    prior: DiffusionPrior,
    guidance: GuidanceConfig,
    out_dir: Union[str, Path],
    config: ImageEditConfig = ImageEditConfig(),
    progress: bool = True,
) -> dict:
    """Edit one image; writes edited.png, progress.png (strip) and run.json to `out_dir`.

    Ctrl-C stops early and still writes the latest result.
    """
    from tqdm.auto import tqdm

    guidance = replace(guidance, use_controlnet=False)  # 2D: LoRA on the UNet only (paper section 5)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = config.resolution or prior.resolution
    multiple = prior.vae_scale_factor * prior.latent_multiple
    source = load_image(image, size, multiple) if not isinstance(image, torch.Tensor) else image
    sd = ScoreDistillation(prior, guidance)
    source = sd.check_rgb(source.to(prior.device), "input image")

    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        z_src = prior.encode_images(source, generator).float()
    z = torch.nn.Parameter(z_src.clone())
    opt = torch.optim.SGD([z], lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.steps))
    every = config.snapshot_every or max(1, math.ceil(config.steps / 8))

    history: list[dict] = []
    snapshots = [source.detach().cpu()]  # [1,3,H,W] each: the progress strip, left to right
    record = {
        "input": str(image) if not isinstance(image, torch.Tensor) else "<tensor>",
        "guidance": sd.settings(),
        "edit": asdict(config),
        "device": str(prior.device),
        "steps_done": 0,
        "interrupted": False,
        "history": history,
    }

    def write_outputs() -> None:
        with torch.no_grad():
            result = prior.decode_latents(z.detach())
        # Each file is written atomically: a kill (or a second Ctrl-C) never leaves half of one.
        save_image_grid(out / "edited.png", [result])
        save_image_grid(out / "progress.png", [snapshots + [result]])
        atomic_write_json(out / "run.json", record)

    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"{guidance.mode} edit", disable=not progress)
    try:
        for i in bar:
            o = sd.step(latents=z, source_latents=z_src, step=i, generator=generator)
            opt.zero_grad(set_to_none=True)
            o.loss.backward()
            entry = {"step": i, **o.diagnostics, "lr": sched.get_last_lr()[0]}  # the rate this step uses
            opt.step()
            sched.step()
            entry.update(sd.update_adapters(latents=z.detach(), source_latents=z_src, generator=generator))
            entry["elapsed_s"] = round(time.perf_counter() - start, 4)  # the step's end (diagnostics synchronise)
            history.append(entry)
            record["steps_done"] = i + 1
            bar.set_postfix(t=o.t, grad=f"{o.diagnostics['grad_norm']:.3f}")
            if (i + 1) % every == 0 and i + 1 < config.steps:
                with torch.no_grad():
                    snapshots.append(prior.decode_latents(z.detach()).cpu())
    except KeyboardInterrupt:
        record["interrupted"] = True
    finally:
        record["seconds"] = round(time.perf_counter() - start, 3)
        write_outputs()
    return record
