"""splatfacto that also runs on CPU: piva's own rasteriser where gsplat's CUDA kernels are missing.

On a GPU this is splatfacto unchanged (`get_outputs` is nerfstudio's, gsplat's kernels). On CPU,
`get_outputs` projects with gsplat's pure-torch reference and composites with
`piva.nerfstudio.splat_cpu` (toy sizes: each pixel against the Gaussians that reach it), and hands
splatfacto's densification strategy the same `info` gsplat would (2D means with their
gradient, radii, image size). gsplat's "absgrad" needs its CUDA backward, so on CPU the
strategy uses the plain 2D-mean gradient (`use_absgrad` off, with gsplat's default threshold
for it, 2e-4). No gsplat or nerfstudio file is changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import SplatfactoModel, SplatfactoModelConfig

from piva.nerfstudio import splat_cpu
from piva.nerfstudio.piva_model import offline_safe_lpips

CPU_DENSIFY_GRAD_THRESH = 2e-4
"""gsplat's DefaultStrategy default for the plain (not absolute) 2D-mean gradient."""


@dataclass
class PivaSplatfactoModelConfig(SplatfactoModelConfig):
    """splatfacto, runnable on CPU, with an optional fixed backdrop (the toy world's grey, a Noe object's white)."""

    _target: Type = field(default_factory=lambda: PivaSplatfactoModel)
    backdrop_rgb: Optional[Tuple[float, float, float]] = None
    """Fixed colour behind the splats (None: splatfacto's `background_color`)."""
    rasterize_mode: Literal["classic", "antialiased"] = "antialiased"
    """splatfacto's option, antialiased here: an edit draws the scene below its capture's resolution (the views
    the diffusion model sees), where classic splats swell (docs/toyworld.md#splats). An edit of a scene always
    draws it the way the scene was trained: `ns-train piva-splat` takes the mode from the source run's config.yml."""
    edit_growth_limit: float = 2.0
    """An edit ends with at most this many times the Gaussians it started with: refinement then grows only the
    Gaussians with the largest gradients, as many as the budget has left (default 2.0). Without it the score's
    gradients pass splatfacto's threshold almost everywhere (docs/toyworld.md#splats)."""
    edit_geometry: Optional[bool] = True
    """Whether positions, shapes and opacities train and Gaussians are densified/pruned. An edit sets it by
    the method's rule (None: kept for a colour-only edit, so a recolour grows no Gaussians); a fit trains all."""


GEOMETRY = ("means", "scales", "quats", "opacities")


def trained_rasterize_mode(checkpoint: Path) -> Optional[str]:
    """The rasterize_mode a splatfacto run was trained with, from the config.yml beside its nerfstudio_models
    folder (None: no config there, or no such field). Read as text: the run's classes need not import here."""
    config = Path(checkpoint).parent.parent / "config.yml"
    if not config.is_file():
        return None
    found = re.search(r"^\s*rasterize_mode:\s*['\"]?(classic|antialiased)", config.read_text(), re.MULTILINE)
    return found.group(1) if found else None


class _NoDensification:
    """Stands in for splatfacto's strategy while nothing may densify (frozen geometry, renders without grad)."""

    absgrad = False

    def step_pre_backward(self, *args, **kwargs) -> None:
        pass

    def step_post_backward(self, *args, **kwargs) -> None:
        pass


def viewmat_from_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """nerfstudio camera-to-world [B,3,4] (OpenGL axes) -> gsplat world-to-camera [B,4,4] (OpenCV axes)."""
    R = c2w[:, :3, :3] * torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype, device=c2w.device)
    t = c2w[:, :3, 3:4]
    view = torch.zeros(c2w.shape[0], 4, 4, dtype=c2w.dtype, device=c2w.device)
    view[:, :3, :3] = R.transpose(1, 2)
    view[:, :3, 3:4] = -R.transpose(1, 2) @ t
    view[:, 3, 3] = 1.0
    return view


class PivaSplatfactoModel(SplatfactoModel):
    config: PivaSplatfactoModelConfig

    gaussians_at_edit_start: Optional[int] = None
    """The count an edit started with (kept in the edit's checkpoints, so a resumed edit keeps its budget)."""

    def populate_modules(self) -> None:
        if not torch.cuda.is_available() and self.config.use_absgrad:
            self.config.use_absgrad = False
            self.config.densify_grad_thresh = CPU_DENSIFY_GRAD_THRESH
        with offline_safe_lpips():  # splatfacto builds torchmetrics' LPIPS, which downloads AlexNet
            super().populate_modules()

    def _get_background_color(self) -> torch.Tensor:
        if self.config.backdrop_rgb is not None:
            return torch.tensor(self.config.backdrop_rgb, dtype=torch.float32, device=self.device)
        return super()._get_background_color()

    @property
    def geometry_trains(self) -> bool:
        return self.config.edit_geometry is not False

    def get_outputs(self, camera: Cameras) -> Dict[str, torch.Tensor]:
        for name in GEOMETRY:
            self.gauss_params[name].requires_grad_(self.geometry_trains)
        # Densification reads the 2D means' gradient: none without grad or with the geometry frozen.
        quiet = not (torch.is_grad_enabled() and self.geometry_trains)
        strategy = self.strategy
        if quiet:
            self.strategy = _NoDensification()
        try:
            return super().get_outputs(camera) if self.means.is_cuda else self._cpu_outputs(camera)
        finally:
            self.strategy = strategy

    def step_post_backward(self, step: int) -> None:
        means2d = self.info.get("means2d") if isinstance(getattr(self, "info", None), dict) else None
        if not (self.geometry_trains and means2d is not None and means2d.grad is not None):
            return
        edit_step = getattr(self, "edit_step", None)  # set by PivaPipeline at each edit step; None in a fit
        if edit_step is None:
            return super().step_post_backward(step)
        self._refine_during_edit(edit_step)

    def _refine_during_edit(self, edit_step: int) -> None:
        """splatfacto's refinement on the edit's own clock: warm-up and refinement steps count from the edit's
        first step (a source fitted for 30 000 steps is past splatfacto's stop_split_at, so its edit would
        otherwise never grow a Gaussian), no opacity reset (it would blank the scene mid-edit), no splits for
        screen size alone, and growth within `edit_growth_limit`."""
        if self.gaussians_at_edit_start is None:
            self.gaussians_at_edit_start = self.num_points
        strategy = self.strategy
        saved = (strategy.grow_grad2d, strategy.reset_every, strategy.refine_scale2d_stop_iter)
        strategy.reset_every, strategy.refine_scale2d_stop_iter = 1 << 62, 0
        if edit_step > strategy.refine_start_iter and edit_step % strategy.refine_every == 0:
            budget = int(self.config.edit_growth_limit * self.gaussians_at_edit_start) - self.num_points
            seen = self.strategy_state.get("grad2d")
            if budget <= 0 or seen is None:  # nothing gathered yet: a resume that lands on a refinement step
                strategy.grow_grad2d = float("inf")
            else:
                grads = seen / self.strategy_state["count"].clamp_min(1)
                if int((grads > strategy.grow_grad2d).sum()) > budget:  # each grown Gaussian adds one
                    strategy.grow_grad2d = float(torch.topk(grads, budget + 1).values[-1])
        try:
            strategy.step_post_backward(params=self.gauss_params, optimizers=self.optimizers, state=self.strategy_state,
                                        step=edit_step, info=self.info, packed=False)
        finally:
            strategy.grow_grad2d, strategy.reset_every, strategy.refine_scale2d_stop_iter = saved

    def _cpu_outputs(self, camera: Cameras) -> Dict[str, torch.Tensor]:
        if camera.shape[0] != 1:
            raise ValueError("piva's CPU splat renderer draws one camera at a time")
        c2w = self.camera_optimizer.apply_to_camera(camera) if self.training else camera.camera_to_worlds
        scale = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / scale)
        K = camera.get_intrinsics_matrices()[0].to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(scale)
        self.last_size = (H, W)
        viewmat = viewmat_from_c2w(c2w.to(self.device))[0]

        features = torch.cat((self.features_dc[:, None, :], self.features_rest), dim=1)  # [N,K,3]
        if self.config.sh_degree > 0:
            from gsplat.cuda._torch_impl import _spherical_harmonics

            degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
            centre = torch.linalg.inv(viewmat)[:3, 3]
            colors = torch.clamp_min(_spherical_harmonics(degree, self.means - centre, features) + 0.5, 0.0)
        else:
            colors = torch.sigmoid(features[:, 0])
        out = splat_cpu.rasterize(self.means, self.quats, torch.exp(self.scales), torch.sigmoid(self.opacities).squeeze(-1),
                                  colors, viewmat, K, W, H, antialiased=self.config.rasterize_mode == "antialiased")
        self.info = {"means2d": out["means2d_batched"], "radii": out["radii"][None], "width": W, "height": H,
                     "n_cameras": 1, "gaussian_ids": None}
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step, self.info)
        background = self._get_background_color()
        alpha = out["alpha"]
        rgb = torch.clamp(out["rgb"] + (1 - alpha) * background, 0.0, 1.0)
        depth = torch.where(alpha > 0, out["depth"], out["depth"].detach().max())
        if not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb, "depth": depth, "accumulation": alpha, "background": background}
