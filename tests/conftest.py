"""Tiny diffusers parts built from configs; everything offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch

from piva.prior import DiffusionPrior
from piva.prior.tiny import build_tiny_prior


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_prior(tmp_path_factory.mktemp("tiny-sd"), seed=0, with_controlnet=True)


@pytest.fixture(scope="session")
def tiny_v_dir(tmp_path_factory):
    return build_tiny_prior(tmp_path_factory.mktemp("tiny-sd-v"), seed=1, with_controlnet=False, prediction_type="v_prediction")


@pytest.fixture
def prior(tiny_dir):
    """A fresh prior per test: adapters are injected into its modules."""
    return DiffusionPrior.from_pretrained(tiny_dir, controlnet=tiny_dir / "controlnet", device="cpu")


@pytest.fixture
def prior_2d(tiny_dir):
    return DiffusionPrior.from_pretrained(tiny_dir, device="cpu")


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Give every LoRA weight a distinct non-zero value so source != target != base.

    peft's per-adapter weights (views of piva's stacked ones): the same values whatever the adapter routing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared, busy CPU, threads spinning against each other make small models ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def per_adapter_reference(sd, z, t, text, control, routes, weights=None):
    """Each row alone through peft's own adapter switching (`set_adapter`; no routing), the ControlNet on the
    adapter rows (`control`: one row each) as the guidance runs it: the rows' predictions and the gradients of
    sum(prediction * weights) on peft's per-adapter weights, by adapter (weights None: predictions only)."""
    from peft.tuners.lora import LoraLayer

    from piva.guidance.adapters import BASE, SOURCE, TARGET

    prior, layers = sd.prior, [m for m in sd.adapters.layers if isinstance(m, LoraLayer)]
    peft_weights = sd.adapters.parameters
    flags = {id(p): p.requires_grad for name in (SOURCE, TARGET) for p in peft_weights[name]}
    for name in (SOURCE, TARGET):
        for p in peft_weights[name]:
            p.requires_grad_(True)
            p.grad = None
    outs, j = [], 0
    try:
        with torch.set_grad_enabled(weights is not None):
            for i, adapter in enumerate(routes):
                for layer in layers:
                    layer.enable_adapters(adapter != BASE)
                    layer.set_adapter(SOURCE if adapter == BASE else adapter)
                kw = {}
                if adapter != BASE:
                    down, mid = prior.controlnet(z[i : i + 1], t[i : i + 1], encoder_hidden_states=text[i : i + 1],
                                                 controlnet_cond=control[j : j + 1], return_dict=False)
                    kw, j = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid), j + 1
                out = prior.unet(z[i : i + 1], t[i : i + 1], encoder_hidden_states=text[i : i + 1], **kw).sample
                if adapter != BASE and weights is not None:  # the frozen model's row reaches no LoRA weight
                    (out * weights[i : i + 1]).sum().backward()
                outs.append(out.detach())
        grads = {n: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in peft_weights[n]]
                 for n in (SOURCE, TARGET)}
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            layer.set_adapter([])
        for name in (SOURCE, TARGET):
            for p in peft_weights[name]:
                p.grad = None
                p.requires_grad_(flags[id(p)])
    return torch.cat(outs), grads
