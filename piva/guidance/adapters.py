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


class _Routes:
    """Adapter names for the rows of the next call, read by one hook on every LoRA layer of a model.

    The hooks stay installed (they pass nothing while `names` is None), so torch.compile sees the same
    modules on every call and specialises on the routes alone instead of recompiling per call.
    """

    def __init__(self) -> None:
        self.names: Optional[list[str]] = None

    def __call__(self, module, args, kwargs):
        if self.names is not None:
            kwargs["adapter_names"] = self.names
        return args, kwargs


def _routes_of(model: torch.nn.Module) -> _Routes:
    from peft.tuners.lora import LoraLayer

    routes = getattr(model, "_piva_routes", None)
    if routes is None:
        routes = _Routes()
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.register_forward_pre_hook(routes, with_kwargs=True)
        model._piva_routes = routes
    return routes


@contextlib.contextmanager
def route_adapters(model: torch.nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Send sample i of every LoRA layer's input through adapter `adapter_names[i]`.

    peft does this for a PeftModel (`adapter_names=`), but diffusers models do not
    pass that argument down and peft's wrapper refuses it while training; peft's
    LoRA layers themselves accept it, so a hook hands it to each of them.
    """
    routes = _routes_of(model)
    previous, routes.names = routes.names, list(adapter_names)
    try:
        yield
    finally:
        routes.names = previous


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
            _routes_of(model)  # hooks in place before anything compiles the model
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
        self.parameters = {name: self._adapter_parameters(name) for name in (SOURCE, TARGET)}
        for p in self.parameters[SOURCE] + self.parameters[TARGET]:  # set_adapter froze the inactive ones
            p.requires_grad_(True)
        # Both adapters train (the base stays frozen), in fp32 on a half-precision base.
        cast_training_params(list(self.models.values()), torch.float32)
        self.optimizer = torch.optim.AdamW(
            [{"params": self.parameters[SOURCE], "name": SOURCE}, {"params": self.parameters[TARGET], "name": TARGET}],
            lr=lr,
            weight_decay=0.0,
        )

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
            with route_adapters(prior.controlnet, [routes[i] for i in rows]):
                down, mid = prior.controlnet(
                    z_t[rows],
                    t[rows],
                    encoder_hidden_states=text[rows],
                    controlnet_cond=control.to(z_t.dtype),
                    return_dict=False,
                )
            if len(rows) < len(routes):
                down = [self._scatter(r, rows, len(routes)) for r in down]
                mid = self._scatter(mid, rows, len(routes))
            residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        with route_adapters(prior.unet, routes):
            return prior.unet(z_t, t, encoder_hidden_states=text, return_dict=False, **residuals)[0]

    @staticmethod
    def _scatter(x: torch.Tensor, rows: list[int], n: int) -> torch.Tensor:
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
    ) -> dict:
        """One optimizer step: source adapter on ORIGINAL latents, target adapter on CURRENT ones.

        Both go in one routed batch; each adapter only sees (and is only pulled by) its own rows.
        """
        prior = self.prior
        latents = latents.detach()
        source_latents = source_latents.detach()
        b = latents.shape[0]
        x0 = torch.cat([source_latents, latents]).to(prior.dtype)
        routes = [SOURCE] * b + [TARGET] * b
        text = torch.cat([source_text.expand(b, -1, -1), target_text.expand(b, -1, -1)])
        control = None
        if self.use_controlnet:
            if depth_control is None or source_depth_control is None:
                raise ValueError("adapter updates with a depth ControlNet need depth for both the original and the edited render")
            control = torch.cat([source_depth_control, depth_control])
        t = torch.randint(0, prior.num_train_timesteps, (2 * b,), generator=generator, device="cpu").to(prior.device)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(prior.device, prior.dtype)
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
        return {"source_adapter_loss": loss_source.item(), "target_adapter_loss": loss_target.item()}

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
        self.optimizer.load_state_dict(state["optimizer"])

    def state_dicts(self, name: str) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter's weights per model, in diffusers' LoRA key format."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        return {
            key: convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=name))
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
