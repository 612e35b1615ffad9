"""Datasets readable through ``franca.data.loaders.make_dataset`` and the embedded demo data.

Names resolve lazily, so ``python -m franca.data.datasets.<module>`` (the index and demo commands)
runs its module without importing it twice.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEMO_CLASSES": "franca.data.datasets.demo",
    "write_demo_dataset": "franca.data.datasets.demo",
    "UNLABELLED": "franca.data.datasets.extended",
    "ExtendedVisionDataset": "franca.data.datasets.extended",
    "ImageFolder": "franca.data.datasets.image_folder",
    "ImageNet": "franca.data.datasets.image_net",
    "ImageNet22k": "franca.data.datasets.image_net_22k",
    "LAION": "franca.data.datasets.laion",
    "ADE20K": "franca.data.datasets.segmentation",
    "SegFolder": "franca.data.datasets.segmentation",
    "VOC2012": "franca.data.datasets.segmentation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'franca.data.datasets' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
