"""SwiGLU feed-forward network: ``w3(silu(x W1) ⊙ (x W2))`` with ``[W1 | W2]`` stored as one layer ``w12``.

``SwiGLUFFNFused`` (``ffn_layer: swiglu`` / ``swiglufused``) keeps the parameter count of a ``4·dim`` MLP by
shrinking the hidden width to ``(int(hidden·2/3) + 7) // 8 * 8`` (a multiple of 8). Keys: ``mlp.w12``, ``mlp.w3``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLUFFN(nn.Module):
    """Gated FFN ``in → 2·hidden (gate, value) → hidden → out`` with a SiLU gate."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = self._hidden_width(hidden_features or in_features)
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    @staticmethod
    def _hidden_width(hidden_features: int) -> int:
        """The hidden width used for a nominal one (the nominal width itself; the fused variant shrinks it)."""
        return hidden_features

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_features(hidden_features: int) -> int:
    """Hidden width of the fused SwiGLU for a nominal MLP width: ``(int(hidden·2/3) + 7) // 8 * 8``."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(SwiGLUFFN):
    """:class:`SwiGLUFFN` whose hidden width is :func:`swiglu_hidden_features` of the nominal one."""

    _hidden_width = staticmethod(swiglu_hidden_features)
