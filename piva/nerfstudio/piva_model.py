"""nerfacto, made safe to build offline.

nerfacto builds torchmetrics' LPIPS in `populate_modules`, which downloads AlexNet
at start-up and fails without network. Editing never needs that metric, so when the
AlexNet weights are not in the torch cache it is replaced by a stand-in that
reports NaN (labelled as unavailable) — without touching nerfstudio's files.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Type

import torch
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def alexnet_cached() -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE).is_file()


class UnavailableLPIPS(torch.nn.Module):
    """Stand-in for LPIPS when its AlexNet weights cannot be had: NaN, never a made-up number."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(float("nan"))


@contextlib.contextmanager
def offline_safe_lpips():
    import torchmetrics.image.lpip as lpip_module

    if alexnet_cached():
        yield
        return
    warnings.warn(
        f"LPIPS disabled: AlexNet weights ({ALEXNET_FILE}) are not in {torch.hub.get_dir()}/checkpoints; "
        "eval LPIPS will read NaN"
    )
    original = lpip_module.LearnedPerceptualImagePatchSimilarity
    lpip_module.LearnedPerceptualImagePatchSimilarity = UnavailableLPIPS
    try:
        yield
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = original


@dataclass
class PivaNerfactoModelConfig(NerfactoModelConfig):
    _target: Type = field(default_factory=lambda: PivaNerfactoModel)


class PivaNerfactoModel(NerfactoModel):
    config: PivaNerfactoModelConfig

    def populate_modules(self) -> None:
        with offline_safe_lpips():
            super().populate_modules()
