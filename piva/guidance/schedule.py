"""Timestep sampling and weighting shared by SDS, DDS and PiVa."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class AnnealedTimesteps:
    """t ~ U[t_range] until `anneal_step`, then U[annealed_range] (ProlificDreamer-style).

    Large t early shapes the edit; small t later refines detail without undoing it.
    Ranges are fractions of the model's training timesteps.
    """

    num_train_timesteps: int = 1000
    t_range: Tuple[float, float] = (0.02, 0.98)
    annealed_range: Tuple[float, float] = (0.02, 0.50)
    anneal_step: Optional[int] = None  # None: never anneal

    def __post_init__(self) -> None:
        for lo, hi in (self.t_range, self.annealed_range):
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"timestep range ({lo}, {hi}) must satisfy 0 <= low < high <= 1")

    def bounds(self, step: int) -> Tuple[int, int]:
        lo, hi = self.t_range
        if self.anneal_step is not None and step >= self.anneal_step:
            lo, hi = self.annealed_range
        n = self.num_train_timesteps
        return int(lo * n), max(int(lo * n) + 1, int(hi * n))

    def sample(self, step: int, generator: Optional[torch.Generator] = None) -> int:
        lo, hi = self.bounds(step)
        return int(torch.randint(lo, hi, (1,), generator=generator).item())


def sds_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w(t) = sigma_t^2 = 1 - alpha_bar_t."""
    return 1.0 - alphas_cumprod[t]
