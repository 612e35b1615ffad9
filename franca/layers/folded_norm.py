"""The folded final norm: a RASA head composed into the backbone's LayerNorm (no extra cost at inference).

The head is linear: ``head(y) = y @ M`` (``RASAHead.debias_matrix``). The final LayerNorm maps a token to
``y = w ⊙ x̂ + b`` with ``x̂ = (x − μ(x)) / σ(x)``. For patch tokens the two compose into one affine map of ``x̂``:

    head(y) = x̂ @ (diag(w) M) + b @ M  =  F.linear(x̂, Wₚ, bₚ),   Wₚ = Mᵀ diag(w),  bₚ = b @ M,

while the class and register tokens keep ``w ⊙ x̂ + b``. ``FoldedLayerNorm`` is that norm: it standardises every
token once, applies the usual affine to the first ``num_prefix_tokens`` tokens and ``patch_proj`` to the rest.
A folded checkpoint has the plain backbone's keys plus ``norm.patch_proj.weight`` (D×D) and ``norm.patch_proj.bias``
(D); loaders call ``prepare_for_folded_state_dict`` before a strict load so such files load into a plain model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from franca.layers.rasa_head import RASAHead

PATCH_PROJ_KEYS = ("norm.patch_proj.weight", "norm.patch_proj.bias")


class FoldedLayerNorm(nn.Module):
    """LayerNorm over (B, T, D) tokens whose patch tokens (index ≥ ``num_prefix_tokens``) get their own affine map.

    ``out[:, :P] = weight ⊙ x̂ + bias``;  ``out[:, P:] = x̂ @ patch_proj.weightᵀ + patch_proj.bias``.
    """

    def __init__(self, dim: int, num_prefix_tokens: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.normalized_shape = (dim,)
        self.eps = eps
        self.num_prefix_tokens = num_prefix_tokens
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.patch_proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.patch_proj.weight.copy_(torch.eye(dim))
            self.patch_proj.bias.zero_()

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, num_prefix_tokens: int) -> FoldedLayerNorm:
        """A folded norm that equals ``norm`` on every token (identity patch map), on ``norm``'s device and dtype."""
        folded = cls(norm.normalized_shape[0], num_prefix_tokens, eps=norm.eps).to(norm.weight)
        with torch.no_grad():
            folded.weight.copy_(norm.weight)
            folded.bias.copy_(norm.bias)
            folded.patch_proj.weight.copy_(torch.diag(norm.weight))
            folded.patch_proj.bias.copy_(norm.bias)
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(
                f"FoldedLayerNorm needs tokens shaped (B, 1 + R + N, D) to tell patch tokens apart, got {tuple(x.shape)}"
            )
        x_hat = F.layer_norm(x, self.normalized_shape, eps=self.eps)
        prefix = x_hat[:, : self.num_prefix_tokens] * self.weight + self.bias
        patches = F.linear(x_hat[:, self.num_prefix_tokens :], self.patch_proj.weight, self.patch_proj.bias)
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, num_prefix_tokens={self.num_prefix_tokens}"


def _num_prefix_tokens(backbone: nn.Module) -> int:
    return 1 + int(getattr(backbone, "num_register_tokens", 0))


def _as_folded_norm(backbone: nn.Module) -> FoldedLayerNorm:
    norm = backbone.norm
    if isinstance(norm, FoldedLayerNorm):
        return norm
    if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
        raise TypeError(
            f"RASA folding needs a backbone whose final norm is an affine LayerNorm, got {type(norm).__name__}"
        )
    return FoldedLayerNorm.from_layer_norm(norm, _num_prefix_tokens(backbone))


@torch.no_grad()
def fold(backbone: nn.Module, head: RASAHead) -> nn.Module:
    """A deep copy of ``backbone`` whose patch tokens come out as ``head(original patch tokens)``.

    The final norm becomes a ``FoldedLayerNorm`` with ``patch_proj = (Mᵀ diag(w), b @ M)`` (``M`` the head's
    ``debias_matrix``); class and register tokens are untouched. Folding an already folded backbone composes the maps.
    """
    if head.input_dim != backbone.embed_dim:
        raise ValueError(f"RASA head width {head.input_dim} does not match the backbone width {backbone.embed_dim}")
    folded = copy.deepcopy(backbone)
    norm = _as_folded_norm(folded)
    matrix = head.debias_matrix().to(norm.weight).double()
    weight = norm.patch_proj.weight.double()
    bias = norm.patch_proj.bias.double()
    norm.patch_proj.weight.copy_(matrix.T @ weight)
    norm.patch_proj.bias.copy_(bias @ matrix)
    folded.norm = norm
    return folded


def is_folded_state_dict(state_dict: Mapping[str, object]) -> bool:
    """Whether a (prefix-stripped) backbone state dict carries the folded patch-token map."""
    return all(key in state_dict for key in PATCH_PROJ_KEYS)


def prepare_for_folded_state_dict(model: nn.Module, state_dict: Mapping[str, object]) -> nn.Module:
    """Swap ``model.norm`` for a ``FoldedLayerNorm`` when ``state_dict`` has the ``norm.patch_proj.*`` keys (in place;
    returns ``model``). Loaders call this before a strict load so folded files load into a plain architecture."""
    if is_folded_state_dict(state_dict) and not isinstance(model.norm, FoldedLayerNorm):
        model.norm = _as_folded_norm(model)
    return model
