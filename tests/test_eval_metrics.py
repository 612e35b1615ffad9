"""Top-k accuracy counting."""

from __future__ import annotations

import pytest
import torch

from franca.eval.metrics import TopkAccuracy, topk_correct


def test_topk_counts_by_hand():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    # sample 0: label ranked 1st; sample 1: 2nd; sample 2: 3rd
    assert topk_correct(scores, labels, (1, 2, 3)).tolist() == [1.0, 2.0, 3.0]
    assert topk_correct(scores, labels, (1, 5)).tolist() == [1.0, 3.0]  # k above the class count = all classes


def test_accumulates_over_batches_in_percent():
    meter = TopkAccuracy()
    meter.update(torch.eye(4), torch.arange(4))
    meter.update(torch.eye(4), torch.tensor([1, 2, 3, 0]))
    assert meter.compute() == {"top-1": 50.0, "top-5": 100.0}
    with pytest.raises(ValueError, match="the validation dataset is empty"):
        TopkAccuracy().compute()
    with pytest.raises(ValueError, match=r"expected scores \(N, C\) and labels \(N,\)"):
        topk_correct(torch.zeros(3, 2), torch.zeros(2))
