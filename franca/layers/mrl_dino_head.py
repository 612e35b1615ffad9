"""Matryoshka DINO head: one projection head per nesting level of the backbone feature (Franca)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from franca.layers.dino_head import WeightNormLinear, build_mlp, init_linear_weights

PROJECTIONS = ("linear", "slice")


class MRLDINOHead(nn.Module):
    """Per nesting level m_j: ``logits_j = WeightNormLinear_j(MLP_j(P_j(x)))`` with ``int(out_dim · m_j / m_last)`` prototypes.

    ``P_j`` is the level's own ``nn.Linear(in_dim, m_j)`` (``projection="linear"``, the official code) or
    the first m_j features ``x[..., :m_j]`` (``projection="slice"``, the paper's description; no
    ``matryoshka_projections`` parameters then). ``MLP_j``: ``nlayers`` linear layers
    ``m_j → hidden_dim (→ hidden_dim)* → bottleneck_dim``, each followed by [BatchNorm +] GELU — including
    the bottleneck layer — and no L2 normalisation before the prototype layer (reference behaviour).
    The nesting list defaults to ``[d/16, d/8, d/4, d/2, d]`` with ``d = in_dim``.

    ``forward(x)`` with x (..., in_dim) returns a tuple of per-level logits (..., K_j), smallest level first.
    State-dict keys: ``matryoshka_projections.<j>.*``, ``mlps.<j>.<layer>.*``, ``last_layers.<j>.weight_g``
    (K_j × 1) and ``last_layers.<j>.weight_v`` (K_j × bottleneck_dim).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 384,
        mlp_bias: bool = True,
        nesting_list: Sequence[int] | None = None,
        projection: str = "linear",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if nesting_list is None:
            nesting_list = [in_dim // 16, in_dim // 8, in_dim // 4, in_dim // 2, in_dim]
        nesting_list = [int(m) for m in nesting_list]
        if not nesting_list or min(nesting_list) < 1 or sorted(set(nesting_list)) != nesting_list:
            raise ValueError(
                f"MRLDINOHead: nesting_list must be strictly increasing positive widths, got {nesting_list}"
            )
        if projection not in PROJECTIONS:
            raise ValueError(f"MRLDINOHead: projection must be one of {PROJECTIONS}, got {projection!r}")
        if projection == "slice" and nesting_list[-1] > in_dim:
            raise ValueError(
                f"MRLDINOHead: projection='slice' needs nesting widths <= in_dim={in_dim}, got {nesting_list}"
            )
        self.nesting_list = nesting_list
        self.projection = projection
        self.n_prototypes = [int(out_dim * (m / nesting_list[-1])) for m in nesting_list]
        if min(self.n_prototypes) < 1:
            raise ValueError(f"MRLDINOHead: out_dim={out_dim} gives an empty level for nesting {nesting_list}")

        if projection == "linear":
            self.matryoshka_projections = nn.ModuleList(nn.Linear(in_dim, m, bias=mlp_bias) for m in nesting_list)
        nlayers = max(nlayers, 1)
        self.mlps = nn.ModuleList(
            build_mlp(nlayers, m, bottleneck_dim, hidden_dim, use_bn=use_bn, bias=mlp_bias, activate_output=True)
            for m in nesting_list
        )
        self.apply(partial(init_linear_weights, std=init_std))
        self.last_layers = nn.ModuleList(WeightNormLinear(bottleneck_dim, k) for k in self.n_prototypes)

    def level_inputs(self, x: Tensor) -> tuple[Tensor, ...]:
        """The m_j-wide feature each level sees. The ``linear`` projections run as one product with their
        weights stacked (Σ m_j × in_dim), so backward is one product and one sum, not one per level plus
        the accumulation of their input gradients."""
        if self.projection == "slice":
            return tuple(x[..., :m] for m in self.nesting_list)
        projections = list(self.matryoshka_projections)
        weight = torch.cat([p.weight for p in projections])
        bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
        return F.linear(x, weight, bias).split(self.nesting_list, dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(
            last_layer(mlp(level_input))
            for mlp, last_layer, level_input in zip(self.mlps, self.last_layers, self.level_inputs(x))
        )
