"""Resize a teacher checkpoint's position embedding for high-resolution fine-tuning.

The patch part of ``pos_embed`` ``(1, 1 + g², D)`` is viewed as a ``g × g`` grid and resampled
bicubically (antialiased, ``align_corners=False``) to ``G × G`` with ``G = target_img_size //
target_patch_size``; the class-token position is kept as is. Everything else in the file is copied.

    python scripts/modify_ckpt_highres.py --checkpoint_path eval/training_624999/teacher_checkpoint.pth \
        --output_path teacher_518.pth --target_img_size 518 --target_patch_size 14

Then fine-tune with ``student.pretrained_weights=teacher_518.pth train.high_resolution_finetune=true
crops.global_crops_size=518``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from franca.utils.io import atomic_save  # noqa: E402


def resize_pos_embed(pos_embed: torch.Tensor, grid_size: int) -> torch.Tensor:
    """``(1, 1 + g², D)`` → ``(1, 1 + grid_size², D)``: class position kept, patch grid resampled bicubically."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + g*g, D), got {tuple(pos_embed.shape)}")
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    n_patches, dim = patch_pos.shape[1], patch_pos.shape[2]
    old = math.isqrt(n_patches)
    if old * old != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch positions, not a square grid")
    grid = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    resized = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, resized], dim=1)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_path", "--checkpoint-path", required=True, help="input teacher checkpoint")
    parser.add_argument("--output_path", "--output-path", required=True, help="where to write the resized checkpoint")
    parser.add_argument("--target_img_size", "--target-img-size", type=int, default=518)
    parser.add_argument("--target_patch_size", "--target-patch-size", type=int, default=14)
    parser.add_argument("--pos_embed_key", "--pos-embed-key", default="backbone.pos_embed")
    parser.add_argument("--teacher_key", "--teacher-key", default="teacher", help="sub-dict holding the weights")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    source = Path(args.checkpoint_path)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {source}")
    if args.target_img_size % args.target_patch_size:
        raise ValueError(
            f"target_img_size {args.target_img_size} is not a multiple of target_patch_size {args.target_patch_size}"
        )
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    if args.teacher_key not in checkpoint:
        raise KeyError(f"{source} has no '{args.teacher_key}' entry; entries: {', '.join(map(str, checkpoint))}")
    state_dict = checkpoint[args.teacher_key]
    if args.pos_embed_key not in state_dict:
        raise KeyError(f"{source}['{args.teacher_key}'] has no '{args.pos_embed_key}'")
    before = state_dict[args.pos_embed_key]
    state_dict[args.pos_embed_key] = resize_pos_embed(before, args.target_img_size // args.target_patch_size)
    path = atomic_save(checkpoint, args.output_path)
    print(f"{args.pos_embed_key}: {tuple(before.shape)} -> {tuple(state_dict[args.pos_embed_key].shape)}; wrote {path}")
    return path


if __name__ == "__main__":
    main()
