"""Logistic regression: backend choice (cuML absent → scikit-learn), the C sweep, results format."""

from __future__ import annotations

import sys

import torch
from torch.utils.data import TensorDataset

from franca.eval import log_regression
from franca.eval.log_regression import LogisticRegressionProbe, eval_log_regression, select_backend, sweep_c


def _blobs(n: int, seed: int, dim: int = 8, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.eye(classes, dim)
    labels = torch.arange(classes).repeat(n)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_sklearn_is_used_when_cuml_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuml", None)  # makes `import cuml…` raise ImportError
    monkeypatch.setitem(sys.modules, "cuml.linear_model", None)
    assert log_regression._cuml_class() is None
    assert select_backend("cuda") == "sklearn"
    assert select_backend("cpu") == "sklearn"
    probe = LogisticRegressionProbe(1.0, "sklearn")
    assert type(probe.estimator).__module__.startswith("sklearn.")


def test_cpu_features_never_use_cuml(monkeypatch):
    monkeypatch.setattr(log_regression, "_cuml_class", lambda: object)
    assert select_backend("cpu") == "sklearn"
    assert select_backend("cuda:0") == "cuml"


def test_probabilities_are_aligned_to_all_classes():
    features, labels = _blobs(10, 0)
    keep = labels != 1  # class 1 absent from the fit
    probe = LogisticRegressionProbe(1.0, "sklearn").fit(features[keep], labels[keep])
    probas = probe.predict_proba(features, num_classes=3)
    assert probas.shape == (30, 3)
    assert probas[:, 1].abs().max() == 0
    torch.testing.assert_close(probas.sum(1), torch.ones(30, dtype=probas.dtype))


def test_sweep_prefers_useful_regularisation():
    # imbalanced train split: under a very strong penalty the intercept wins and every point is class 0
    features, labels = _blobs(20, 0)
    keep = (labels == 0) | (torch.arange(len(labels)) < 15)
    train, held_out = (features[keep], labels[keep]), _blobs(10, 1)
    best_c, scores = sweep_c(train, held_out, num_classes=3, backend="sklearn", c_values=[1e-6, 1.0, 10.0])
    assert list(scores) == [1e-6, 1.0, 10.0]
    assert abs(scores[1e-6] - 100.0 / 3) < 1e-6
    assert scores[1.0] == scores[10.0] == 100.0
    assert best_c == 1.0  # the smaller C wins a tie


def test_eval_log_regression_results_format(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuml", None)
    train, val = _blobs(20, 0), _blobs(10, 1)
    as_images = [TensorDataset(f.view(-1, 2, 2, 2), y) for f, y in (train, val)]
    results = eval_log_regression(torch.nn.Flatten(), *as_images, batch_size=16, c_values=[1e-4, 1.0], max_iter=200)
    assert set(results) == {"top-1", "top-5", "best_C", "backend", "held_out_top1"}
    assert results["backend"] == "sklearn"
    assert results["top-1"] == 100.0 and results["top-5"] == 100.0
    assert results["best_C"] == 1.0 and list(results["held_out_top1"]) == ["0.0001", "1.0"]
