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
from typing import Optional, Tuple, Type

import torch
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig

from piva.metrics.evaluate import ALEXNET_FILE, alexnet_cached


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
    separate_mlp_group: bool = False
    """Put the field's MLPs in their own optimizer group, `field_mlps` (the hash grids stay in `fields`), so that
    their lr can be set apart: the colour MLP is shared by every point of the scene (docs/toyworld.md#a-fixed-backdrop).
    Default False; the registered piva methods turn it on."""
    backdrop_rgb: Optional[Tuple[float, float, float]] = None
    """A fixed RGB colour in [0, 1] behind the scene, for objects captured on a known backdrop (the toy world's
    grey, Noe's white); overrides `background_color`. Unlike nerfacto's `last_sample` background it cannot be
    recoloured by an edit. None: `background_color`."""
    edit_geometry: Optional[bool] = None
    """False: the density (hash grid, density MLP, proposal networks) stays as captured and only
    the colour head trains, at the `fields` group's lr: for appearance edits (recolour, restyle).
    None (default): False when the two prompts differ only in colour words ("a red car" -> "a blue
    car"), else True (docs/toyworld.md#colour-only-edits-keep-the-geometry)."""
    edit_grid_levels: Optional[int] = None
    """Hash-grid levels (coarsest first) of the field that the edit may change; the finer ones stay
    as reconstructed (docs/toyworld.md#only-the-collision-free-hash-grid-levels-change).
    None: for an edit that changes geometry, the levels whose table holds every vertex
    ((res+1)^3 <= 2^log2_hashmap_size: 2 of the toy field's 8, 5 of nerfacto's 16), else all; with
    tiny-cuda-nn (one opaque parameter buffer) all. A number needs the torch hash grid."""
    geometry_only_growth: bool = False
    """During the growth phase (the guidance's target-only steps) detach the colour head's inputs: the target
    caption's colour gradient then reaches only the colour head (reset afterwards: the pipeline's
    `reset_colour_after_growth`), and the grids and density MLP move for the density alone. Default False: it
    helped some additions and stopped others from growing (docs/toyworld.md#what-failed)."""
    edit_grid_levels_until: Optional[int] = None
    """Edit step from which every level is editable again (coarse to fine: the shape settles in the
    coarse levels first, then the fine ones follow it). None: the fine levels stay frozen throughout."""


def whole_levels(grid: torch.nn.Module) -> int:
    """How many of a nerfstudio HashEncoding's levels (coarsest first) have a table that holds all their vertices."""
    vertices = (grid.scalings.double() + 1) ** 3
    return max(1, int((vertices <= grid.hash_table_size).sum()))


def freeze_fine_levels(grid: Optional[torch.nn.Module], levels: int, active=lambda: True) -> None:
    """Zero the gradient of a nerfstudio torch HashEncoding's levels >= `levels` while `active()` (Adam then leaves them)."""
    table = getattr(grid, "hash_table", None)
    if not isinstance(table, torch.nn.Parameter) or table.numel() == 0:
        raise ValueError("edit_grid_levels needs nerfacto's torch hash grid: set implementation='torch' "
                         "(tiny-cuda-nn keeps its levels in one opaque buffer)")
    if not 1 <= levels <= grid.num_levels:
        raise ValueError(f"edit_grid_levels must be 1..{grid.num_levels} (the grid's levels), got {levels}")
    mask = torch.zeros(table.shape[0], 1, dtype=table.dtype, device=table.device)
    mask[: grid.hash_table_size * levels] = 1  # levels are stored one after another, hash_table_size rows each
    table.register_hook(lambda g: g * mask.to(g.device) if active() else g)


class PivaNerfactoModel(NerfactoModel):
    config: PivaNerfactoModelConfig
    edit_step: int = 0
    """Set by the pipeline at every edit step (the coarse-to-fine schedule reads it)."""
    growing: bool = False
    """Set by the pipeline: True during the guidance's target-only (growth) steps."""

    def populate_modules(self) -> None:
        with offline_safe_lpips():
            super().populate_modules()
        if self.config.backdrop_rgb is not None:
            from nerfstudio.model_components.renderers import RGBRenderer

            self.renderer_rgb = RGBRenderer(background_color=torch.tensor(self.config.backdrop_rgb, dtype=torch.float32))
        from nerfstudio.field_components.encodings import HashEncoding

        grid = next((m for m in self.field.mlp_base.modules() if isinstance(m, HashEncoding)), None)
        levels = self.config.edit_grid_levels
        torch_grid = grid is not None and grid.tcnn_encoding is None
        if levels is None and self.config.edit_geometry is True and torch_grid:
            levels = whole_levels(grid)  # the rule, for geometry edits (the pipeline resolves edit_geometry)
        if levels is not None:
            freeze_fine_levels(grid, levels, active=lambda: not self.fine_levels_free)
        self.field.mlp_head.register_forward_pre_hook(self._colour_inputs)

    def _colour_inputs(self, module, args):
        """geometry_only_growth: during growth the colour head sees its inputs without their graph."""
        if self.growing and self.config.geometry_only_growth:
            return tuple(a.detach() for a in args)
        return None

    @property
    def fine_levels_free(self) -> bool:
        until = self.config.edit_grid_levels_until
        return until is not None and self.edit_step >= until

    def colour_parameters(self) -> list:
        """The colour head (and the appearance embedding): what an appearance-only edit trains."""
        return [p for n, p in self.field.named_parameters() if n.startswith(("mlp_head.", "embedding_appearance."))]

    def get_param_groups(self):
        groups = super().get_param_groups()
        if self.config.edit_geometry is False:
            colour = {id(p) for p in self.colour_parameters()}
            for p in self.parameters():
                p.requires_grad_(id(p) in colour)
            return {"fields": self.colour_parameters()}
        if self.config.separate_mlp_group:
            grid_ids = {id(p) for n, p in self.field.named_parameters() if _is_grid(n, p)}
            groups["fields"] = [p for p in self.field.parameters() if id(p) in grid_ids]
            groups["field_mlps"] = [p for p in self.field.parameters() if id(p) not in grid_ids]
        return groups


def _is_grid(name: str, param: torch.Tensor) -> bool:
    """Hash-grid tables (torch implementation), or tcnn's fused grid+density network (cannot be split)."""
    return "hash_table" in name or (name.startswith("mlp_base.") and "layers" not in name)
