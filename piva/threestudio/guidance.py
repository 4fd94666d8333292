"""`piva-guidance`: SDS / DDS / PiVa for threestudio, a thin shell over `piva.guidance`.

    guidance_type: piva-guidance
    guidance: {mode: piva, source_prompt: ..., target_prompt: ..., identity_weight: 0.4}

It is called like threestudio's own guidances, `guidance(rgb, prompt_utils, **batch)`
with rgb [B,H,W,3], and returns `{"loss_<mode>": ..., "grad_norm": ...}`. The prompts
come from this config, not from `prompt_utils` (accepted for the call signature only):
PiVa edits without view-dependent prompting. In `sds` mode it also works inside
threestudio's own systems (e.g. dreamfusion-system); DDS and PiVa need the original
scene's render and run in `piva-edit-system`.
"""

from __future__ import annotations

from piva.threestudio.config import require_threestudio

require_threestudio("piva.threestudio.guidance")

from dataclasses import dataclass  # noqa: E402
from typing import Any, Optional  # noqa: E402

import threestudio  # noqa: E402
import torch  # noqa: E402
from threestudio.utils.base import BaseObject  # noqa: E402

from piva.threestudio.config import GUIDANCE_NAME, GuidanceSettings  # noqa: E402
from piva.threestudio.glue import ChannelsLastGuidance  # noqa: E402


@threestudio.register(GUIDANCE_NAME)
class PivaGuidance(BaseObject):
    @dataclass
    class Config(GuidanceSettings, BaseObject.Config):
        pass

    cfg: Config

    def configure(self) -> None:
        threestudio.info(f"[piva] loading {self.cfg.pretrained_model_name_or_path} for {self.cfg.mode}")
        self.core = ChannelsLastGuidance.from_settings(self.cfg, device=self.device)
        self.global_step = 0

    @property
    def needs_original(self) -> bool:
        return self.core.needs_original

    @property
    def loss_name(self) -> str:
        return self.core.loss_name

    def __call__(
        self,
        rgb: torch.Tensor,
        prompt_utils: Any = None,
        elevation: Optional[torch.Tensor] = None,
        azimuth: Optional[torch.Tensor] = None,
        camera_distances: Optional[torch.Tensor] = None,
        depth: Optional[torch.Tensor] = None,
        opacity: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        rgb_as_latents: bool = False,
        **kwargs: Any,
    ) -> dict:
        """The score-distillation loss of a [B,H,W,3] render; cameras and prompt_utils are not used."""
        if rgb_as_latents:
            raise ValueError("piva-guidance scores RGB renders; latent renders (rgb_as_latents=True) are not supported")
        return self.core(rgb, depth=depth, opacity=opacity, source_rgb=source_rgb, step=self.global_step)

    def update_adapters(
        self,
        rgb: torch.Tensor,
        depth: Optional[torch.Tensor] = None,
        opacity: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        source_depth: Optional[torch.Tensor] = None,
        source_opacity: Optional[torch.Tensor] = None,
    ) -> dict:
        """PiVa's adapter step with piva's own optimizer (not threestudio's); {} for SDS/DDS."""
        return self.core.update_adapters(
            rgb, depth=depth, opacity=opacity, source_rgb=source_rgb, source_depth=source_depth, source_opacity=source_opacity
        )

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        # The timestep annealing counts threestudio's steps.
        self.global_step = global_step
