"""A training batch from the config alone: random N(0, 1) crops through the real collate and masking.

``random_collated_batch`` is the one random collated batch of the project (tests, benchmarks): crops of the
configured sizes, iBOT masks from :func:`franca.data.masking.masking_options`, collated by
:func:`~franca.data.collate.collate_data_and_cast` exactly as the trainer collates augmented images.
"""

from __future__ import annotations

import random

import torch
from omegaconf import DictConfig

from franca.data.collate import collate_data_and_cast
from franca.data.masking import masking_options
from franca.data.multicrop import N_GLOBAL_CROPS


def random_collated_batch(
    cfg: DictConfig, seed: int = 0, dtype: torch.dtype = torch.float32, batch_size: int | None = None
) -> dict:
    """``batch_size`` (default ``cfg.train.batch_size_per_gpu``) images of random N(0, 1) crops (``N_GLOBAL_CROPS``
    global, ``local_crops_number`` local) collated with the config's masking; crops and masks are drawn from
    ``seed`` (Python ``random`` is reseeded)."""
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    g, lo, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [
        (
            {
                "global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(N_GLOBAL_CROPS)],
                "local_crops": [torch.randn(3, lo, lo, generator=gen) for _ in range(n_local)],
            },
            0,
        )
        for _ in range(cfg.train.batch_size_per_gpu if batch_size is None else batch_size)
    ]
    return collate_data_and_cast(samples, dtype=dtype, **masking_options(cfg))
