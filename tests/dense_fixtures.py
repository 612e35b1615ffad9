"""Synthetic segmentation data for the dense-evaluation tests: the mask is a known function of the pixels.

Each 8×8 patch of a 32×32 image is filled with one of four colours drawn at random; the mask holds the
colour's index. ``PixelProjection`` is a stand-in backbone whose patch features are a fixed linear map of
the patch's mean colour (so it encodes the mask exactly), or, with ``shuffle``, the features of randomly
permuted positions (independent of the mask at each position).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from franca.data.loaders import make_dataset
from franca.data.segmentation_transforms import make_segmentation_eval_transform

COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=np.uint8)
PATCH = 8
SIZE = 32


def write_colour_patch_folder(root: Path, n_images: int, seed: int) -> Path:
    """A SegFolder tree ``root/images/*.png`` + ``root/masks/*.png`` of colour-patch images."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    grid = SIZE // PATCH
    for n in range(n_images):
        labels = rng.integers(len(COLOURS), size=(grid, grid))
        mask = np.kron(labels, np.ones((PATCH, PATCH), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(COLOURS[mask]).save(root / "images" / f"img_{n:03d}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img_{n:03d}.png")
    return root


def write_colour_patch_splits(root: Path, n_train: int, n_val: int) -> Path:
    """``root/train`` (seed 0) and ``root/val`` (seed 1) colour-patch SegFolder trees."""
    write_colour_patch_folder(root / "train", n_train, seed=0)
    write_colour_patch_folder(root / "val", n_val, seed=1)
    return root


def colour_patch_datasets(root: Path) -> tuple[Dataset, Dataset]:
    """The ``SegFolder`` train and val datasets of :func:`write_colour_patch_splits` at the eval transform."""
    transform = make_segmentation_eval_transform(SIZE)
    return (
        make_dataset(f"SegFolder:root={root / 'train'}", transforms=transform),
        make_dataset(f"SegFolder:root={root / 'val'}", transforms=transform),
    )


class PixelProjection(nn.Module):
    """A backbone stand-in: patch features = fixed projection of the patch's mean colour (optionally shuffled)."""

    def __init__(self, embed_dim: int = 16, shuffle: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(3, embed_dim, generator=generator))
        self.embed_dim, self.patch_size, self.n_blocks = embed_dim, PATCH, 1
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(1)

    def get_intermediate_layers(self, images: torch.Tensor, n: int = 1, reshape: bool = True) -> tuple[torch.Tensor]:
        pooled = F.avg_pool2d(images, self.patch_size)  # (B, 3, h, w)
        features = torch.einsum("bchw,cd->bdhw", pooled, self.projection)
        if self.shuffle:
            batch, dim, rows, cols = features.shape
            flat = features.flatten(2)
            order = torch.stack([torch.randperm(rows * cols, generator=self.generator) for _ in range(batch)])
            flat = flat.gather(2, order[:, None, :].expand(-1, dim, -1))
            features = flat.view(batch, dim, rows, cols)
        return (features,)
