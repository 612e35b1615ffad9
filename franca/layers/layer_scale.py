"""LayerScale (CaiT): a learned per-channel scale ``x ↦ x ⊙ γ`` on a residual branch, ``γ`` initialised small."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """Multiply the last dimension by ``gamma`` (``dim`` values, initialised to ``init_values``)."""

    def __init__(self, dim: int, init_values: float | Tensor = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma
