"""A folded RASA norm split into a plain final LayerNorm plus an affine map on the patch tokens it outputs.

Libraries with a stock ViT (transformers, timm) apply one LayerNorm ``y = w ⊙ x̂ + b`` to every token, so the
patch-only map of ``FoldedLayerNorm`` (``x̂ ↦ x̂ Wₚᵀ + bₚ``) cannot live inside their model. It is re-expressed on
their output instead: with ``x̂ = (y − b) / w``,

    debiased = F.linear(y, A, c),   A = Wₚ diag(1/w),   c = bₚ − A b,

a (D×D, D) map saved beside the model (``weight`` = A, ``bias`` = c) and applied to the patch tokens only.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from franca.layers.folded_norm import FoldedLayerNorm

PATCH_MAP_KEYS = ("weight", "bias")


@torch.no_grad()
def split_folded_norm(backbone: nn.Module) -> tuple[nn.Module, dict[str, Tensor] | None]:
    """``(backbone, None)`` for a plain final norm; for a folded one, a copy with the plain ``LayerNorm`` (the
    class/register affine) and the patch map ``{"weight": A, "bias": c}`` (see module doc)."""
    norm = backbone.norm
    if not isinstance(norm, FoldedLayerNorm):
        return backbone, None
    weight = norm.weight.double()
    if bool((weight == 0).any()):
        raise ValueError("cannot export the folded RASA norm to this format: the final norm has zero weights")
    plain = copy.deepcopy(backbone)
    plain.norm = nn.LayerNorm(norm.normalized_shape[0], eps=norm.eps).to(norm.weight)
    plain.norm.weight.copy_(norm.weight)
    plain.norm.bias.copy_(norm.bias)
    matrix = norm.patch_proj.weight.double() / weight
    bias = norm.patch_proj.bias.double() - matrix @ norm.bias.double()
    return plain, {"weight": matrix.float().contiguous(), "bias": bias.float().contiguous()}


def apply_patch_map(patch_tokens: Tensor, patch_map: dict[str, Tensor] | None) -> Tensor:
    """``F.linear(patch_tokens, A, c)``, or the tokens unchanged without a map."""
    if patch_map is None:
        return patch_tokens
    return torch.nn.functional.linear(patch_tokens, patch_map["weight"], patch_map["bias"])


def split_tokens(tokens: Tensor, registers: int, patch_map: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """A stock ViT's normalised ``[cls, registers, patches]`` tokens (B, 1 + R + N, D) as named outputs, the patch
    map (if any) applied to the patch tokens."""
    outputs = {"cls_token": tokens[:, 0], "patch_tokens": apply_patch_map(tokens[:, 1 + registers :], patch_map)}
    if registers:
        outputs["register_tokens"] = tokens[:, 1 : 1 + registers]
    return outputs
