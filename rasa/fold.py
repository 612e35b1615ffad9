"""Fold a RASA head into a backbone's final norm, so a plain backbone returns debiased patch tokens.

The head is linear: ``head(y) = y @ M`` (``RASAHead.debias_matrix``). The final LayerNorm maps a token to
``y = w ⊙ x̂ + b`` with ``x̂ = (x − μ(x)) / σ(x)``. For patch tokens the two compose into one affine map of ``x̂``:

    head(y) = x̂ @ (diag(w) M) + b @ M  =  F.linear(x̂, Wₚ, bₚ),   Wₚ = Mᵀ diag(w),  bₚ = b @ M,

while the class and register tokens keep ``w ⊙ x̂ + b``. ``FoldedLayerNorm`` is that norm: it standardises every
token once, applies the usual affine to the first ``num_prefix_tokens`` tokens and ``patch_proj`` to the rest.

Checkpoint format: the official teacher file ``{"teacher": {"backbone.<key>": tensor}}`` of the folded model. Its
keys are those of the plain backbone plus exactly one extra set:

* ``backbone.norm.weight`` / ``backbone.norm.bias`` (D): unchanged, used for the class and register tokens;
* ``backbone.norm.patch_proj.weight`` (D×D) and ``backbone.norm.patch_proj.bias`` (D): the patch-token map.

``load_folded_backbone`` builds the architecture, swaps in ``FoldedLayerNorm`` and loads such a file strictly.
Everything that calls the backbone's ``norm`` sees the folded map: ``forward_features`` (``x_norm_patchtokens``,
also for masked and multi-crop inputs) and ``get_intermediate_layers(..., norm=True)`` (every returned layer).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from rasa.src.rasa_head import RASAHead

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


def folded_teacher_state_dict(backbone: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{"teacher": {"backbone.<key>": tensor}}``, the official release format, of a (folded) backbone."""
    return {"teacher": {f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()}}


def save_folded_backbone(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Write ``folded_teacher_state_dict(backbone)`` to ``path``."""
    torch.save(folded_teacher_state_dict(backbone), path)


def is_folded_state_dict(state_dict: Mapping[str, object]) -> bool:
    """Whether a (prefix-stripped) backbone state dict carries the folded patch-token map."""
    return all(key in state_dict for key in PATCH_PROJ_KEYS)


def prepare_for_folded_state_dict(model: nn.Module, state_dict: Mapping[str, object]) -> nn.Module:
    """Swap ``model.norm`` for a ``FoldedLayerNorm`` when ``state_dict`` has the ``norm.patch_proj.*`` keys (in place;
    returns ``model``). Loaders call this before a strict load so folded files load into a plain architecture."""
    if is_folded_state_dict(state_dict) and not isinstance(model.norm, FoldedLayerNorm):
        model.norm = _as_folded_norm(model)
    return model


def resolve_architecture(arch: str) -> Callable[..., nn.Module]:
    """The builder ``franca.models.vision_transformer.<arch>`` (a ``vit_*`` function or ``DinoVisionTransformer``)."""
    from franca.models import vision_transformer

    builder = getattr(vision_transformer, arch, None)
    if not callable(builder):
        raise ValueError(f"unknown architecture {arch!r}: not defined in franca.models.vision_transformer")
    return builder


def load_folded_backbone(path: str | os.PathLike, arch: str = "vit_base", **arch_kwargs) -> nn.Module:
    """Build ``franca.models.vision_transformer.<arch>(**arch_kwargs)`` and load a (folded or plain) checkpoint.

    The file is read by ``franca.hub.loading`` (``teacher``/``backbone.`` prefixes, chunked or flat blocks, strict).
    """
    from franca.hub.loading import backbone_state_dict, load_backbone_weights, read_checkpoint

    builder = resolve_architecture(arch)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    state_dict = backbone_state_dict(read_checkpoint(path))
    model = prepare_for_folded_state_dict(builder(**arch_kwargs), state_dict)
    load_backbone_weights(model, state_dict)
    return model
