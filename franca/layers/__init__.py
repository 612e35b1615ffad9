"""Building blocks of the Franca ViT and its heads (DINOv2 module names)."""

from franca.layers.attention import Attention, TokenLayout  # noqa: F401
from franca.layers.block import Block  # noqa: F401
from franca.layers.dino_head import DINOHead  # noqa: F401
from franca.layers.drop_path import DropPath  # noqa: F401
from franca.layers.layer_scale import LayerScale  # noqa: F401
from franca.layers.mlp import Mlp  # noqa: F401
from franca.layers.mrl_dino_head import MRLDINOHead  # noqa: F401
from franca.layers.patch_embed import PatchEmbed  # noqa: F401
from franca.layers.swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused  # noqa: F401
