"""The source and target LoRA adapters of PiVa (eq. 7 and 8), as two named peft adapters.

Both adapters live on the same frozen UNet (and depth ControlNet, in 3D). Each
sample of a batch is routed to its own adapter, so the guidance's two adapter
predictions take one call, and so do the two adapters' training steps.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from piva.guidance.graphs import maybe_captured
from piva.io import atomic_path
from piva.prior.loading import DiffusionPrior

SOURCE = "source"
TARGET = "target"
BASE = "__base__"  # peft's name for "no adapter" in a routed batch
ATTENTION_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_WEIGHTS = "pytorch_lora_weights.safetensors"
CONTROLNET_WEIGHTS = "controlnet/pytorch_lora_weights.safetensors"


def depth_to_control(depth: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Depth [B,1,H,W] (0 or inf = background) -> the 3-channel inverse-depth image depth ControlNets expect.

    Depth ControlNets are trained on MiDaS-style maps: near is bright, far is dark,
    normalised per image to [0, 1].
    """
    if depth.dim() == 3:
        depth = depth.unsqueeze(1)
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be [B,1,H,W] or [B,H,W], got {tuple(depth.shape)}")
    depth = depth.detach().float()
    valid = torch.isfinite(depth) & (depth > 0)
    inv = torch.where(valid, 1.0 / depth.clamp_min(1e-6), torch.zeros_like(depth))
    flat = inv.flatten(1)
    big = torch.finfo(flat.dtype).max
    lo = torch.where(valid.flatten(1), flat, torch.full_like(flat, big)).amin(1).view(-1, 1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1, 1)
    lo = torch.where(lo >= big, torch.zeros_like(lo), lo)
    norm = torch.where(valid, (inv - lo) / (hi - lo).clamp_min(1e-8) * 0.9 + 0.1, torch.zeros_like(inv))
    norm = F.interpolate(norm, size=tuple(size), mode="bilinear", align_corners=False)
    return norm.repeat(1, 3, 1, 1)


ADAPTERS = (SOURCE, TARGET)  # order of the adapters in the stacked weights
# Per LoRA layer, source then target: A^T [2, in, r] and B^T [2, r, out], laid out so that the matmuls and
# their gradients need no transpose or copy.
PAIR_A, PAIR_B = "lora_pair_A", "lora_pair_B"


class _Plan:
    """How the rows of one call split between the adapters, worked out once per routing pattern.

    The guidance's patterns are blocks: BASE rows first, then as many source rows as target rows;
    those take the paired path (one batched matmul for both adapters, no gather, no mask)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        unknown = set(names) - {BASE, *ADAPTERS}
        if unknown:
            raise ValueError(f"unknown adapter route {sorted(unknown)}: use {SOURCE!r}, {TARGET!r} or BASE")
        self.names = names
        self.idle = all(n == BASE for n in names)
        base = next((i for i, n in enumerate(names) if n != BASE), len(names))
        half = (len(names) - base) // 2
        paired = half > 0 and names[base:] == (SOURCE,) * half + (TARGET,) * half
        self.base_rows = base if paired else None  # rows [0, base) take no adapter, the rest pair up
        self._masks: dict[tuple, torch.Tensor] = {}

    def row_mask(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 1]: 1 on the rows routed to adapter k, else 0."""
        key = (k, like.device, like.dtype)
        if key not in self._masks:
            m = torch.tensor([float(n == ADAPTERS[k]) for n in self.names]).view(-1, 1, 1)
            self._masks[key] = m.to(like.device, like.dtype)
        return self._masks[key]


class _Routes:
    """The routing of the next call, read by one forward hook on every LoRA layer of a model.

    With no active adapter, peft's layer computes the frozen base projection alone; the hook adds
    each row's own adapter term from the stacked weights (`fuse_adapters`): for the guidance's
    patterns, two batched matmuls for both adapters (x A^T B^T, adapter k on its block of rows).
    peft's own mixed batch gathers, casts, scales and scatters each adapter's rows apart, ~40 aten
    operators a projection against ~8 here. The hooks stay installed (they pass while no route is
    set), so torch.compile sees the same modules on every call and specialises on the routes alone.
    """

    def __init__(self) -> None:
        self.plan: Optional[_Plan] = None
        self._plans: dict[tuple[str, ...], _Plan] = {}

    def route(self, names: Optional[Sequence[str]]) -> Optional[_Plan]:
        if names is None:
            return None
        key = tuple(names)
        if key not in self._plans:
            self._plans[key] = _Plan(key)
        return self._plans[key]

    def before(self, layer, args, kwargs):
        """Layers left to peft (`DualAdapters(fused=False)`): peft's own mixed batch, per row by name."""
        if self.plan is not None:
            kwargs["adapter_names"] = list(self.plan.names)
        return args, kwargs

    def __call__(self, layer, args, kwargs, result):
        plan = self.plan
        if plan is None or plan.idle:
            return None
        x = args[0] if args else kwargs["x"]
        if x.shape[0] != len(plan.names):
            raise ValueError(f"{len(plan.names)} adapter routes for a batch of {x.shape[0]} rows")
        return _adapter_term(layer, x, result, plan)


def _adapter_term(layer, x: torch.Tensor, result: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """result (the base projection) + each row's own adapter's x A^T B^T * scaling."""
    down, up = getattr(layer, PAIR_A), getattr(layer, PAIR_B)  # [2, in, r], [2, r, out]
    scale = getattr(layer, "_piva_scale", None)
    if scale is not None:  # alpha != rank
        up = up * scale
    if x.dtype != down.dtype:  # fp32 adapters on a half-precision base
        x = x.to(down.dtype)
    n0 = plan.base_rows
    if n0 is not None and (n0 == 0 or not torch.is_grad_enabled()):
        h = torch.bmm((x[n0:] if n0 else x).reshape(2, -1, x.shape[-1]), down)
        rows = result[n0:].view(2, -1, result.shape[-1]) if n0 else result.view(2, -1, result.shape[-1])
        if result.dtype != h.dtype:
            delta = torch.bmm(h, up).to(result.dtype)
            if n0:  # no graph (checked above): in place
                rows.add_(delta)
                return result
            return (rows + delta).view(result.shape)
        if n0 == 0:
            return torch.baddbmm(rows, h, up).view(result.shape)
        rows.baddbmm_(h, up)  # no graph: in place
        return result
    # Any other pattern (a single adapter, interleaved rows): adapter by adapter, masked per row.
    flat = x.reshape(-1, x.shape[-1])
    out = result
    for k, name in enumerate(ADAPTERS):
        if name in plan.names:
            delta = ((flat @ down[k]) @ up[k]).view(result.shape[0], -1, result.shape[-1])
            out = out + (delta * plan.row_mask(k, delta)).view(result.shape).to(result.dtype)
    return out


def fuse_adapters(layer) -> None:
    """Both adapters' A (and B) stacked into one trainable tensor on the layer; peft's per-adapter
    weights become views of it (what peft, diffusers' savers and users read), so nothing is stored twice."""
    device = layer.get_base_layer().weight.device  # peft may leave new weights on the CPU beside a meta base
    for pair, part in ((PAIR_A, layer.lora_A), (PAIR_B, layer.lora_B)):
        stacked = torch.stack([part[n].weight.detach().to(device).t() for n in ADAPTERS])
        setattr(layer, pair, torch.nn.Parameter(stacked))
        for n in ADAPTERS:
            part[n].weight.requires_grad_(False)  # trained through the stacked tensor
    scales = [float(layer.scaling[n]) for n in ADAPTERS]
    if scales != [1.0, 1.0]:
        layer._piva_scale = torch.tensor(scales).view(2, 1, 1)
    tie_adapters(layer)


def tie_adapters(layer) -> None:
    """(Re)point peft's per-adapter weights at the stacked ones: a module move (`.to()`) copies each
    parameter apart, after which the stacked tensors are the adapters' values."""
    for pair, part in ((PAIR_A, layer.lora_A), (PAIR_B, layer.lora_B)):
        stacked = getattr(layer, pair, None)
        if stacked is None or stacked.is_meta:
            continue
        for k, n in enumerate(ADAPTERS):
            w = part[n].weight
            at = stacked.data_ptr() + k * stacked.stride(0) * stacked.element_size()
            if w.data_ptr() != at or w.device != stacked.device:
                w.data = stacked.data[k].t()
    scale = getattr(layer, "_piva_scale", None)
    if scale is not None and scale.device != layer.lora_pair_B.device:
        layer._piva_scale = scale.to(layer.lora_pair_B.device)


def _routes_of(model: torch.nn.Module, fused: bool = True) -> _Routes:
    """The model's routes, hooked on its LoRA layers on first use: the fused term (`fused`), or peft's mixed
    batch (one hook a layer either way, so the default path pays for no check of the other)."""
    from peft.tuners.lora import Linear, LoraLayer

    routes = getattr(model, "_piva_routes", None)
    if routes is None:
        routes = _Routes()
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                if not isinstance(m, Linear):
                    raise TypeError(f"piva's adapters route linear LoRA layers only; {name} is a {type(m).__name__}")
                if fused:
                    m.register_forward_hook(routes, with_kwargs=True)
                else:
                    m.register_forward_pre_hook(routes.before, with_kwargs=True)
        model._piva_routes = routes
    return routes


@contextlib.contextmanager
def route_adapters(model: torch.nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Send sample i of every LoRA layer's input through adapter `adapter_names[i]` (or BASE: none).

    peft can do this (`adapter_names=`), but diffusers models do not pass that argument down, and
    peft's mixed batch costs ~40 operators a projection: piva's fused term (`_Routes`) does it instead.
    """
    routes = _routes_of(model)
    previous, routes.plan = routes.plan, routes.route(adapter_names)
    try:
        yield
    finally:
        routes.plan = previous


class DualAdapters:
    """Two LoRA adapters on the frozen prior: `source` tracks the original scene, `target` the edited one."""

    def __init__(
        self,
        prior: DiffusionPrior,
        rank: int = 4,
        lr: float = 1e-4,
        use_controlnet: bool = True,
        alpha: Optional[float] = None,
        checkpointing: bool = False,
        fused: bool = True,
        cuda_graphs: bool = False,
    ) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if use_controlnet and prior.controlnet is None:
            raise ValueError("adapters on the ControlNet need a prior loaded with a depth ControlNet (controlnet=...)")
        self.prior = prior
        self.rank = rank
        self.use_controlnet = use_controlnet
        self.models = {"unet": prior.unet}
        if use_controlnet:
            self.models["controlnet"] = prior.controlnet
        config = LoraConfig(
            r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=ATTENTION_MODULES
        )
        for model in self.models.values():
            if lora_shapes(model, SOURCE):
                raise ValueError("this prior already carries piva adapters: load a fresh DiffusionPrior for each edit")
            for name in (SOURCE, TARGET):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                    inject_adapter_in_model(config, model, adapter_name=name)
            _routes_of(model, fused)  # hooks in place before anything compiles the model
        self.checkpointing = checkpointing
        if checkpointing:  # acts only where gradients are recorded: the update, never the no-grad score
            for model in self.models.values():
                model.enable_gradient_checkpointing()
        # No adapter is active outside `route_adapters`: peft would otherwise apply the last injected one
        # (target) to every unrouted call, e.g. a base-model sample drawn from the same prior. Routed rows
        # name their adapter per sample and do not read the active set.
        for layer in (m for model in self.models.values() for m in model.modules() if isinstance(m, BaseTunerLayer)):
            layer.set_adapter([])
        # LoRA B starts at zero: both adapters begin as the base model (Alg. 1).
        # Both adapters train (the base stays frozen), in fp32 on a half-precision base.
        self._weights = {name: self._adapter_parameters(name) for name in ADAPTERS}
        for p in self._weights[SOURCE] + self._weights[TARGET]:  # set_adapter froze the inactive ones
            p.requires_grad_(True)
        cast_training_params(list(self.models.values()), torch.float32)
        self.layers = [m for model in self.models.values() for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if fused:
            for layer in self.layers:
                fuse_adapters(layer)
            self.trainable = [getattr(layer, pair) for layer in self.layers for pair in (PAIR_A, PAIR_B)]
        else:  # peft's per-adapter weights train themselves (the reference path; ~4x the operators)
            self.trainable = self._weights[SOURCE] + self._weights[TARGET]
        # One fused operator for all LoRA weights (the per-weight loop dispatches ~10 each); the multi-tensor
        # form where no fused kernel exists (benchmark/real_size.py gives the meta device the fused one).
        fused_adam = all(p.device.type in ("cpu", "cuda") for p in self.trainable)
        self._captured_update = maybe_captured(cuda_graphs, prior.device, self._train_step)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.trainable, "name": "adapters"}], lr=lr, weight_decay=0.0,
            **({"fused": True} if fused_adam else {"foreach": True}),
            **({"capturable": True} if self._captured_update is not None else {}),  # its step count on the GPU
        )

    @property
    def parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """Each adapter's LoRA weights in peft's layout (views of the stacked tensors that train)."""
        self.tie()
        return self._weights

    def tie(self) -> None:
        """peft's per-adapter weights back on the stacked ones, should a module move have parted them."""
        for layer in self.layers:
            tie_adapters(layer)

    def _adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [
            p
            for model in self.models.values()
            for key, p in model.named_parameters()
            if ".lora_" in key and key.endswith(f".{name}.weight")
        ]

    # -- forward ----------------------------------------------------------------
    def predict(
        self,
        z_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        routes: Sequence[str],
        control: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Raw UNet output for a batch whose rows go to the adapters (or BASE) named in `routes`.

        `control` holds depth images for the rows with an adapter; BASE rows get no
        ControlNet residual (a zero residual is exactly "no ControlNet").
        """
        prior = self.prior
        t = t.expand(z_t.shape[0]) if t.dim() == 0 or t.numel() == 1 else t
        residuals = {}
        rows = [i for i, r in enumerate(routes) if r != BASE]
        if self.use_controlnet and rows:  # an all-BASE batch (e.g. SDS steps of a piva edit) needs no ControlNet
            if control is None:
                raise ValueError("PiVa with a depth ControlNet needs a depth map for every render")
            # The adapter rows as a slice where they are one block (the guidance puts them last): no gather.
            block = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows
            with route_adapters(prior.controlnet, [routes[i] for i in rows]):
                down, mid = prior.controlnet(
                    z_t[block],
                    t[block],
                    encoder_hidden_states=text[block],
                    controlnet_cond=control.to(z_t.dtype),
                    return_dict=False,
                )
            if len(rows) < len(routes):
                down = [self._scatter(r, block, len(routes)) for r in down]
                mid = self._scatter(mid, block, len(routes))
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        with route_adapters(prior.unet, routes):
            return prior.unet(z_t, t, encoder_hidden_states=text, return_dict=False, **residuals)[0]

    @staticmethod
    def _scatter(x: torch.Tensor, rows: Union[slice, list[int]], n: int) -> torch.Tensor:
        """The ControlNet's residuals of the adapter rows in a batch of n, zero (no ControlNet) elsewhere."""
        if isinstance(rows, slice):
            return torch.cat([x.new_zeros((rows.start,) + x.shape[1:]), x, x.new_zeros((n - rows.stop,) + x.shape[1:])])
        out = x.new_zeros((n,) + tuple(x.shape[1:]))
        out[rows] = x
        return out

    # -- training (eq. 7, 8) ----------------------------------------------------
    def update(
        self,
        latents: torch.Tensor,
        source_latents: torch.Tensor,
        target_text: torch.Tensor,
        source_text: torch.Tensor,
        depth_control: Optional[torch.Tensor] = None,
        source_depth_control: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        target_draw: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None,
    ) -> dict:
        """One optimizer step: source adapter on ORIGINAL latents, target adapter on CURRENT ones.

        Both go in one routed batch; each adapter only sees (and is only pulled by) its own rows.
        `target_draw` (latents, noise, t) replaces the target rows' fresh draw (GuidanceConfig.adapter_target_from_score).
        """
        prior = self.prior
        latents = latents.detach()
        source_latents = source_latents.detach()
        b = latents.shape[0]
        x0 = torch.cat([source_latents, latents]).to(prior.dtype)
        text = torch.cat([source_text.expand(b, -1, -1), target_text.expand(b, -1, -1)])
        control = None
        if self.use_controlnet:
            if depth_control is None or source_depth_control is None:
                raise ValueError("adapter updates with a depth ControlNet need depth for both the original and the edited render")
            control = torch.cat([source_depth_control, depth_control])
        t = torch.randint(0, prior.num_train_timesteps, (2 * b,), generator=generator, device="cpu")
        noise = torch.randn(x0.shape, generator=generator, device="cpu")
        if target_draw is not None:
            drawn_latents, drawn_noise, drawn_t = target_draw
            x0 = torch.cat([x0[:b], drawn_latents.detach().to(prior.dtype)])
            noise[b:] = drawn_noise.cpu()
            t[b:] = int(drawn_t)
        t, noise = t.to(prior.device), noise.to(prior.device, prior.dtype)
        inputs = (x0, noise, t, text) + ((control,) if control is not None else ())
        step = self._train_step if self._captured_update is None else self._captured_update
        loss_source, loss_target = torch.stack(step(*inputs)).tolist()  # one device sync, not two
        return {"source_adapter_loss": loss_source, "target_adapter_loss": loss_target}

    def _train_step(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                    control: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and AdamW step on a drawn batch (source rows, then as many target rows):
        device work only, so that a CUDA graph can hold all of it."""
        prior, b = self.prior, x0.shape[0] // 2
        routes = [SOURCE] * b + [TARGET] * b
        z_t = prior.add_noise(x0, noise, t)
        with contextlib.ExitStack() as stack:
            if self.checkpointing:
                # The backward pass re-runs checkpointed blocks: the rows must still be routed then.
                for m in self.models.values():
                    stack.enter_context(route_adapters(m, routes))
            for m in self.models.values():
                m.train()
            try:
                out = self.predict(z_t, t, text, routes, control)
            finally:
                for m in self.models.values():
                    m.eval()
            target = prior.training_target(x0, noise, t)
            per_row = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
            loss_source, loss_target = per_row[:b].mean(), per_row[b:].mean()
            self.optimizer.zero_grad(set_to_none=True)
            (loss_source + loss_target).backward()
        self.optimizer.step()
        return loss_source.detach(), loss_target.detach()

    # -- persistence ------------------------------------------------------------
    def state(self) -> dict:
        """Both adapters' weights and their optimizer state (CPU), for a framework's checkpoint."""
        return {
            "weights": {n: [p.detach().cpu().clone() for p in self.parameters[n]] for n in (SOURCE, TARGET)},
            "optimizer": self.optimizer.state_dict(),
            "rank": self.rank,
        }

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned; refuses adapters of another model or rank."""
        for name in (SOURCE, TARGET):
            params, tensors = self.parameters[name], state["weights"][name]
            if len(params) != len(tensors) or any(p.shape != t.shape for p, t in zip(params, tensors)):
                raise ValueError("the checkpoint's adapters do not fit this diffusion model / adapter rank")
            with torch.no_grad():
                for p, t in zip(params, tensors):
                    p.copy_(t)
        groups = state["optimizer"]["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            # Checkpoints written before the stacked adapters (2026-12) kept one AdamW entry per peft weight: the weights are restored above,
            # the moments start again (a few steps of warm-up, nothing of the edit lost).
            warnings.warn("adapter optimizer state from an older piva: adapter weights restored, AdamW moments reset")
            return
        self.optimizer.load_state_dict(state["optimizer"])  # new state tensors: a captured update would miss them
        if self._captured_update is not None:
            self._captured_update = maybe_captured(True, self.prior.device, self._train_step)

    def state_dicts(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter's weights per model, in diffusers' LoRA key format."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        self.tie()
        return {
            key: convert_state_dict_to_diffusers(
                {k: v.contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()
                 if "lora_pair" not in k}
            )
            for key, model in self.models.items()
        }

    def save(self, directory: Union[str, Path]) -> Path:
        """Write `<dir>/source` and `<dir>/target` as diffusers LoRA folders.

        The UNet part loads with `pipe.load_lora_weights(dir/target)` in a plain
        diffusers pipeline; the ControlNet part sits in `controlnet/` in the same key format.
        """
        from diffusers import StableDiffusionPipeline
        from safetensors.torch import save_file

        with atomic_path(directory) as tmp:  # a kill mid-save leaves the previous adapters intact
            for name in (SOURCE, TARGET):
                sub = tmp / name
                sub.mkdir(parents=True, exist_ok=True)
                parts = self.state_dicts(name)
                StableDiffusionPipeline.save_lora_weights(sub, unet_lora_layers=parts["unet"], weight_name=UNET_WEIGHTS)
                if "controlnet" in parts:
                    tensors = {f"controlnet.{k}": v.contiguous() for k, v in parts["controlnet"].items()}
                    (sub / CONTROLNET_WEIGHTS).parent.mkdir(exist_ok=True)
                    save_file(tensors, str(sub / CONTROLNET_WEIGHTS))
                (sub / "piva_adapter.json").write_text(
                    json.dumps({"adapter": name, "rank": self.rank, "base_model": self.prior.name}, indent=2)
                )
        return Path(directory)

    def load(self, directory: Union[str, Path]) -> None:
        """Load adapters written by `save` (checks that they fit this model)."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        self.tie()  # peft writes into its per-adapter weights: they must be the stacked ones' views
        for name in (SOURCE, TARGET):
            sub = directory / name
            files = {"unet": (sub / UNET_WEIGHTS, "unet.")}
            if self.use_controlnet:
                files["controlnet"] = (sub / CONTROLNET_WEIGHTS, "controlnet.")
            for key, (path, prefix) in files.items():
                if not path.is_file():
                    raise FileNotFoundError(f"adapter file {path} is missing: was it saved by piva with the same settings?")
                raw = load_file(str(path))
                state = convert_unet_state_dict_to_peft({k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)})
                expected = lora_shapes(self.models[key], name)
                got = {k: tuple(v.shape) for k, v in state.items()}
                if got != expected:
                    matching = sum(expected.get(k) == v for k, v in got.items())
                    raise ValueError(
                        f"adapter {path} does not fit this model ({matching}/{len(expected)} LoRA weights match): "
                        "it was trained for another base model or LoRA rank"
                    )
                set_peft_model_state_dict(self.models[key], state, adapter_name=name)


def lora_shapes(model: torch.nn.Module, name: str) -> dict[str, tuple]:
    """peft-format keys (adapter name stripped) of one adapter -> weight shape."""
    suffix = f".{name}.weight"
    return {
        k.replace(suffix, ".weight"): tuple(p.shape)
        for k, p in model.named_parameters()
        if ".lora_" in k and k.endswith(suffix)
    }
