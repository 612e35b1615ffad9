"""Matryoshka truncation: nested sizes, the first-m-coordinates rule, the printed table."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from franca.eval.matryoshka import eval_matryoshka, format_table, nested_dims, truncated_knn


def test_nested_dims():
    assert nested_dims(768) == [768, 384, 192, 96, 48, 24, 12]
    assert nested_dims(64) == [64, 32, 16, 8, 4, 2, 1]
    assert nested_dims(16) == [16, 8, 4, 2, 1]  # sizes below 1 dropped
    assert nested_dims(100, levels=3) == [100, 50, 25]
    with pytest.raises(ValueError, match="feature dimension >= 1"):
        nested_dims(0)


def _features_with_signal_in(coords: slice, n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise everywhere; the class is written (±3) into the coordinates ``coords`` only."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat(n)
    features = torch.randn(len(labels), dim, generator=g)
    features[:, coords] += 3.0 * (2.0 * labels[:, None] - 1.0)
    return features, labels


def test_truncation_keeps_the_leading_coordinates():
    dims = nested_dims(64)
    front = truncated_knn(
        *_features_with_signal_in(slice(0, 8), 60, 64, 0),
        *_features_with_signal_in(slice(0, 8), 60, 64, 1),
        dims,
        nb_knn=[10],
    )
    back = truncated_knn(
        *_features_with_signal_in(slice(32, 64), 60, 64, 0),
        *_features_with_signal_in(slice(32, 64), 60, 64, 1),
        dims,
        nb_knn=[10],
    )
    assert list(front) == [str(m) for m in dims]
    # signal in the first 8 coordinates survives every cut down to 8 features
    assert all(front[str(m)]["10"]["top-1"] == 100.0 for m in (64, 32, 16, 8))
    # signal in the last half is lost as soon as the last half is cut away
    assert back["64"]["10"]["top-1"] == 100.0
    assert all(30.0 < back[str(m)]["10"]["top-1"] < 70.0 for m in (32, 16, 8))


def test_table_has_one_row_per_size_and_one_column_per_k():
    train = _features_with_signal_in(slice(0, 4), 20, 16, 0)
    val = _features_with_signal_in(slice(0, 4), 20, 16, 1)
    results = truncated_knn(*train, *val, nested_dims(16), nb_knn=[5, 10])
    lines = format_table(results).splitlines()
    assert len(lines) == 2 + 5
    assert "k=5 top-1" in lines[0] and "k=10 top-1" in lines[0]
    assert [line.split("|")[0].strip() for line in lines[2:]] == ["16", "8", "4", "2", "1"]
    assert all(len(line.split("|")) == 3 for line in lines[2:])


class _Flatten(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) * self.scale


def test_eval_matryoshka_any_backbone():
    train = _features_with_signal_in(slice(0, 8), 10, 32, 0)
    val = _features_with_signal_in(slice(0, 8), 10, 32, 1)
    as_images = [TensorDataset(f.view(-1, 2, 4, 4), y) for f, y in (train, val)]
    results = eval_matryoshka(_Flatten(), *as_images, nb_knn=[3], batch_size=6, levels=3)
    assert list(results) == ["32", "16", "8"]
    assert all(per_k["3"]["top-1"] == 100.0 for per_k in results.values())
