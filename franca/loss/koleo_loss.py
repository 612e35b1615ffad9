"""KoLeo spreading regulariser (Kozachenko-Leonenko entropy estimator; Sablayrolles et al., 2018, as in DINOv2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """``-mean_i log(‖x̂_i - x̂_{nn(i)} + ε_d‖₂ + ε)`` on the L2-normalised rows x̂ of a (B × D) batch.

    ``nn(i)`` is the nearest other row (largest inner product; found without gradient), ε_d = 1e-8 is
    ``nn.PairwiseDistance``'s epsilon added to the difference, ε (``eps``, default 1e-8) also serves the
    normalisation. Computed in float32 with autocast disabled.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @staticmethod
    def pairwise_NNs_inner(x: Tensor) -> Tensor:  # noqa: N802 (reference name)
        """Index of each row's nearest other row by inner product (rows L2-normalised)."""
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        return dots.argmax(dim=1)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        if student_output.ndim != 2 or student_output.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs a (B >= 2) × D batch, got shape {tuple(student_output.shape)}")
        with torch.autocast(student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            with torch.no_grad():
                neighbours = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[neighbours])
            return -torch.log(distances + eps).mean()
