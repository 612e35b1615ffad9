"""What an exporter to another library needs to know about a backbone, read from its modules and weights.

``flat_state_dict`` gives the DINOv2 key names with flat block indices (``blocks.<i>.…`` whatever
``block_chunks`` is); ``describe`` the architecture: width, depth, heads, patch size, registers, FFN kind and hidden
width, biases, LayerScale and the LayerNorm epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class BackboneLayout:
    """Architecture of a ``DinoVisionTransformer`` as other ViT implementations parametrise it."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    num_register_tokens: int
    swiglu: bool
    hidden_features: int  # SwiGLU: width of each of the two halves of w12; MLP: fc1 output width
    qkv_bias: bool
    proj_bias: bool
    ffn_bias: bool
    layerscale: bool
    eps: float


def flat_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """Backbone weights under the flat DINOv2 names (``blocks.<i>.…``), detached."""
    out = {}
    for key, value in backbone.state_dict().items():
        if not key.startswith("blocks."):
            out[key] = value.detach()
    for index, block in enumerate(backbone.block_list()):
        for key, value in block.state_dict().items():
            out[f"blocks.{index}.{key}"] = value.detach()
    return out


def describe(backbone: nn.Module) -> BackboneLayout:
    """The layout of ``backbone`` (a ``ValueError`` for an FFN kind other than MLP or SwiGLU)."""
    block = backbone.block_list()[0]
    mlp = block.mlp
    if hasattr(mlp, "w12"):
        swiglu, hidden, ffn_bias = True, mlp.w3.in_features, mlp.w3.bias is not None
    elif hasattr(mlp, "fc1"):
        swiglu, hidden, ffn_bias = False, mlp.fc1.out_features, mlp.fc2.bias is not None
    else:
        raise ValueError(f"cannot export a backbone whose FFN is {type(mlp).__name__} (only MLP and SwiGLU)")
    return BackboneLayout(
        embed_dim=backbone.embed_dim,
        depth=len(backbone.block_list()),
        num_heads=backbone.num_heads,
        patch_size=backbone.patch_size,
        num_register_tokens=backbone.num_register_tokens,
        swiglu=swiglu,
        hidden_features=hidden,
        qkv_bias=block.attn.qkv.bias is not None,
        proj_bias=block.attn.proj.bias is not None,
        ffn_bias=ffn_bias,
        layerscale=hasattr(block.ls1, "gamma"),
        eps=block.norm1.eps,
    )
