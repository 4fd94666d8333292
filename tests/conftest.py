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
