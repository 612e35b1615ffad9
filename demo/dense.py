"""The demo's dense evaluations: in-context (HummingBird) and linear segmentation of the drawn shapes.

The demo dataset writes the mask of every shape (0 = background, 1 + class = the shape, 11 classes), read
as ``SegFolder:root=<data>/segmentation/<split>``. In-context mIoU is measured for the random-init network,
the trained teacher and the teacher with its RASA head folded in; the linear-segmentation mIoU for the
trained teacher. Crops are the training's global crop size. To keep ``make demo`` short the train side
of both evaluations uses the first ``DENSE_TRAIN_PER_CLASS`` training images of each class (the held-out
split is used whole) and the memory keeps every patch of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Subset

from franca.data.datasets.demo import NUM_SEGMENTATION_CLASSES, SEGMENTATION_DIR
from franca.data.segmentation_transforms import HBIRD_CROP_SCALE
from franca.eval.hummingbird import eval_hummingbird, make_segmentation_datasets
from franca.eval.linear_seg import run_linear_seg

logger = logging.getLogger("demo")

DENSE_TRAIN_PER_CLASS = 100
LINEAR_SEG_EPOCHS = 2
LINEAR_SEG_LEARNING_RATES = (0.01, 0.03, 0.1)


def hummingbird_miou_per_dim(model: torch.nn.Module, data_root: Path, size: int, dims=None) -> dict[str, float]:
    """In-context mIoU (%) on the held-out masks per kept dimension (default: the full width)."""
    train, val = _datasets(data_root, size, hflip=False)
    results = eval_hummingbird(model, train, val, NUM_SEGMENTATION_CLASSES, dims, memory_size=None, batch_size=128)
    return {m: r["mIoU"] for m, r in results.items()}


def hummingbird_miou(model: torch.nn.Module, data_root: Path, size: int) -> float:
    """In-context mIoU (%) of the full-width features, with a memory of every augmented train patch."""
    return hummingbird_miou_per_dim(model, data_root, size)[str(model.embed_dim)]


def linear_seg_miou(model: torch.nn.Module, data_root: Path, size: int, out_dir: Path) -> float:
    """Best linear-segmentation mIoU (%) of a small lr grid trained for a few epochs on the frozen model."""
    train, val = _datasets(data_root, size, hflip=True)
    results = run_linear_seg(
        model,
        train,
        val,
        NUM_SEGMENTATION_CLASSES,
        out_dir,
        learning_rates=LINEAR_SEG_LEARNING_RATES,
        epochs=LINEAR_SEG_EPOCHS,
        batch_size=64,
    )
    return results["best"][str(model.embed_dim)]["mIoU"]


def first_per_class(dataset, per_class: int) -> Subset:
    """The first ``per_class`` items of each class folder of a ``SegFolder`` (its pairs are sorted by path)."""
    seen: dict[str, int] = {}
    keep = []
    for index, (image, _) in enumerate(dataset.pairs):
        count = seen.get(image.parent.name, 0)
        if count < per_class:
            keep.append(index)
        seen[image.parent.name] = count + 1
    return Subset(dataset, keep)


def _datasets(data_root: Path, size: int, hflip: bool):
    split = data_root / SEGMENTATION_DIR
    train, val = make_segmentation_datasets(
        f"SegFolder:root={split / 'train'}", f"SegFolder:root={split / 'val'}", size, HBIRD_CROP_SCALE, hflip=hflip
    )
    return first_per_class(train, DENSE_TRAIN_PER_CLASS), val


def run_dense_evals(
    random_model: torch.nn.Module,
    teacher: torch.nn.Module,
    rasa_teacher: torch.nn.Module,
    data_root: Path,
    size: int,
    out: Path,
) -> dict[str, float]:
    """The four dense summary figures, also written to ``out/dense_eval.json``."""
    results = {}
    for key, model in (
        ("hummingbird_miou_random_init", random_model),
        ("hummingbird_miou_trained", teacher),
        ("hummingbird_miou_rasa", rasa_teacher),
    ):
        results[key] = hummingbird_miou(model.eval(), data_root, size)
        logger.info("dense: %s = %.2f", key, results[key])
    results["linear_seg_miou_trained"] = linear_seg_miou(teacher, data_root, size, out / "linear_seg")
    (out / "dense_eval.json").write_text(json.dumps(results, indent=2))
    return results
