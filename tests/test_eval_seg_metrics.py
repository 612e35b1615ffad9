"""Segmentation metrics against a confusion matrix computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from franca.eval.seg_metrics import SegmentationMeter, confusion_matrix, iou_per_class, mean_iou


def test_confusion_matrix_iou_and_miou_by_hand() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    # rows = true class, columns = predicted; the 255 pixel (predicted 0) is left out
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    conf = confusion_matrix(pred, target, num_classes=3)
    assert torch.equal(conf, expected)
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (3 + 3 - 2), IoU_2 = 1 / (2 + 2 - 1)
    assert iou_per_class(conf).tolist() == pytest.approx([1 / 3, 2 / 4, 1 / 3])
    assert mean_iou(conf) == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3)


def test_absent_class_has_no_iou_and_meter_accumulates() -> None:
    meter = SegmentationMeter(num_classes=4)
    meter.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    meter.update(torch.tensor([1, 0]), torch.tensor([1, 255]))
    result = meter.compute()
    assert result["mIoU"] == pytest.approx(100.0)  # classes 2 and 3 neither occur nor are predicted
    assert result["per_class_iou"][:2] == [100.0, 100.0] and result["per_class_iou"][2:] == [None, None]
    assert result["pixel_accuracy"] == pytest.approx(100.0)
    assert math.isnan(iou_per_class(meter.conf)[3].item())


def test_labels_out_of_range_are_an_error() -> None:
    with pytest.raises(ValueError, match="target labels"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=3)
    with pytest.raises(ValueError, match="every pixel is ignored"):
        mean_iou(torch.zeros(3, 3, dtype=torch.int64))
