"""Semantic-segmentation metrics: a confusion matrix over pixels → per-class IoU and mIoU.

``conf[t, p]`` counts the pixels of true class ``t`` predicted as ``p``; pixels labelled
``ignore_index`` (255, VOC's object borders and ADE20K's "other") are left out. For class ``c``:
``IoU_c = conf[c, c] / (Σ_p conf[c, p] + Σ_t conf[t, c] − conf[c, c])``; mIoU is the mean over the
classes whose union is not empty (a class that neither occurs nor is predicted has no IoU). Counts
are summed over ranks before the ratios are taken.
"""

from __future__ import annotations

import torch

from franca import distributed

IGNORE_INDEX = 255


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``(C, C)`` int64 counts ``conf[target, pred]`` over the pixels of ``pred``/``target`` (same shape)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} shapes differ")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long().to(target.device)
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target labels must lie in [0, {num_classes}) or be {ignore_index}, found {sorted(target.unique().tolist())[:10]}"
        )
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of every class (C,) float64 from a confusion matrix; NaN where the union is empty."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(conf: torch.Tensor) -> float:
    """mIoU (%) over the classes with a non-empty union."""
    ious = iou_per_class(conf)
    valid = ~ious.isnan()
    if not valid.any():
        raise ValueError("no labelled pixel was evaluated: every pixel is ignored or the split is empty")
    return 100.0 * ious[valid].mean().item()


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; :meth:`compute` sums it over ranks."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.conf += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def compute(self) -> dict[str, object]:
        """``{"mIoU": %, "pixel_accuracy": %, "per_class_iou": [% or None]}`` over every rank's pixels."""
        conf = self.conf.clone()
        if distributed.is_enabled():
            on_gpu = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
            conf = conf.to(device)
            torch.distributed.all_reduce(conf)
            conf = conf.cpu()
        ious = iou_per_class(conf)
        total = conf.sum().item()
        return {
            "mIoU": mean_iou(conf),
            "pixel_accuracy": 100.0 * conf.diagonal().sum().item() / max(total, 1),
            "per_class_iou": [None if v != v else 100.0 * v for v in ious.tolist()],
        }
