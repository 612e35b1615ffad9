"""Tiny random backbones and RASA heads shared by the export, interop and folding tests."""

from __future__ import annotations

import torch

from franca.layers.rasa_head import RASAHead
from franca.models.vision_transformer import DinoVisionTransformer


def tiny_vit(seed: int = 0, **kwargs) -> DinoVisionTransformer:
    """A tiny ViT (56 px, patch 14, 64 wide, 2 blocks) with non-trivial position embedding, tokens, norm and
    LayerScale; ``kwargs`` override the architecture."""
    torch.manual_seed(seed)
    settings = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=1.0, block_chunks=0)
    model = DinoVisionTransformer(**{**settings, **kwargs})
    with torch.no_grad():
        model.pos_embed.normal_()
        model.cls_token.normal_()
        if model.register_tokens is not None:
            model.register_tokens.normal_()
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.5)
    return model.eval()


def random_rasa_head(dim: int = 64, n_layers: int = 2, seed: int = 1) -> RASAHead:
    """A RASA head of ``n_layers`` fitted read-outs with random N(0, 1/dim) directions."""
    torch.manual_seed(seed)
    head = RASAHead(dim, n_layers)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0, dim**-0.5)
    return head
