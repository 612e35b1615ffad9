"""Checks, files and collectives shared by the evaluations: train/val class agreement, results JSON, the
gradient mean of the trained heads."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from franca import distributed


def _class_names(dataset: Dataset) -> list[str] | None:
    """Class names in label order when the dataset exposes them (``ImageFolder``-style ``classes``)."""
    names = getattr(dataset, "classes", None)
    return list(names) if names is not None else None


def check_same_classes(train_dataset: Dataset, val_dataset: Dataset) -> None:
    """Raise ``ValueError`` when both splits name their classes and the lists differ (labels would not match)."""
    train_names, val_names = _class_names(train_dataset), _class_names(val_dataset)
    if train_names is None or val_names is None or train_names == val_names:
        return
    only_train = sorted(set(train_names) - set(val_names))
    only_val = sorted(set(val_names) - set(train_names))
    detail = (
        f"only in train: {only_train[:5]}, only in val: {only_val[:5]}"
        if only_train or only_val
        else "same names, different order"
    )
    raise ValueError(
        f"class mismatch between splits: train has {len(train_names)} classes, val has {len(val_names)} ({detail})"
    )


def check_val_labels(train_labels: torch.Tensor, val_labels: torch.Tensor) -> int:
    """Number of classes (max train label + 1); ``ValueError`` when a val label never occurs in the train split."""
    train_classes = set(torch.unique(train_labels).tolist())
    unknown = sorted(set(torch.unique(val_labels).tolist()) - train_classes)
    if unknown:
        raise ValueError(f"class mismatch between splits: val labels {unknown[:10]} never occur in the train split")
    return int(train_labels.max()) + 1


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically (temporary file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks, in one collective over a flat buffer (no-op in one process)."""
    if not (distributed.is_enabled() and distributed.get_world_size() > 1):
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= distributed.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
