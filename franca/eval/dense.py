"""What the dense evaluations (HummingBird, linear segmentation) share: patch features, RASA, truncation, CLI.

Patch features are the final-norm outputs of the last ``n`` blocks (``get_intermediate_layers``), as a
grid ``(B, n·D, H/p, W/p)``; a folded checkpoint's norm already removes the RASA directions, and
``--rasa HEAD`` folds a RASA head file into the loaded backbone (``franca.layers.folded_norm.fold``).
Matryoshka truncation keeps the first ``m`` coordinates of every block's D features.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from franca.eval.matryoshka import nested_dims
from franca.layers.folded_norm import fold
from franca.layers.rasa_head import load_rasa_head

DENSE_LEVELS = 5  # d, d/2, …, d/16


class PatchFeatures(nn.Module):
    """Images (B, 3, H, W) → normalised patch tokens of the last ``n_last_blocks`` blocks, (B, n·D, H/p, W/p)."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1) -> None:
        super().__init__()
        if not 1 <= n_last_blocks <= backbone.n_blocks:
            raise ValueError(f"cannot use the last {n_last_blocks} blocks of a {backbone.n_blocks}-block backbone")
        self.backbone = backbone
        self.n_last_blocks = n_last_blocks
        self.patch_size = backbone.patch_size
        self.embed_dim = backbone.embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.backbone.get_intermediate_layers(images, self.n_last_blocks, reshape=True)
        return torch.cat(outputs, dim=1).float()


def truncate_blocks(features: torch.Tensor, embed_dim: int, dim: int) -> torch.Tensor:
    """Keep the first ``dim`` of every block's ``embed_dim`` channels: (B, n·D, h, w) → (B, n·dim, h, w)."""
    if dim == embed_dim:
        return features
    batch, channels, height, width = features.shape
    blocks = features.view(batch, channels // embed_dim, embed_dim, height, width)[:, :, :dim]
    return blocks.reshape(batch, -1, height, width)


def apply_rasa_head(backbone: nn.Module, head_path: str | None) -> nn.Module:
    """``backbone`` with the RASA head file ``head_path`` folded into its final norm (unchanged when None)."""
    if head_path is None:
        return backbone
    return fold(backbone, load_rasa_head(head_path, input_dim=backbone.embed_dim)).eval()


def resolve_dims(dims: Sequence[str] | None, embed_dim: int) -> list[int]:
    """``--dims`` values → feature sizes: none → [d]; ``nested`` → d, d/2, …, d/16; else the given integers."""
    if not dims:
        return [embed_dim]
    if list(dims) == ["nested"]:
        return nested_dims(embed_dim, DENSE_LEVELS)
    try:
        values = [int(d) for d in dims]
    except ValueError:
        raise ValueError(f"--dims takes integers or the word 'nested', got {' '.join(dims)}") from None
    bad = [d for d in values if not 1 <= d <= embed_dim]
    if bad:
        raise ValueError(f"--dims {bad} outside 1..{embed_dim} (the backbone width)")
    return list(dict.fromkeys(values))


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on a GPU for a half ``dtype``; full precision otherwise."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def get_dense_args_parser() -> argparse.ArgumentParser:
    """Arguments both dense evaluations take on top of the model and dataset ones."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--rasa", default=None, metavar="HEAD", help="RASA head file folded into the backbone")
    parser.add_argument(
        "--dims", nargs="+", default=None, help="Matryoshka truncation: feature sizes, or 'nested' for d … d/16"
    )
    parser.add_argument("--num-classes", type=int, default=None, help="classes (default: the dataset's, or inferred)")
    return parser
