"""Dataset strings (``Name:key=value:…``) and the DataLoader built around a seeded sampler.

Accepted strings::

    ImageNet:split=TRAIN|VAL|TEST:root=R:extra=E
    ImageNet22k:root=R:extra=E
    LAION:root=DIR                     (webdataset *.tar shards, streamed)
    ImageFolder:root=DIR               (DIR/<class>/<image>)
    VOC2012:root=R:split=S             (segmentation: images + class masks, see datasets/segmentation.py)
    ADE20K:root=R:split=S
    SegFolder:root=DIR                 (DIR/images/<name> with DIR/masks/<name>.png)
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from franca.data.datasets.image_folder import ImageFolder
from franca.data.datasets.image_net import ImageNet
from franca.data.datasets.image_net_22k import ImageNet22k
from franca.data.datasets.laion import LAION
from franca.data.datasets.segmentation import ADE20K, VOC2012, SegFolder, SegmentationDataset
from franca.data.samplers import EpochSampler, InfiniteSampler

logger = logging.getLogger(__name__)

# name -> (class, keys the string must set)
_DATASETS: dict[str, tuple[type, tuple[str, ...]]] = {
    "ImageNet": (ImageNet, ("split", "root", "extra")),
    "ImageNet22k": (ImageNet22k, ("root", "extra")),
    "LAION": (LAION, ("root",)),
    "ImageFolder": (ImageFolder, ("root",)),
    "VOC2012": (VOC2012, ("root", "split")),
    "ADE20K": (ADE20K, ("root", "split")),
    "SegFolder": (SegFolder, ("root",)),
}


class SamplerType(Enum):
    """How indices are drawn. ``SHARDED_INFINITE``/``SHARDED_INFINITE_NEW`` are DINOv2 names for ``INFINITE``;
    ``MULTISHARDSTREAMER`` is the shard stream of iterable datasets (LAION)."""

    DISTRIBUTED = 0
    EPOCH = 1
    INFINITE = 2
    SHARDED_INFINITE = 2
    SHARDED_INFINITE_NEW = 2
    MULTISHARDSTREAMER = 5


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.0)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_dataset_str(dataset_str: str) -> tuple[str, dict[str, str]]:
    """Split ``Name:key=value:…`` into the dataset name and its validated keyword arguments."""
    if not isinstance(dataset_str, str) or not dataset_str.strip():
        raise ValueError(f"dataset string must be 'Name:key=value:...', got {dataset_str!r}")
    name, *tokens = dataset_str.strip().split(":")
    if name not in _DATASETS:
        raise ValueError(
            f"unknown dataset {name!r} in {dataset_str!r}{_closest(name, list(_DATASETS))}; known: {', '.join(_DATASETS)}"
        )
    required = _DATASETS[name][1]
    kwargs: dict[str, str] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"dataset string {dataset_str!r}: expected key=value after the name, got {token!r}")
        if key not in required:
            raise ValueError(
                f"dataset {name} has no key {key!r}{_closest(key, list(required))}; keys: {', '.join(required)}"
            )
        if key in kwargs:
            raise ValueError(f"dataset string {dataset_str!r} sets {key!r} twice")
        kwargs[key] = value
    missing = [key for key in required if key not in kwargs]
    if missing:
        example = ":".join([name, *(f"{k}=..." for k in required)])
        raise ValueError(f"dataset string {dataset_str!r} lacks {', '.join(missing)} (expected {example})")
    return name, kwargs


def make_dataset(
    dataset_str: str,
    transform: Callable | None = None,
    target_transform: Callable | None = None,
    transforms: Callable | None = None,
) -> Dataset:
    """Build the dataset a string names; items are ``(transform(image), target_transform(int target))``.

    ``transforms(image, mask)`` is the paired transform of the segmentation datasets (VOC2012, ADE20K, SegFolder).
    """
    name, kwargs = parse_dataset_str(dataset_str)
    cls = _DATASETS[name][0]
    if transforms is not None:
        if not issubclass(cls, SegmentationDataset):
            raise ValueError(
                f"dataset {name} has no masks: paired image+mask transforms need VOC2012, ADE20K or SegFolder"
            )
        kwargs["transforms"] = transforms
    dataset = cls(transform=transform, target_transform=target_transform, **kwargs)
    try:
        logger.info("dataset %s: %d samples", dataset_str, len(dataset))
    except TypeError:
        logger.info("dataset %s: streamed, length unknown", dataset_str)
    return dataset


def default_sampler_type(dataset: Dataset) -> SamplerType:
    """The training sampler for ``dataset``: the shard stream for iterable datasets, else sharded infinite."""
    return SamplerType.MULTISHARDSTREAMER if isinstance(dataset, IterableDataset) else SamplerType.SHARDED_INFINITE


def _make_sampler(
    dataset: Dataset, sampler_type: SamplerType | None, shuffle: bool, seed: int, size: int, advance: int
) -> Sampler | None:
    if sampler_type is None:
        if advance or size > 0:
            raise ValueError("sampler_size and sampler_advance need a sampler_type")
        return None
    count = len(dataset)
    if sampler_type is SamplerType.INFINITE:
        if size > 0:
            raise ValueError(f"sampler_size={size} is meaningless for an infinite sampler")
        return InfiniteSampler(sample_count=count, shuffle=shuffle, seed=seed, advance=advance)
    if sampler_type is SamplerType.EPOCH:
        return EpochSampler(
            size=size if size > 0 else count, sample_count=count, shuffle=shuffle, seed=seed, advance=advance
        )
    if sampler_type is SamplerType.DISTRIBUTED:
        if size > 0 or advance:
            raise ValueError("the DISTRIBUTED sampler takes neither sampler_size nor sampler_advance")
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return EpochSampler(size=count, sample_count=count, shuffle=shuffle, seed=seed, start=0, step=1)
        return torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
    raise ValueError(f"sampler {sampler_type.name} is for streamed datasets (LAION), not for {type(dataset).__name__}")


def _seed_numpy_in_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own NumPy stream, derived from the torch seed the loader gave it."""
    np.random.seed(torch.initial_seed() % 2**32)


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool = True,
    seed: int = 0,
    sampler_type: SamplerType | None = SamplerType.INFINITE,
    sampler_size: int = -1,
    sampler_advance: int = 0,
    drop_last: bool = True,
    persistent_workers: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` drawing indices from a seeded, rank-aware sampler.

    ``sampler_advance`` is the number of samples this rank already consumed (``iteration × batch_size``
    on resume); the loader then yields exactly what the uninterrupted one would have yielded next.
    Iterable datasets (LAION) shard themselves: they accept ``MULTISHARDSTREAMER`` or ``INFINITE``.
    Memory is pinned when CUDA is available; ``persistent_workers`` applies when ``num_workers > 0``.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
    if isinstance(dataset, IterableDataset):
        if sampler_type not in (SamplerType.MULTISHARDSTREAMER, SamplerType.INFINITE, None):
            raise ValueError(
                f"{type(dataset).__name__} is streamed: use SamplerType.MULTISHARDSTREAMER, not {sampler_type.name}"
            )
        configure = getattr(dataset, "configure_stream", None)
        if configure is not None:
            configure(seed=seed, shuffle=shuffle, advance=sampler_advance, batch_size=batch_size)
        elif sampler_advance:
            raise ValueError(f"{type(dataset).__name__} is streamed and cannot skip ahead (no configure_stream)")
        sampler = None
    else:
        sampler = _make_sampler(dataset, sampler_type, shuffle, seed, sampler_size, sampler_advance)
    logger.info("data loader: sampler %s, batch %d, %d workers", type(sampler).__name__, batch_size, num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=_seed_numpy_in_worker if num_workers > 0 else None,
    )
