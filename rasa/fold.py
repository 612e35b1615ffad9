"""Fold a RASA head into a backbone's final norm, so a plain backbone returns debiased patch tokens.

The folded norm itself (``FoldedLayerNorm``, ``fold``) is an inference layer and lives in
``franca.layers.folded_norm``; this module adds the checkpoint side of the post-training.

Checkpoint format: the official teacher file ``{"teacher": {"backbone.<key>": tensor}}`` of the folded model. Its
keys are those of the plain backbone plus exactly one extra set:

* ``backbone.norm.weight`` / ``backbone.norm.bias`` (D): unchanged, used for the class and register tokens;
* ``backbone.norm.patch_proj.weight`` (D×D) and ``backbone.norm.patch_proj.bias`` (D): the patch-token map.

``load_folded_backbone`` builds the architecture, swaps in ``FoldedLayerNorm`` and loads such a file strictly.
Everything that calls the backbone's ``norm`` sees the folded map: ``forward_features`` (``x_norm_patchtokens``,
also for masked and multi-crop inputs) and ``get_intermediate_layers(..., norm=True)`` (every returned layer).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from franca.hub.loading import backbone_state_dict, load_backbone_weights, read_checkpoint
from franca.layers.folded_norm import (
    PATCH_PROJ_KEYS,
    FoldedLayerNorm,
    fold,
    is_folded_state_dict,
    prepare_for_folded_state_dict,
)
from franca.models import get_architecture
from franca.utils.io import atomic_save

__all__ = [
    "PATCH_PROJ_KEYS",
    "FoldedLayerNorm",
    "fold",
    "folded_teacher_state_dict",
    "is_folded_state_dict",
    "load_folded_backbone",
    "prepare_for_folded_state_dict",
    "save_folded_backbone",
]


def folded_teacher_state_dict(backbone: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{"teacher": {"backbone.<key>": tensor}}``, the official release format, of a (folded) backbone."""
    return {"teacher": {f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()}}


def save_folded_backbone(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Write ``folded_teacher_state_dict(backbone)`` to ``path``."""
    atomic_save(folded_teacher_state_dict(backbone), path)


def load_folded_backbone(path: str | os.PathLike, arch: str = "vit_base", **arch_kwargs) -> nn.Module:
    """Build ``franca.models.vision_transformer.<arch>(**arch_kwargs)`` and load a (folded or plain) checkpoint.

    The file is read by ``franca.hub.loading`` (``teacher``/``backbone.`` prefixes, chunked or flat blocks, strict).
    """
    builder = get_architecture(arch)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    state_dict = backbone_state_dict(read_checkpoint(path))
    model = prepare_for_folded_state_dict(builder(**arch_kwargs), state_dict)
    load_backbone_weights(model, state_dict)
    return model
