"""Checks and files shared by the evaluations: train/val class agreement, results JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset


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
