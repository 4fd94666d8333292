"""The editing loop: render a whole view, score it with piva.guidance, push the gradient into the field.

All of the method lives in `piva.guidance`; this file only renders, resizes and
bookkeeps. Whole views are rendered in two passes so memory does not grow with the
image: a no-grad render feeds the guidance, then the image gradient is pushed back
chunk by chunk (each chunk re-rendered with grad and backpropagated at once).

The source adapter needs the ORIGINAL scene. We cache the original field's renders
(RGB and depth) of every training camera once, before the first edit step, instead
of keeping a frozen second field: it costs one pass over the cameras, no second
field in GPU memory, and the cache travels in the checkpoint, so a resumed run still
knows what the scene looked like before the edit. Renders (not the captured photos)
are used on purpose: the source adapter must model the original scene *as rendered*,
with the same blur as the edited renders, so that the regulariser measures the edit
and not the gap between a NeRF and a photo. They are also kept beside the source run
(`cache_original_renders`), so further edits of the same scene skip that pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from piva.guidance import GuidanceConfig, ScoreDistillation
from piva.guidance.prompts import is_colour_only_edit
from piva.io import atomic_torch_save
from piva.prior import DEFAULT_CONTROLNET, DEFAULT_MODEL, DiffusionPrior

STATE_PREFIX = "piva."
ORIGINAL_RENDERS_DIR = "piva_original_renders"
"""Folder, beside a source run's nerfstudio_models, of its renders at edits' training cameras."""
# Model fields that change what an edit trains, never how a checkpoint renders: edits that differ only in
# these (a colour edit and a shape edit of one scene) share the cached original renders.
_TRAIN_ONLY_MODEL_FIELDS = ("edit_geometry", "edit_grid_levels", "geometry_only_growth", "edit_grid_levels_until",
                            "separate_mlp_group")


def edit_start_step(pipeline_state: Mapping[str, Any]) -> Optional[int]:
    """The trainer step a piva edit started from, read from a checkpoint's pipeline state (None: not a piva edit)."""
    meta = pipeline_state.get(STATE_PREFIX + "meta")
    return None if meta is None else meta.get("edit_start_step")


def opacity_entropy(accumulation: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Mean binary entropy (nats) of per-ray opacities in [0, 1]: 0 for empty or opaque rays, log 2 at 0.5."""
    a = accumulation.float().clamp(eps, 1 - eps)
    return -(a * a.log() + (1 - a) * (1 - a).log()).mean()


def _nerfstudio_guidance() -> GuidanceConfig:
    """The method's score settings for captured scenes; each knob is declared once, in GuidanceConfig.

    Differences from GuidanceConfig's defaults, by use: lambda 0.2 (the paper's real-scene value);
    the timestep range anneals after 2000 edit steps; DDS uses the true latent of the original view,
    which the pipeline has cached anyway (the paper's shared z_t does not stop at the target in the
    toy world, docs/toyworld.md#dds-on-the-true-source-latent; `--pipeline.guidance.same-latent True` restores it)."""
    return GuidanceConfig(identity_weight=0.2, anneal_step=2000, same_latent=False)


@dataclass
class PivaPipelineConfig(VanillaPipelineConfig):
    _target: Type = field(default_factory=lambda: PivaPipeline)
    guidance: GuidanceConfig = field(default_factory=_nerfstudio_guidance)
    """The score: prompts, mode (piva/dds/sds), lambda, CFG scales, adapters, timesteps."""
    diffusion_model: str = DEFAULT_MODEL
    """Base text-to-image model: hub id or local diffusers folder."""
    controlnet_model: str = DEFAULT_CONTROLNET
    """Depth ControlNet for the adapters: hub id or local folder (piva only)."""
    diffusion_dtype: Optional[str] = None
    """float32, float16 or bfloat16 (default: fp32 on CPU, bf16/fp16 on GPU)."""
    render_short_side: int = 512
    """Short side of the rendered views fed to the diffusion model."""
    rays_per_chunk: int = 1 << 14
    """Rays rendered (and backpropagated) at once; lower it to save memory."""
    depth_far: float = float("inf")
    """Depths beyond this count as background for the depth ControlNet (so do pixels with opacity < 0.5)."""
    seed: Optional[int] = None
    """Seed of camera, timestep and noise sampling, and of the renders' sample jitter. None: the run's
    `--machine.seed`, so that one seed sets every draw of a run (a benchmark seed is a different run)."""
    views_per_step: int = 1
    """Training views scored together in each edit step (default 1, the paper). The score's loss is a mean
    over them, so the scene moves by the views' average; the renders cost N times as much, the diffusion side
    less (docs/performance.md)."""
    opacity_entropy_weight: float = 0.0
    """Weight of a binary-entropy loss on the opacity of the field's own ray batch (geometry edits only):
    pushes each ray to empty or opaque, against the translucent shells and floaters that score
    distillation leaves when it changes a shape (0: off)."""

    cache_original_renders: bool = True
    """Keep the original scene's renders (RGB and depth of every training camera) in
    `piva_original_renders/` beside the source run's nerfstudio_models, keyed by the checkpoint file, the
    cameras and the render settings: a further edit of the same scene loads them instead of rendering
    again. False: render every time, write nothing."""

    reset_colour_after_growth: bool = True
    """When the target-only steps end, put the colour head (nerfacto's `mlp_head` and appearance embedding)
    back as captured; the grids keep the grown geometry and the mode's score then paints it. The growth
    phase's 10x steps saturate the object's colour further than the plain lr can bring back. Nerfacto fields
    only (docs/toyworld.md#the-colour-head-is-put-back-after-the-growth)."""

    @property
    def uses_controlnet(self) -> bool:
        return self.guidance.mode == "piva" and self.guidance.use_controlnet


class PivaPipeline(VanillaPipeline):
    config: PivaPipelineConfig

    def __init__(self, config: PivaPipelineConfig, device: str, test_mode: str = "val", **kwargs) -> None:
        if test_mode == "val":  # training: fail on bad prompts before any loading
            config.guidance.validate()
            if config.views_per_step < 1:
                raise ValueError("views_per_step must be >= 1 (1: one training view per edit step)")
        if getattr(config.model, "edit_geometry", False) is None:
            # The method's rule, so every front end gets it: a colour-only edit keeps the geometry.
            keep = is_colour_only_edit(config.guidance.source_prompt, config.guidance.target_prompt)
            config.model = dataclasses.replace(config.model, edit_geometry=not keep)
        if config.guidance.target_only_steps is None:
            # The method's rule: an edit that may change geometry first grows it with the target caption
            # alone, until the timesteps anneal; a colour-only edit needs no new geometry. Measured on
            # nerfacto fields only: splat edits keep 0 (10x splatfacto's opacity lr would be 0.5).
            from piva.nerfstudio.splat_model import PivaSplatfactoModelConfig

            grows = getattr(config.model, "edit_geometry", True) is not False and not isinstance(
                config.model, PivaSplatfactoModelConfig)
            config.guidance = dataclasses.replace(
                config.guidance, target_only_steps=(config.guidance.anneal_step or 0) if grows else 0)
        super().__init__(config, device, test_mode=test_mode, **kwargs)
        self.guidance: Optional[ScoreDistillation] = None
        self.original_rgb: Optional[torch.Tensor] = None  # [N,H,W,3] uint8, CPU
        self.original_depth: Optional[torch.Tensor] = None  # [N,H,W] float16, CPU
        self.edit_start_step: Optional[int] = None
        self.last_diagnostics: Dict[str, float] = {}
        self._pending_adapters: Optional[dict] = None
        self.captured_colour: Optional[list] = None  # the colour head before the growth phase (reset_colour_after_growth)
        self.source_checkpoint: Optional[Path] = None  # set by PivaTrainer when an edit starts from a source run

    # -- configuration ----------------------------------------------------------
    def fingerprint(self) -> dict:
        """What identifies the scene and the diffusion set-up a checkpoint belongs to."""
        cams = self.datamanager.train_dataparser_outputs.cameras
        poses = cams.camera_to_worlds.detach().cpu().double().numpy().round(4).tobytes()
        return {
            "num_cameras": len(cams),
            "poses_sha1": hashlib.sha1(poses).hexdigest(),
            "diffusion_model": self.config.diffusion_model,
            "controlnet_model": self.config.controlnet_model if self.config.uses_controlnet else "",
            "method": self.config.guidance.mode,
            "adapter_rank": self.config.guidance.adapter_rank,
            # Which parameters train decides the optimizer groups a resume must find.
            "edit_geometry": getattr(self.model.config, "edit_geometry", True),
            # How splats are drawn is part of the scene (a fresh edit takes the source run's mode).
            "rasterize_mode": getattr(self.model.config, "rasterize_mode", None),
        }

    # -- rendering --------------------------------------------------------------
    @property
    def renders_splats(self) -> bool:
        """Gaussian splats (splatfacto) rather than a field rendered ray by ray."""
        return hasattr(self.model, "gauss_params")

    def _camera(self, index: int):
        cams = self.datamanager.train_dataparser_outputs.cameras
        cam = cams[index : index + 1].to(self.device)
        short = min(int(cam.height.item()), int(cam.width.item()))
        cam.rescale_output_resolution(self.config.render_short_side / short)
        return cam, index

    def _render(self, camera, grad_rgb: Optional[torch.Tensor] = None, seed: int = 0,
                keep_graph: bool = False) -> Dict[str, torch.Tensor]:
        """Whole-view render in chunks. With `grad_rgb` [H,W,3], each chunk is re-rendered with
        grad and backpropagated at once, so memory stays at one chunk. Each chunk's sampling
        jitter is seeded, so the grad pass re-renders exactly the image that was scored.
        `keep_graph` (a NeRF view in one chunk): rendered once with grad, the graph returned as
        "rgb_graph" for the caller to backpropagate, which saves the second pass's forward."""
        cam, index = camera
        if self.renders_splats:  # whole views at once, with depth
            if grad_rgb is not None:
                self.model.get_outputs(cam)["rgb"].backward(grad_rgb)
                return {}
            with torch.no_grad():
                out = self.model.get_outputs(cam)
            return {"rgb": out["rgb"].clamp(0, 1), "depth": out["depth"][..., 0], "accumulation": out["accumulation"][..., 0]}
        bundle = cam.generate_rays(camera_indices=0, keep_shape=True)
        # The view's own appearance embedding, not camera 0's.
        bundle.camera_indices = torch.full_like(bundle.camera_indices, index)
        h, w = bundle.shape[:2]
        flat = bundle.flatten()
        rgb, depth, acc = [], [], []
        step = self.config.rays_per_chunk
        devices = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
        if keep_graph and grad_rgb is None and len(flat) <= step:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 7919)  # the seed of chunk 0: the same image as the two passes
                out = self.model(flat)
            return {"rgb": out["rgb"].detach().reshape(h, w, 3).clamp(0, 1), "depth": out["depth"].detach().reshape(h, w),
                    "accumulation": out["accumulation"].detach().reshape(h, w), "rgb_graph": out["rgb"]}
        for i in range(0, len(flat), step):
            chunk = flat[i : i + step]
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed * 7919 + i)
                if grad_rgb is None:
                    with torch.no_grad():
                        out = self.model(chunk)  # forward: applies the collider (near/far) first
                    rgb.append(out["rgb"])
                    depth.append(out["depth"])
                    acc.append(out["accumulation"])
                else:
                    out = self.model(chunk)
                    out["rgb"].backward(grad_rgb.reshape(-1, 3)[i : i + step])
        if grad_rgb is not None:
            return {}
        return {
            "rgb": torch.cat(rgb).reshape(h, w, 3).clamp(0, 1),
            "depth": torch.cat(depth).reshape(h, w),
            "accumulation": torch.cat(acc).reshape(h, w),
        }

    def _depth_for_control(self, depth: torch.Tensor, acc: Optional[torch.Tensor] = None) -> torch.Tensor:
        d = depth.float().clone()
        far = ~torch.isfinite(d) | (d > self.config.depth_far)
        if acc is not None:
            far |= acc < 0.5
        d[far] = float("inf")
        return d

    # -- set-up on the first edit step -----------------------------------------
    def _setup_guidance(self) -> None:
        controlnet = self.config.controlnet_model if self.config.uses_controlnet else None
        CONSOLE.print(f"[piva] loading {self.config.diffusion_model}" + (f" + {controlnet}" if controlnet else ""))
        prior = DiffusionPrior.from_pretrained(
            self.config.diffusion_model, controlnet=controlnet, device=self.device, dtype=self.config.diffusion_dtype
        )
        self.guidance = ScoreDistillation(prior, self.config.guidance)
        if self._pending_adapters is not None:
            if self.guidance.adapters is not None:
                self.guidance.adapters.load_state(self._pending_adapters)
            self._pending_adapters = None

    def original_renders_file(self) -> Optional[Path]:
        """Where the original renders of this edit's cameras are kept (None: no source checkpoint known, or off).
        The key covers what decides those pixels: the checkpoint file (path, size, time), every training
        camera, the render size, the depth cut-off and the model config except its train-only fields."""
        ckpt = self.source_checkpoint
        if ckpt is None or not self.config.cache_original_renders:
            return None
        ckpt = Path(ckpt).resolve()
        if not ckpt.is_file():
            return None
        stat = ckpt.stat()
        cams = self.datamanager.train_dataparser_outputs.cameras
        geometry = torch.cat([cams.camera_to_worlds.reshape(len(cams), -1), cams.fx, cams.fy, cams.cx, cams.cy,
                              cams.width.float(), cams.height.float()], dim=1)
        model = {f.name: repr(getattr(self.config.model, f.name)) for f in dataclasses.fields(self.config.model)
                 if f.name not in _TRAIN_ONLY_MODEL_FIELDS}
        key = {"version": 1, "checkpoint": [str(ckpt), stat.st_size, stat.st_mtime_ns],
               "cameras": hashlib.sha1(geometry.detach().cpu().double().numpy().round(5).tobytes()).hexdigest(),
               "render_short_side": self.config.render_short_side, "depth_far": repr(self.config.depth_far),
               "model": model, "device": torch.device(self.device).type}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return ckpt.parent.parent / ORIGINAL_RENDERS_DIR / f"{digest}.pt"

    @torch.no_grad()
    def _cache_original_renders(self) -> None:
        from tqdm.auto import tqdm

        kept = self.original_renders_file()
        if kept is not None and kept.is_file():
            try:
                renders = torch.load(kept, map_location="cpu")
                self.original_rgb, self.original_depth = renders["rgb"], renders["depth"]
                CONSOLE.print(f"[piva] the original scene's renders: {kept} (kept from an earlier edit)")
                return
            except Exception as exc:  # unreadable: render again and replace it
                CONSOLE.print(f"[piva] cannot read {kept} ({type(exc).__name__}): rendering the original scene again")
        n = len(self.datamanager.train_dataparser_outputs.cameras)
        rgbs, depths = [], []
        for i in tqdm(range(n), desc="[piva] rendering the original scene"):
            out = self._render(self._camera(i))
            rgbs.append((out["rgb"] * 255).round().to(torch.uint8).cpu())
            depths.append(self._depth_for_control(out["depth"], out["accumulation"]).half().cpu())
        shapes = {tuple(r.shape) for r in rgbs}
        if len(shapes) != 1:
            raise ValueError(f"training images of different sizes {sorted(shapes)}: piva needs one image size per scene")
        self.original_rgb, self.original_depth = torch.stack(rgbs), torch.stack(depths)
        if kept is not None:
            try:
                atomic_torch_save({"rgb": self.original_rgb, "depth": self.original_depth}, kept)
            except OSError as exc:  # a read-only source run: the edit goes on, the next one renders again
                CONSOLE.print(f"[piva] could not keep the original renders in {kept.parent} ({exc.strerror})")

    @torch.no_grad()
    def _reset_colour(self, edit_step: int) -> None:
        """reset_colour_after_growth: keep the colour head at the first edit step, put it back at the end of growth."""
        growth = self.config.guidance.target_only_steps or 0
        if not (self.config.reset_colour_after_growth and growth > 0 and hasattr(self.model, "colour_parameters")):
            return
        if edit_step == 0 and self.captured_colour is None:
            self.captured_colour = [p.detach().clone() for p in self.model.colour_parameters()]
        elif edit_step == growth and self.captured_colour is not None:
            for p, kept in zip(self.model.colour_parameters(), self.captured_colour):
                p.copy_(kept.to(p.device))
            self.captured_colour = None
            CONSOLE.print(f"[piva] edit step {edit_step}: growth phase over, colour head reset to the captured one")

    # -- the training step ------------------------------------------------------
    def get_train_loss_dict(self, step: int):
        if self.guidance is None:
            self._setup_guidance()
        if self.original_rgb is None:
            self._cache_original_renders()
        if self.edit_start_step is None:
            self.edit_start_step = step
        edit_step = step - self.edit_start_step
        self.model.edit_step = edit_step
        self.model.growing = edit_step < (self.config.guidance.target_only_steps or 0)
        self._reset_colour(edit_step)
        seed = self.config.seed or 0  # None outside a trainer (PivaTrainer resolves it)
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**48)
        render_seed = (seed * 1_000_003 ** 2 + step) % 2**40  # view k: + k * 1_000_003

        # The field's own ray batch keeps the proposal networks tracking the edited density
        # (interlevel/distortion losses); the photometric loss is dropped: it would undo the edit.
        # With the geometry frozen there is no density to track; splats have no proposal networks.
        model_outputs, metrics_dict, loss_dict = {}, {}, {}
        if getattr(self.model.config, "edit_geometry", True) and not self.renders_splats:
            ray_bundle, batch = self.datamanager.next_train(step)
            model_outputs = self.model(ray_bundle)
            metrics_dict = self.model.get_metrics_dict(model_outputs, batch)
            losses = self.model.get_loss_dict(model_outputs, batch, metrics_dict)
            loss_dict = {k: v for k, v in losses.items() if k != "rgb_loss"}
            if self.config.opacity_entropy_weight > 0:
                loss_dict["opacity_entropy"] = self.config.opacity_entropy_weight * opacity_entropy(
                    model_outputs["accumulation"])

        # views_per_step training views, scored in one batch; each is rendered (and backpropagated) on its own.
        indices = torch.randint(0, len(self.original_rgb), (self.config.views_per_step,), generator=g).tolist()
        cams = [self._camera(i) for i in indices]
        # Every view's graph kept while it is scored when all of them together fit in one chunk (toy sizes):
        # one forward a view instead of two, the same memory bound.
        keep = not self.renders_splats and len(cams) * int(cams[0][0].width.item()) * int(cams[0][0].height.item()) \
            <= self.config.rays_per_chunk
        currents = [self._render(cam, seed=render_seed + k * 1_000_003, keep_graph=keep) for k, cam in enumerate(cams)]
        x = torch.stack([c["rgb"].permute(2, 0, 1) for c in currents]).detach().requires_grad_(True)
        x_in = self.guidance.fit_to_model(x).clamp(0, 1)
        depth = self.guidance.fit_to_model(
            torch.stack([self._depth_for_control(c["depth"], c["accumulation"])[None] for c in currents]), "nearest")
        src_rgb = self.guidance.fit_to_model(self.original_rgb[indices].to(self.device).permute(0, 3, 1, 2).float() / 255)
        src_depth = self.guidance.fit_to_model(self.original_depth[indices].to(self.device).float()[:, None], "nearest")

        out = self.guidance.step(x_in, depth=depth, source_rgb=src_rgb, step=edit_step, generator=g)
        (grad_image,) = torch.autograd.grad(out.loss, x)
        diagnostics = out.diagnostics
        del out  # the score's graph goes before the adapters' update
        for k, cam in enumerate(cams):
            if "rgb_graph" in currents[k]:
                currents[k].pop("rgb_graph").backward(grad_image[k].permute(1, 2, 0).reshape(-1, 3))
            else:
                self._render(cam, grad_rgb=grad_image[k].permute(1, 2, 0).contiguous(), seed=render_seed + k * 1_000_003)
        adapter_losses = self.guidance.update_adapters(
            x_in.detach(), depth=depth, source_rgb=src_rgb, source_depth=src_depth, generator=g
        )
        self.last_diagnostics = {**diagnostics, **adapter_losses, "edit_step": edit_step, "camera": indices[0]}
        for k, v in self.last_diagnostics.items():
            metrics_dict[f"piva/{k}"] = float(v)
        if not loss_dict:  # the trainer backpropagates a sum of losses; ours already happened
            loss_dict["piva_done"] = torch.zeros((), device=self.device, requires_grad=True)
        return model_outputs, loss_dict, metrics_dict

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.original_rgb is not None:
            state[STATE_PREFIX + "original_rgb"] = self.original_rgb
            state[STATE_PREFIX + "original_depth"] = self.original_depth
        if self.captured_colour is not None:  # a run resumed inside the growth phase still resets the colour
            state[STATE_PREFIX + "captured_colour"] = self.captured_colour
        meta = {**self.fingerprint(), "edit_start_step": self.edit_start_step,
                "gaussians_at_edit_start": getattr(self.model, "gaussians_at_edit_start", None)}
        state[STATE_PREFIX + "meta"] = meta
        if self.guidance is not None and self.guidance.adapters is not None:
            state[STATE_PREFIX + "adapters"] = self.guidance.adapters.state()
        elif self._pending_adapters is not None:
            state[STATE_PREFIX + "adapters"] = self._pending_adapters
        return state

    def load_pipeline(self, loaded_state: Dict[str, Any], step: int) -> None:
        state = dict(loaded_state)
        piva = {k[len(STATE_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(STATE_PREFIX)}
        if "meta" in piva:
            self.check_compatible(piva["meta"])
            self.edit_start_step = piva["meta"].get("edit_start_step")
            if self.renders_splats:
                if piva["meta"].get("rasterize_mode"):
                    self.model.config.rasterize_mode = piva["meta"]["rasterize_mode"]
                self.model.gaussians_at_edit_start = piva["meta"].get("gaussians_at_edit_start")
        self.original_rgb = piva.get("original_rgb")
        self.original_depth = piva.get("original_depth")
        self.captured_colour = piva.get("captured_colour")
        if "adapters" in piva:
            if self.guidance is not None and self.guidance.adapters is not None:
                self.guidance.adapters.load_state(piva["adapters"])
            else:
                self._pending_adapters = piva["adapters"]
        try:
            super().load_pipeline(state, step)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = next((line.strip() for line in first if "size mismatch" in line), first[-1] if first else "")
            raise ValueError(f"checkpoint does not fit this model config (another scene or model?): {detail}") from None

    def check_compatible(self, meta: Mapping[str, Any]) -> None:
        mine = self.fingerprint()
        if meta.get("num_cameras") != mine["num_cameras"] or meta.get("poses_sha1") != mine["poses_sha1"]:
            raise ValueError(
                f"this piva checkpoint was made on another scene ({meta.get('num_cameras')} cameras, poses "
                f"{str(meta.get('poses_sha1'))[:8]}) than --data ({mine['num_cameras']} cameras, {mine['poses_sha1'][:8]})"
            )
        for key in ("diffusion_model", "controlnet_model", "method", "adapter_rank", "edit_geometry"):
            if key in meta and meta[key] != mine[key]:
                raise ValueError(
                    f"this piva checkpoint used {key}={meta[key]!r} but the config says {mine[key]!r}: "
                    "resume with the same settings or start a new edit from the nerfacto checkpoint"
                )

