"""Bake a backbone's position embedding at the export image size, with this project's (DINOv2's) interpolation.

Other libraries resize position embeddings their own way (transformers: bicubic to the output size, no 0.1 offset;
timm and ``Dinov2WithRegistersModel``: antialiased), so their outputs differ from ours whenever the table is
resized. Exporting a table that already has the grid of the requested size makes every library use it unchanged
there:

    pos_embed'  =  interpolate_pos_embed(pos_embed, S/p, S/p, interpolate_offset, interpolate_antialias)

which equals what ``DinoVisionTransformer.interpolate_pos_encoding`` computes for an ``S × S`` image, so the baked
backbone gives the original's outputs at ``S × S`` exactly (at other sizes the baked table is the one resized).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from franca.export.interpolation import interpolate_pos_embed


def native_img_size(backbone: nn.Module) -> int:
    """Side in pixels of the stored position grid: ``√(N − 1) · patch_size``."""
    return math.isqrt(backbone.pos_embed.shape[1] - 1) * backbone.patch_size


@torch.no_grad()
def bake_img_size(backbone: nn.Module, img_size: int) -> nn.Module:
    """``backbone`` itself at its native size, else a copy whose ``pos_embed`` has the ``img_size / p`` grid."""
    if img_size == native_img_size(backbone):
        return backbone
    grid = img_size // backbone.patch_size
    table = interpolate_pos_embed(
        backbone.pos_embed, grid, grid, backbone.interpolate_offset, backbone.interpolate_antialias
    )
    baked = copy.deepcopy(backbone)
    baked.pos_embed = nn.Parameter(table.to(backbone.pos_embed.dtype), requires_grad=False)
    if hasattr(baked.patch_embed, "img_size"):
        baked.patch_embed.img_size = (img_size, img_size)
    return baked
