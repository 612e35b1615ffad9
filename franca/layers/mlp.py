"""The transformer feed-forward network ``fc2(act(fc1(x)))`` (``ffn_layer: mlp``; keys ``mlp.fc1``, ``mlp.fc2``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class Mlp(nn.Module):
    """Two linear layers ``in → hidden → out`` with ``act_layer`` (GELU) between them."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
