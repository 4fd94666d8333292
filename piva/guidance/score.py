"""SDS, DDS (eq. 4) and PiVa (eq. 9) behind one `step()`, for any differentiable image generator."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from piva.guidance.adapters import BASE, SOURCE, TARGET, DualAdapters, depth_to_control
from piva.guidance.graphs import Captured, cuda_graphs_available
from piva.guidance.prompts import adds_to_source
from piva.guidance.schedule import AnnealedTimesteps, sds_weight
from piva.prior.loading import DiffusionPrior

Mode = Literal["piva", "dds", "sds"]
MODES = ("piva", "dds", "sds")

# Target-only CFG by rule (GuidanceConfig.target_only_guidance_scale): additions need a strong caption to
# grow new parts; a shape change at that strength saturates the object's colour (docs/toyworld.md).
ADDITION_CFG, RESHAPE_CFG = 7.5, 3.0

_EDITED, _ORIGINAL = "edited", "original"  # which noisy latent a row of the UNet batch reads

# The base model's rows for each form of the delta term: name -> (noisy latent, prompt, adapter route).
_ROWS = {
    "sds": {"target": (_EDITED, "target", BASE), "uncond": (_EDITED, "uncond", BASE)},
    # Same z_t in both branches: the unconditional terms of the two CFGs cancel exactly.
    "dds_same_latent": {"target": (_EDITED, "target", BASE), "source": (_EDITED, "source", BASE)},
    "dds": {
        "target": (_EDITED, "target", BASE),
        "uncond": (_EDITED, "uncond", BASE),
        "source": (_ORIGINAL, "source", BASE),
        "source_uncond": (_ORIGINAL, "uncond", BASE),
    },
}
# PiVa's identity term (eq. 9) on the edited z_t: psi = source adapter, phi = target adapter.
_ADAPTER_ROWS = {"psi": (_EDITED, "source", SOURCE), "phi": (_EDITED, "target", TARGET)}
_ADAPTER_UNCOND_ROWS = {"psi_uncond": (_EDITED, "uncond", SOURCE), "phi_uncond": (_EDITED, "uncond", TARGET)}


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _range(name: str, value) -> Tuple[float, float]:
    """A timestep range as a (low, high) tuple of floats with 0 <= low < high <= 1 (lists from YAML/CLI accepted)."""
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(v, bool) for v in value):
            raise TypeError
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: give two fractions of T, low and high, e.g. (0.02, 0.98)") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"{name}={value!r}: give 0 <= low < high <= 1 (fractions of T), e.g. (0.02, 0.98)")
    return lo, hi


def _cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


# The base model's term of the score, before w(t): eq. 2 (SDS) or eq. 4 (DDS).
_DELTA = {
    "sds": lambda e, s, noise: _cfg(e["target"], e["uncond"], s) - noise,
    "dds_same_latent": lambda e, s, noise: s * (e["target"] - e["source"]),
    "dds": lambda e, s, noise: _cfg(e["target"], e["uncond"], s) - _cfg(e["source"], e["source_uncond"], s),
}


@dataclass
class GuidanceConfig:
    mode: Mode = "piva"
    """piva (DDS + identity regulariser), dds (Delta Denoising Score) or sds (Score Distillation Sampling)."""
    source_prompt: str = ""
    """Describes the original scene/image (DDS and PiVa)."""
    target_prompt: str = ""
    """Describes the wanted result."""
    guidance_scale: Optional[float] = None
    """Classifier-free guidance of the frozen base model. None (default): the model's own recommendation
    (`DiffusionPrior.guidance_scale`: a `piva.json` in its folder), else the paper's 7.5. The toy prior
    recommends 3 (docs/toyworld.md#the-guidance-scale-belongs-to-the-model)."""
    adapter_guidance_scale: float = 1.0
    """Classifier-free guidance of the source/target adapters (1.0: conditional only, as in the paper)."""
    identity_weight: float = 0.4
    """lambda of eq. 9: weight of the identity-preserving regulariser (paper: 0.4 objects/2D, 0.2 real scenes)."""
    same_latent: Optional[bool] = None
    """Use the edited z_t in place of the original's in DDS (paper's trick). None: on for piva, off for dds."""
    t_range: Tuple[float, float] = (0.02, 0.98)
    """Timestep range (fraction of T) before annealing."""
    annealed_range: Tuple[float, float] = (0.02, 0.50)
    """Timestep range after `anneal_step`."""
    anneal_step: Optional[int] = None
    """Step at which the range anneals; None keeps `t_range` throughout."""
    noise_draws: int = 1
    """Noise samples averaged per step (same view, same t; default 1, the paper): a lower-variance update for
    the UNet rows, not the renders (docs/toyworld.md#what-failed)."""
    adapter_rank: int = 4
    """LoRA rank of each adapter."""
    adapter_lr: float = 1e-4
    """Learning rate of the adapters' own AdamW optimizer."""
    use_controlnet: bool = True
    """Condition the adapters on depth through the ControlNet (3D); 2D editing uses the UNet alone."""
    adapter_update_every: int = 1
    """Update the adapters at every k-th call (1: every step, as in the paper). Larger k costs less per step
    (score + update/k) and lets the target adapter lag the edit further behind."""
    adapter_target_from_score: bool = False
    """Train the target adapter on the score call's own noisy latent and timestep (the same z_t, noise and t
    as the step's phi row) instead of a fresh draw; the source adapter keeps its fresh draw. Off: the paper."""
    adapter_routing: Literal["fused", "peft"] = "fused"
    """How each row of a batch reaches its adapter: "fused" (both adapters' LoRA weights stacked, two batched
    matmuls a projection) or "peft" (peft's own mixed-batch forward: the same numbers with ~3x the operators
    per step; a reference, docs/performance.md)."""
    cuda_graphs: bool = False
    """Capture the score's UNet/ControlNet call and the adapters' update (forward, backward, AdamW) as CUDA
    graphs, once per render size, and replay them: the CPU no longer launches each of a step's ~15,000
    operators (docs/performance.md). CUDA only (elsewhere: one warning, eager); the first 4 steps of a
    size run eager and capture."""
    adapter_checkpointing: bool = False
    """Gradient checkpointing in the adapters' update: less activation memory for about a third more update compute."""
    encoder_checkpointing: bool = False
    """Gradient checkpointing in the VAE encoder, whose backward carries the score to the render's pixels: less
    activation memory for one more encoder forward (docs/performance.md)."""
    attention_slicing: bool = False
    """Attention computed in slices (diffusers' `set_attention_slice("auto")`) in the UNet and ControlNet: for
    GPUs or PyTorch builds without fused attention. With PyTorch's fused attention it saves nothing and costs
    time (docs/performance.md)."""
    target_only_steps: Optional[int] = None
    """Edit steps, from the first, scored by the target caption alone (SDS, no identity term) before the
    mode's own score takes over (the nerfstudio trainer steps the scene at a higher lr meanwhile:
    `target_only_lr_scales`): SDS grows new geometry that the caption difference of DDS/PiVa does not,
    and the mode's score then restores what must stay. None (default): the front end's rule (nerfstudio,
    nerfacto fields: `anneal_step` for edits that change geometry, 0 for colour-only ones); 0 elsewhere
    (images, splats, threestudio). See docs/toyworld.md#geometry-edits-grow-first-with-the-target-caption-alone."""
    target_only_guidance_scale: Optional[float] = None
    """Classifier-free guidance of the target-only steps. None (default): a rule on the prompts
    (`piva.guidance.prompts.adds_to_source`): 7.5 when the target only adds words to the source (an
    addition: "... on a white plate"), 3 otherwise (a shape change: "a red cube" -> "a red sphere").
    A number overrides the rule (docs/toyworld.md#the-growth-phases-guidance-scale-by-a-rule-on-the-prompts)."""
    pixel_gradient: Literal["encoder", "decoded"] = "encoder"
    """How the latent gradient reaches an RGB input: "encoder" (default, the paper: through the VAE encoder's
    Jacobian) or "decoded" (the latent step decoded by the VAE, D(z) - D(z - grad); docs/toyworld.md#what-failed)."""

    def __post_init__(self) -> None:
        """Bad values fail where the config is made (CLI, YAML, sweep), before any model loads; prompts are
        checked by `validate()` only, because front ends build the config first and fill them in later."""
        self.t_range, self.annealed_range = (_range(n, getattr(self, n)) for n in ("t_range", "annealed_range"))
        self.check_fields()

    def check_fields(self) -> None:
        """Every field but the prompts' contents: one ValueError line naming the field, the value and what to give."""
        if self.mode not in MODES:
            raise ValueError(f"unknown guidance mode {self.mode!r}: choose one of {', '.join(MODES)}")
        for name in ("t_range", "annealed_range"):
            _range(name, getattr(self, name))
        for name in ("source_prompt", "target_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} is not text: give the caption as a string")
        for name in ("guidance_scale", "adapter_guidance_scale", "target_only_guidance_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 1 <= value < math.inf):
                raise ValueError(f"{name}={value!r}: guidance scales must be >= 1 (1: conditional prediction only)")
        if not (_is_number(self.identity_weight) and 0 <= self.identity_weight < math.inf):
            raise ValueError(f"identity_weight={self.identity_weight!r}: lambda must be >= 0 (paper: 0.4 "
                             "objects, 0.2 real scenes; 0 turns the regulariser off)")
        if not (_is_number(self.adapter_lr) and 0 < self.adapter_lr < math.inf):
            raise ValueError(f"adapter_lr={self.adapter_lr!r}: give a learning rate > 0 (paper: 1e-4)")
        whole = {"adapter_rank": 1, "noise_draws": 1, "adapter_update_every": 1, "anneal_step": 0, "target_only_steps": 0}
        hints = {"adapter_rank": "4: the default", "noise_draws": "1: one noise sample per step, as in the paper",
                 "adapter_update_every": "1: update the adapters at every step",
                 "anneal_step": "None: never anneal", "target_only_steps": "0: the mode's own score from the first step"}
        for name, low in whole.items():
            value = getattr(self, name)
            if value is None and name in ("anneal_step", "target_only_steps"):
                continue
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{name}={value!r}: give a whole number >= {low} ({hints[name]})")
        for name in ("same_latent", "use_controlnet", "adapter_checkpointing", "encoder_checkpointing", "attention_slicing",
                     "adapter_target_from_score", "cuda_graphs"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "same_latent"):
                raise ValueError(f"{name}={value!r}: give true or false")
        if self.cuda_graphs and self.adapter_checkpointing:
            raise ValueError("cuda_graphs=True with adapter_checkpointing=True: gradient checkpointing's re-runs "
                             "cannot be captured; choose one (checkpointing saves memory, graphs save time)")
        if self.adapter_routing not in ("fused", "peft"):
            raise ValueError(f"adapter_routing {self.adapter_routing!r}: choose 'fused' (default) or 'peft'")
        if self.pixel_gradient not in ("encoder", "decoded"):
            raise ValueError(f"pixel_gradient {self.pixel_gradient!r}: choose 'encoder' (paper) or 'decoded'")

    def validate(self) -> None:
        """Everything, prompts included: what a front end calls once the prompts are in (fields may have been
        changed in place since construction, so they are checked again)."""
        self.check_fields()
        if not self.target_prompt.strip():
            raise ValueError("the target prompt is empty: describe the result you want, e.g. 'a blue cube'")
        if self.mode != "sds" and not self.source_prompt.strip():
            raise ValueError(f"{self.mode} needs a source prompt describing the original, e.g. 'a red cube'")

    @property
    def target_only_cfg(self) -> float:
        """`target_only_guidance_scale`, or the rule's choice when it is None."""
        if self.target_only_guidance_scale is not None:
            return self.target_only_guidance_scale
        return ADDITION_CFG if adds_to_source(self.source_prompt, self.target_prompt) else RESHAPE_CFG

    @property
    def uses_same_latent(self) -> bool:
        return self.mode == "piva" if self.same_latent is None else self.same_latent

    @property
    def uses_source_latent(self) -> bool:
        """DDS (or PiVa's DDS term) on the original's own noisy latent: `step` then needs the original render."""
        return self.mode != "sds" and not self.uses_same_latent


@dataclass
class GuidanceOutput:
    loss: torch.Tensor
    """Backpropagate this into whatever produced the image: d loss / d z = grad / batch."""
    grad: torch.Tensor
    """The score-distillation gradient on the latents (detached)."""
    t: int
    diagnostics: dict = field(default_factory=dict)


class ScoreDistillation:
    """One object per edit: holds the prompts' embeddings, the timestep schedule and (for PiVa) the adapters."""

    def __init__(self, prior: DiffusionPrior, config: GuidanceConfig) -> None:
        config.validate()
        self.prior = prior
        self.config = config
        self.schedule = AnnealedTimesteps(
            prior.num_train_timesteps, config.t_range, config.annealed_range, config.anneal_step
        )
        emb = prior.encode_prompts(["", config.source_prompt, config.target_prompt])
        self.uncond_text, self.source_text, self.target_text = emb[0:1], emb[1:2], emb[2:3]
        self._variant = "sds" if config.mode == "sds" else "dds" if config.uses_source_latent else "dds_same_latent"
        self.adapters: Optional[DualAdapters] = None
        if config.mode == "piva":
            self.adapters = DualAdapters(
                prior, rank=config.adapter_rank, lr=config.adapter_lr, use_controlnet=config.use_controlnet,
                checkpointing=config.adapter_checkpointing, fused=config.adapter_routing == "fused",
                cuda_graphs=config.cuda_graphs,
            )
        self._captured: Optional[dict[tuple, Captured]] = (
            {} if config.cuda_graphs and cuda_graphs_available(prior.device) else None)
        self._update_calls = 0
        self._score_draw: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None  # adapter_target_from_score
        self.guidance_scale = config.guidance_scale if config.guidance_scale is not None else prior.guidance_scale
        if config.encoder_checkpointing:  # acts only where gradients are recorded: the edited view's encoding
            prior.vae.enable_gradient_checkpointing()
        if config.attention_slicing:
            for model in (prior.unet, prior.controlnet):
                if model is not None:
                    model.set_attention_slice("auto")

    # -- inputs -----------------------------------------------------------------
    def check_rgb(self, rgb: torch.Tensor, what: str = "render") -> torch.Tensor:
        if not isinstance(rgb, torch.Tensor) or rgb.dim() != 4 or rgb.shape[1] != 3:
            shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
            raise ValueError(f"{what} must be a [B,3,H,W] tensor, got {shape} (channels-last images need .permute(0,3,1,2))")
        lo, hi = torch.stack(torch.aminmax(rgb.detach())).tolist()  # one device sync; NaN and inf reach min/max
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{what} contains NaN or inf: the scene or image diverged (lower the learning rate)")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{what} must be in [0, 1], got [{lo:.3g}, {hi:.3g}] (images in [-1,1] need (x+1)/2)")
        m = self.prior.vae_scale_factor * self.prior.latent_multiple
        if rgb.shape[2] % m or rgb.shape[3] % m:
            raise ValueError(f"{what} size {rgb.shape[2]}x{rgb.shape[3]} must be a multiple of {m} for this model: resize it")
        return rgb

    def check_latents(self, z: torch.Tensor, what: str = "latents") -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.prior.unet.config.in_channels:
            raise ValueError(f"{what} must be [B,{self.prior.unet.config.in_channels},h,w], got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError(f"{what} contain NaN or inf: the optimisation diverged (lower the learning rate)")
        return z

    def fit_to_model(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Resize [B,C,H,W] (differentiably) to the nearest size this model accepts; identity if it fits."""
        m = self.prior.vae_scale_factor * self.prior.latent_multiple
        h, w = x.shape[-2:]
        size = (max(m, round(h / m) * m), max(m, round(w / m) * m))
        if (h, w) == size:
            return x
        return F.interpolate(x, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))

    def latents_of(
        self,
        rgb: Optional[torch.Tensor],
        latents: Optional[torch.Tensor],
        what: str,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Latents of an image given either way (encoded with gradients, so they reach the renderer)."""
        if (rgb is None) == (latents is None):
            raise ValueError(f"pass exactly one of the {what} image or its latents")
        if latents is not None:
            return self.check_latents(latents, f"{what} latents")
        return self.prior.encode_images(self.check_rgb(rgb, what), generator)

    def control_of(self, depth: Optional[torch.Tensor], z: torch.Tensor) -> Optional[torch.Tensor]:
        """The ControlNet's depth image at the pixel size of `z`; None when the adapters use no ControlNet."""
        if self.adapters is None or not self.adapters.use_controlnet:
            return None
        if depth is None:
            raise ValueError("PiVa with a depth ControlNet needs the render's depth (or set use_controlnet=False)")
        if torch.isnan(depth).any():
            raise ValueError("depth contains NaN: the scene diverged (inf or 0 mark background and are fine)")
        f = self.prior.vae_scale_factor
        return depth_to_control(depth, (z.shape[-2] * f, z.shape[-1] * f)).to(self.prior.device)

    # -- the score --------------------------------------------------------------
    def step(
        self,
        rgb: Optional[torch.Tensor] = None,
        *,
        latents: Optional[torch.Tensor] = None,
        depth: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        source_latents: Optional[torch.Tensor] = None,
        step: int = 0,
        generator: Optional[torch.Generator] = None,
        t: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> GuidanceOutput:
        """The loss whose gradient on the latents is eq. 2 (sds), 4 (dds) or 9 (piva).

        Give the edited image as `rgb` [B,3,H,W] in [0,1] (gradients flow through
        the VAE encoder) or directly as `latents`. `source_*` (the original's
        render) is needed only by DDS with the true source latent.
        """
        cfg, prior = self.config, self.prior
        decoded = cfg.pixel_gradient == "decoded" and rgb is not None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not decoded):  # decoded: no encoder graph needed
            z = self.latents_of(rgb, latents, "edited", generator)
        t = self.schedule.sample(step, generator) if t is None else int(t)
        target_only = step < (cfg.target_only_steps or 0)
        variant = "sds" if target_only else self._variant
        with_identity = self.adapters is not None and variant != "sds"
        # noise_draws: every latent repeated, each copy with its own noise; the scores are averaged.
        draws = cfg.noise_draws
        zd = z.detach().repeat(draws, 1, 1, 1)
        if noise is None:
            noise = torch.randn(zd.shape, generator=generator, device="cpu")
        if noise.shape != zd.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match the latents repeated for noise_draws {tuple(zd.shape)}")
        noise = noise.to(prior.device, z.dtype)
        if self.adapters is not None and cfg.adapter_target_from_score:
            self._score_draw = (z.detach(), noise[: z.shape[0]], t)

        # Same noise and t in every branch (eq. 4).
        noisy = {_EDITED: prior.add_noise(zd, noise, t)}
        if variant == "dds":
            z_src = self._source_latents(z, source_rgb, source_latents, generator).repeat(draws, 1, 1, 1)
            noisy[_ORIGINAL] = prior.add_noise(z_src, noise, t)
        if depth is not None and draws > 1:
            depth = depth.repeat(draws, 1, 1, 1) if depth.dim() == 4 else depth.repeat(draws, 1, 1)
        eps = self._predict(self._rows(noisy, variant, with_identity), t, depth, zd)

        score = _DELTA[variant](eps, cfg.target_only_cfg if target_only else self.guidance_scale, noise.float())
        norms = {"delta_norm": score.norm()}
        if with_identity:
            reg = self._identity(eps)
            norms["identity_norm"] = reg.norm()
            score = score + cfg.identity_weight * reg
        score = score.view(draws, *z.shape).mean(0)
        grad = torch.nan_to_num(sds_weight(prior.alphas_cumprod, torch.tensor(t, device=prior.device)) * score)
        norms["grad_norm"] = grad.norm()
        diagnostics = {"t": t, **dict(zip(norms, torch.stack([v.float() for v in norms.values()]).tolist()))}  # one device sync
        loss = self._decoded_loss(grad, z, rgb) if decoded else (grad * z.float()).sum() / z.shape[0]
        return GuidanceOutput(loss=loss, grad=grad.detach(), t=t, diagnostics=diagnostics)

    def _source_latents(
        self,
        z: torch.Tensor,
        rgb: Optional[torch.Tensor],
        latents: Optional[torch.Tensor],
        generator: Optional[torch.Generator],
    ) -> torch.Tensor:
        """The original's latents, for DDS with the true source z_t."""
        z_src = self.latents_of(rgb, latents, "source", generator).detach()
        if z_src.shape != z.shape:
            raise ValueError(f"source latents {tuple(z_src.shape)} do not match edited latents {tuple(z.shape)}")
        return z_src

    def _rows(self, noisy: dict[str, torch.Tensor], variant: str,
              with_identity: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
        """name -> (noisy latent, text, adapter route): the rows of the one batched call this step needs."""
        text = {"uncond": self.uncond_text, "source": self.source_text, "target": self.target_text}
        needed = dict(_ROWS[variant])
        if with_identity:
            needed.update(_ADAPTER_ROWS)
            if self.config.adapter_guidance_scale != 1.0:
                needed.update(_ADAPTER_UNCOND_ROWS)
        b = noisy[_EDITED].shape[0]
        return {name: (noisy[lat], text[p].expand(b, -1, -1), route) for name, (lat, p, route) in needed.items()}

    @torch.no_grad()
    def _predict(
        self,
        rows: dict[str, tuple[torch.Tensor, torch.Tensor, str]],
        t: int,
        depth: Optional[torch.Tensor],
        z: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One UNet (+ ControlNet/adapters) call over all rows; returns each row's noise prediction (fp32)."""
        prior, b = self.prior, z.shape[0]
        lat = torch.cat([r[0] for r in rows.values()])
        text = torch.cat([r[1] for r in rows.values()])
        routes = [r[2] for r in rows.values() for _ in range(b)]
        tb = torch.full((lat.shape[0],), t, device=prior.device, dtype=torch.long)
        control = None
        if self.adapters is not None:
            adapter_rows = sum(r[2] != BASE for r in rows.values())  # 0 on target-only (SDS) steps
            control = self.control_of(depth, z) if adapter_rows else None
            control = control.repeat(adapter_rows, 1, 1, 1) if control is not None else None

        def call(lat: torch.Tensor, tb: torch.Tensor, text: torch.Tensor, *control: torch.Tensor) -> tuple:
            if self.adapters is not None:
                return (self.adapters.predict(lat, tb, text, routes, control[0] if control else None),)
            return (prior.unet(lat, tb, encoder_hidden_states=text, return_dict=False)[0],)

        inputs = (lat, tb, text) + ((control,) if control is not None else ())
        if self._captured is None:
            (out,) = call(*inputs)
        else:  # one graph per row pattern (SDS steps, the mode's own): replays write the same buffers
            key = tuple(routes)
            if key not in self._captured:
                self._captured[key] = Captured(call)
            out = self._captured[key](*inputs)[0].clone()
        eps = prior.to_epsilon(out, lat, tb).float()
        return dict(zip(rows, eps.split(b)))

    def _identity(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        """eps_psi - eps_phi of eq. 9, each adapter with its own CFG (1.0: conditional rows only)."""
        s = self.config.adapter_guidance_scale
        if s == 1.0:
            return eps["psi"] - eps["phi"]
        return _cfg(eps["psi"], eps["psi_uncond"], s) - _cfg(eps["phi"], eps["phi_uncond"], s)

    def _decoded_loss(self, grad: torch.Tensor, z: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """pixel_gradient="decoded": d loss / d rgb = D(z) - D(z - grad), bypassing the encoder's Jacobian."""
        with torch.no_grad():
            push = self.prior.decode_latents(z) - self.prior.decode_latents(z - grad.to(z))
            if push.shape[-2:] != rgb.shape[-2:]:
                push = F.interpolate(push, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return (push.to(rgb) * rgb).sum() / z.shape[0]

    # -- the adapters (eq. 7, 8) ------------------------------------------------
    def update_adapters(
        self,
        rgb: Optional[torch.Tensor] = None,
        *,
        latents: Optional[torch.Tensor] = None,
        depth: Optional[torch.Tensor] = None,
        source_rgb: Optional[torch.Tensor] = None,
        source_latents: Optional[torch.Tensor] = None,
        source_depth: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """Train the source adapter on the _ORIGINAL render and the target adapter on the CURRENT one."""
        if self.adapters is None:
            return {}
        self._update_calls += 1
        if (self._update_calls - 1) % self.config.adapter_update_every:
            return {}
        with torch.no_grad():
            z = self.latents_of(rgb.detach() if rgb is not None else None, latents, "edited", generator)
            z_src = self.latents_of(source_rgb, source_latents, "source", generator)
        if z.shape != z_src.shape:
            raise ValueError(f"original {tuple(z_src.shape)} and edited {tuple(z.shape)} renders differ in shape")
        draw, self._score_draw = self._score_draw, None
        if self.config.adapter_target_from_score and (draw is None or draw[0].shape != z.shape):
            raise ValueError("adapter_target_from_score: call step() on the same render before update_adapters()")
        return self.adapters.update(
            z,
            z_src,
            self.target_text,
            self.source_text,
            depth_control=self.control_of(depth, z),
            source_depth_control=self.control_of(source_depth, z_src),
            generator=generator,
            target_draw=draw,
        )

    def settings(self) -> dict:
        return {**asdict(self.config), "same_latent_resolved": self.config.uses_same_latent,
                "target_only_guidance_scale_resolved": self.config.target_only_cfg,
                "guidance_scale_resolved": self.guidance_scale, "model": self.prior.name}
