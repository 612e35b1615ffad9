"""Patch masks for iBOT: random blocks (BEiT), one block, its inverse, and CyclicMask.

A :class:`MaskingGenerator` is built once for a patch grid of ``H × W`` and called with a patch
count ``n``; it returns a boolean ``(H, W)`` numpy array with exactly ``n`` ``True`` entries
(``n = 0`` gives an all-``False`` mask, ``n = H·W`` an all-``True`` one). Randomness comes from
Python's :mod:`random` module, so ``random.seed`` (which PyTorch data-loader workers set per
worker) makes masks reproducible.

Strategies (``use_block_masking``, ``use_inverse_block``, ``roll``):

* ``use_block_masking=False`` — the BEiT/DINOv2 scheme: rectangles of area
  ``U[min_num_patches, max_num_patches]`` and log-uniform aspect ratio are added until ``n``
  patches are covered. If ten rectangle draws in a row add nothing, the remaining patches are
  drawn uniformly among the unmasked ones (the reference stops short instead), so the count is
  always exact.
* ``use_block_masking=True, use_inverse_block=False`` — one rectangle whose area is at least
  ``n`` (aspect ratio log-uniform in ``[min_aspect, max_aspect]``, limited to what fits the grid),
  placed uniformly, of which the first ``n`` cells in row-major order are kept.
* ``use_inverse_block=True`` — the complement of such a block of ``H·W − n`` cells: only a
  rectangle stays visible.
* ``roll=True`` — the block (before inversion) is cyclically shifted by a uniform random offset
  on both axes. With inverse blocks this is the paper's **CyclicMask**: every patch position is
  masked with the same probability, whereas unrolled blocks favour the centre of the grid.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np


class MaskingGenerator:
    """Draw boolean patch masks with an exact number of masked patches (see the module docstring)."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        use_block_masking: bool = True,
        use_inverse_block: bool = True,
        roll: bool = True,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"MaskingGenerator input_size must be positive, got {input_size}")
        if min_aspect <= 0:
            raise ValueError(f"MaskingGenerator min_aspect must be > 0, got {min_aspect}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.use_block_masking = use_block_masking
        self.use_inverse_block = use_inverse_block
        self.roll = roll

    def __repr__(self) -> str:
        if not self.use_block_masking:
            kind = f"random blocks of [{self.min_num_patches} ~ {self.max_num_patches}] patches"
        else:
            kind = ("inverse " if self.use_inverse_block else "") + "block" + (" + roll" if self.roll else "")
        lo, hi = self.log_aspect_ratio
        return f"MaskingGenerator({self.height}x{self.width}, {kind}, log-aspect [{lo:.3f}, {hi:.3f}])"

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """Return a bool ``(H, W)`` mask with exactly ``num_masking_patches`` ``True`` entries."""
        n = int(num_masking_patches)
        if n != num_masking_patches or not 0 <= n <= self.num_patches:
            raise ValueError(
                f"MaskingGenerator: number of patches to mask must be an integer in [0, {self.num_patches}], "
                f"got {num_masking_patches}"
            )
        if n == 0:
            return np.zeros(self.get_shape(), dtype=bool)
        if n == self.num_patches:
            return np.ones(self.get_shape(), dtype=bool)
        if not self.use_block_masking:
            return self._random_blocks(n)
        if self.use_inverse_block:
            return ~self._block(self.num_patches - n)
        return self._block(n)

    def _block(self, n: int) -> np.ndarray:
        """One (optionally rolled) rectangle of at least ``n`` cells, truncated to its first ``n``."""
        height, width = self.height, self.width
        lo = max(self.log_aspect_ratio[0], math.log(n / width**2))
        hi = min(self.log_aspect_ratio[1], math.log(height**2 / (n + 1e-5)))
        aspect = math.exp(random.uniform(min(lo, hi), hi))
        h = min(height, math.ceil(math.sqrt(n * aspect)))
        w = min(width, math.ceil(math.sqrt(n / aspect)))
        if h * w < n:  # the clamp to the grid cut the block: widen it, then heighten it
            w = min(width, math.ceil(n / h))
            h = min(height, math.ceil(n / w))
        top = random.randint(0, height - h) if h < height else 0
        left = random.randint(0, width - w) if w < width else 0
        flat = np.zeros(height * width, dtype=bool)
        rows = np.arange(top, top + h)[:, None] * width + np.arange(left, left + w)[None, :]
        flat[rows.ravel()[:n]] = True
        mask = flat.reshape(height, width)
        if self.roll:
            shift = (random.randint(0, height - 1), random.randint(0, width - 1))
            mask = np.roll(mask, shift, axis=(0, 1))
        return mask

    def _random_blocks(self, n: int) -> np.ndarray:
        """BEiT masking: add random rectangles until ``n`` patches are covered (exact count)."""
        mask = np.zeros(self.get_shape(), dtype=bool)
        cap = n if self.max_num_patches is None else self.max_num_patches
        count = 0
        while count < n:
            added = self._add_rectangle(mask, min(n - count, cap))
            if added == 0:
                free = np.flatnonzero(~mask)
                mask.flat[random.sample(list(free), n - count)] = True
                break
            count += added
        return mask

    def _add_rectangle(self, mask: np.ndarray, max_new: float) -> int:
        """Try up to ten rectangles; mask the first that adds between 1 and ``max_new`` patches."""
        for _ in range(10):
            area = random.uniform(self.min_num_patches, max_new)
            aspect = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_new:
                    region[...] = True
                    return new
        return 0


def make_mask_generator(cfg: Any) -> MaskingGenerator:
    """The iBOT mask generator of a training config: masks over the (S, S) patch grid of a global crop,
    S = ``crops.global_crops_size // student.patch_size``, at most S²/2 patches per rectangle, block / inverse-block
    / roll as ``cfg.train`` says (CyclicMask by default)."""
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return MaskingGenerator(
        input_size=(side, side),
        max_num_patches=0.5 * side * side,
        min_aspect=0.3,
        use_block_masking=cfg.train.use_block_masking,
        use_inverse_block=cfg.train.use_inverse_block,
        roll=cfg.train.roll,
    )


def masking_options(cfg: Any) -> dict[str, Any]:
    """The masking keywords of ``collate_data_and_cast`` / ``collate_encoded`` for a training config:
    ``mask_ratio_tuple`` and ``mask_probability`` from ``cfg.ibot``, ``n_tokens`` = S² patches of a global crop and
    :func:`make_mask_generator`."""
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return {
        "mask_ratio_tuple": tuple(cfg.ibot.mask_ratio_min_max),
        "mask_probability": cfg.ibot.mask_sample_probability,
        "n_tokens": side * side,
        "mask_generator": make_mask_generator(cfg),
    }
