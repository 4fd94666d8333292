"""threestudio's renders in, `piva.guidance` out: the channels-last glue (no threestudio needed).

threestudio hands renders around channels-last ([B,H,W,3]) with an unnormalised depth
(sum of weight * distance) and an opacity; `piva.guidance` wants channels-first images in
[0,1] and a depth where background is inf. `ChannelsLastGuidance` converts, calls
`ScoreDistillation.step` / `update_adapters` and returns threestudio-style dicts; none of
the method's math lives here.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.prior import DEFAULT_CONTROLNET, DEFAULT_MODEL, DiffusionPrior
from piva.threestudio.config import GuidanceSettings, guidance_config, needs_original, settings_dict


def channels_first(rgb: torch.Tensor, what: str = "render") -> torch.Tensor:
    """threestudio's [B,H,W,3] -> piva's [B,3,H,W] (contiguous, so convolutions see the usual layout)."""
    if not isinstance(rgb, torch.Tensor) or rgb.dim() != 4 or rgb.shape[-1] != 3:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"{what} must be threestudio's channels-last [B,H,W,3], got {shape}")
    return rgb.permute(0, 3, 1, 2).contiguous()


def depth_for_control(
    depth: torch.Tensor, opacity: Optional[torch.Tensor] = None, min_opacity: float = 0.5
) -> torch.Tensor:
    """threestudio depth [B,H,W,1] (+ opacity) -> [B,1,H,W] with inf on background.

    threestudio's volume renderers return sum(weight * t), which is not divided by
    the opacity: a half-transparent pixel reads twice as near. Dividing by the
    opacity gives the surface distance; pixels below `min_opacity` are background
    (inf), which `piva.guidance.depth_to_control` paints black as depth ControlNets expect.
    """
    if depth.dim() != 4 or depth.shape[-1] != 1:
        raise ValueError(f"depth must be threestudio's [B,H,W,1], got {tuple(depth.shape)}")
    d = depth.detach().float()
    if opacity is not None:
        if opacity.shape != depth.shape:
            raise ValueError(f"opacity {tuple(opacity.shape)} does not match depth {tuple(depth.shape)}")
        a = opacity.detach().float()
        d = torch.where(a >= min_opacity, d / a.clamp_min(1e-6), torch.full_like(d, float("inf")))
    return d.permute(0, 3, 1, 2).contiguous()


# -- the guidance, channels-last -------------------------------------------------


class ChannelsLastGuidance:
    """`ScoreDistillation` for threestudio's renders: converts inputs, returns threestudio-style dicts.

    Everything that is the method (scores, schedule, adapters) stays in `self.distillation`.
    """

    def __init__(self, distillation: ScoreDistillation, min_opacity: float = 0.5) -> None:
        self.distillation = distillation
        self.min_opacity = min_opacity

    @classmethod
    def from_settings(
        cls,
        settings: Union[GuidanceSettings, Mapping[str, Any], Any],
        device: Optional[Union[str, torch.device]] = None,
        prior: Optional[DiffusionPrior] = None,
    ) -> "ChannelsLastGuidance":
        """Validate the settings, then load the diffusion model (and the ControlNet for PiVa) and build the guidance."""
        raw = settings_dict(settings)
        config = guidance_config(raw)
        if prior is None:
            wants_controlnet = config.mode == "piva" and config.use_controlnet
            prior = DiffusionPrior.from_pretrained(
                raw.get("pretrained_model_name_or_path", DEFAULT_MODEL),
                controlnet=raw.get("controlnet_name_or_path", DEFAULT_CONTROLNET) if wants_controlnet else None,
                device=device,
                dtype=raw.get("dtype"),  # a name; None: fp32 on CPU, bf16/fp16 on GPU
            )
        return cls(ScoreDistillation(prior, config), min_opacity=float(raw.get("min_opacity", 0.5)))

    @property
    def config(self) -> GuidanceConfig:
        return self.distillation.config

    @property
    def loss_name(self) -> str:
        """`loss_piva`, `loss_dds` or `loss_sds`: threestudio systems weight it by `system.loss.lambda_<mode>`."""
        return f"loss_{self.config.mode}"

    @property
    def needs_original(self) -> bool:
        return needs_original(self.config)

    def image(self, rgb: torch.Tensor, what: str = "render") -> torch.Tensor:
        x = self.distillation.fit_to_model(channels_first(rgb, what))
        return x.clamp(0, 1)  # volume rendering can overshoot 1 by rounding; clamp keeps in-range gradients

    def depth(self, depth: Optional[torch.Tensor], opacity: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if depth is None:
            return None
        d = depth_for_control(depth, opacity, self.min_opacity)
        return self.distillation.fit_to_model(d, mode="nearest")

    def __call__(
        self,
        rgb: torch.Tensor,
        *,
        depth: Optional[torch.Tensor] = None,
        opacity: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        step: int = 0,
        generator: Optional[torch.Generator] = None,
        t: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """One score-distillation step on a channels-last render; the loss backpropagates into it."""
        true_source = self.config.uses_source_latent
        if true_source and source_rgb is None:
            raise ValueError(f"{self.config.mode} with same_latent=false needs the original scene's render (source_rgb)")
        src = self.image(source_rgb.detach(), "original render") if true_source else None
        out = self.distillation.step(
            self.image(rgb),
            depth=self.depth(depth, opacity),
            source_rgb=src,
            step=step,
            generator=generator,
            t=t,
            noise=noise,
        )
        extra = {k: v for k, v in out.diagnostics.items() if k not in ("grad_norm", "t")}
        return {self.loss_name: out.loss, "grad_norm": out.grad.norm(), "timestep": out.t, **extra}

    def update_adapters(
        self,
        rgb: torch.Tensor,
        *,
        depth: Optional[torch.Tensor] = None,
        opacity: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        source_depth: Optional[torch.Tensor] = None,
        source_opacity: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """PiVa's adapter step (eq. 7, 8) on the current and the original render; {} for SDS/DDS."""
        if self.distillation.adapters is None:
            return {}
        if source_rgb is None:
            raise ValueError("PiVa's adapter update needs the original scene's render (source_rgb)")
        return self.distillation.update_adapters(
            self.image(rgb.detach()),
            depth=self.depth(depth, opacity),
            source_rgb=self.image(source_rgb.detach(), "original render"),
            source_depth=self.depth(source_depth, source_opacity),
            generator=generator,
        )

    # -- checkpoints: the adapters are not threestudio modules, so they travel by hand --
    def adapter_state(self) -> Optional[dict]:
        """Both adapters' weights and optimizer state, or None without adapters."""
        a = self.distillation.adapters
        return None if a is None else a.state()

    def load_adapter_state(self, state: Mapping[str, Any]) -> None:
        a = self.distillation.adapters
        if a is None:
            raise ValueError("this checkpoint holds PiVa adapters but the guidance mode has none: resume with mode=piva")
        a.load_state(dict(state))
