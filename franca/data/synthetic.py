"""The training batch of a config, from the config alone: the CyclicMask generator and random crops.

``make_mask_generator(cfg)`` is the one mask generator the trainer and every synthetic batch use;
``random_collated_batch`` sends N(0, 1) crops of the configured sizes through it and the real
``collate_data_and_cast`` (for tests and benchmarks that need a step's input without images).
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig

from franca.data.collate import collate_data_and_cast
from franca.data.masking import MaskingGenerator


def make_mask_generator(cfg: DictConfig) -> MaskingGenerator:
    """Masks over the (S, S) patch grid of a global crop, S = global_crops_size // patch_size, at most S²/2
    patches, block / inverse-block / roll as ``cfg.train`` says (CyclicMask by default)."""
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return MaskingGenerator(
        input_size=(side, side),
        max_num_patches=0.5 * side * side,
        min_aspect=0.3,
        use_block_masking=cfg.train.use_block_masking,
        use_inverse_block=cfg.train.use_inverse_block,
        roll=cfg.train.roll,
    )


def random_collated_batch(cfg: DictConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """``cfg.train.batch_size_per_gpu`` images of random N(0, 1) crops (2 global, ``local_crops_number`` local)
    collated with the config's masking; crops and masks are drawn from ``seed`` (Python ``random`` is reseeded)."""
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g, lo, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, lo, lo, generator=gen) for _ in range(n_local)],
            },
            0,
        )
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    side = g // cfg.student.patch_size
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=dtype,
        n_tokens=side * side,
        mask_generator=make_mask_generator(cfg),
    )
