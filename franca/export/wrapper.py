"""The deployable view of a backbone: one input (the image batch), named token outputs, no mask path.

``ExportableBackbone(backbone)(images)`` returns ``{"cls_token": (B, D), "patch_tokens": (B, N, D)}`` (plus
``"register_tokens": (B, R, D)`` when the model has R > 0 registers), equal to ``forward_features(images)``'s
``x_norm_clstoken`` / ``x_norm_patchtokens`` / ``x_norm_regtokens``. A folded RASA norm (``rasa.fold``) is just the
backbone's ``norm`` and comes along unchanged.

Two things differ from ``forward_features`` so that traced graphs stay valid for every batch size and image size:
the tokens go through the blocks as one ``(B, T, D)`` tensor (the multi-crop packing reads sizes as Python ints,
which tracing freezes), and the position embedding is resized by :func:`interpolate_pos_embed`, which keeps the
resize in the graph. Tokens are laid out as in ``DinoVisionTransformer.prepare_tokens_with_masks``:
``[cls, registers, patches]``, position embedding added to the class and patch tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from franca.export.interpolation import interpolate_pos_embed

INPUT_NAME = "images"


class ExportableBackbone(nn.Module):
    """``images (B, 3, H, W)`` → dict of normalised ``cls_token``, ``patch_tokens`` [, ``register_tokens``].

    ``H`` and ``W`` must be multiples of ``backbone.patch_size``; patch tokens are in row-major grid order. With
    ``static_size`` the stored position embedding is added as it is (no resize in the graph), so images must have
    the stored grid (a table baked at the export size, ``franca.export.baking``).
    """

    def __init__(self, backbone: nn.Module, static_size: bool = False) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.static_size = static_size

    @property
    def output_names(self) -> tuple[str, ...]:
        """Output names in graph order."""
        names = ("cls_token", "patch_tokens")
        return names + ("register_tokens",) if self.backbone.num_register_tokens else names

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        model = self.backbone
        batch = images.shape[0]
        rows = images.shape[-2] // model.patch_size
        cols = images.shape[-1] // model.patch_size
        tokens = torch.cat((model.cls_token.expand(batch, -1, -1), model.patch_embed(images)), dim=1)
        if self.static_size:
            pos_embed = model.pos_embed
        else:
            pos_embed = interpolate_pos_embed(
                model.pos_embed, rows, cols, model.interpolate_offset, model.interpolate_antialias
            )
        tokens = tokens + pos_embed.to(tokens.dtype)
        registers = model.num_register_tokens
        if registers:
            tokens = torch.cat((tokens[:, :1], model.register_tokens.expand(batch, -1, -1), tokens[:, 1:]), dim=1)
        for block in model.block_list():
            tokens = block(tokens)
        tokens = model.norm(tokens)
        outputs = {"cls_token": tokens[:, 0], "patch_tokens": tokens[:, 1 + registers :]}
        if registers:
            outputs["register_tokens"] = tokens[:, 1 : 1 + registers]
        return outputs
