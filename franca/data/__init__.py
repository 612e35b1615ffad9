"""Data pipeline: datasets and loaders, multi-crop augmentation, iBOT masks, batch collation.

Names are resolved lazily (``from franca.data import DataAugmentationDINO`` imports only what it
needs), so importing ``franca.data`` stays cheap in data-loader workers and tools.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataAugmentationDINO": "franca.data.augmentations",
    "collate_data_and_cast": "franca.data.collate",
    "MaskingGenerator": "franca.data.masking",
    "make_mask_generator": "franca.data.masking",
    "MultiCropDistribution": "franca.data.multicrop",
    "N_GLOBAL_CROPS": "franca.data.multicrop",
    "make_classification_eval_transform": "franca.data.transforms",
    "make_classification_train_transform": "franca.data.transforms",
    "make_normalize_transform": "franca.data.transforms",
    "make_dataset": "franca.data.loaders",
    "make_data_loader": "franca.data.loaders",
    "SamplerType": "franca.data.loaders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'franca.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
