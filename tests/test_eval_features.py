"""Feature extraction: order, batching, labels, shards (two real processes: test_eval_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from franca.eval.features import extract_features, shard_indices


class _Items(Dataset):
    """Item i is an image filled with the value i, labelled i % 3 (an int, as datasets return)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((3, 2, 2), float(i)), i % 3


def _pixel_mean(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([images.mean(dim=(1, 2, 3)), -images.mean(dim=(1, 2, 3))], dim=1)


def test_shards_cover_every_index_once():
    for n, w in [(10, 3), (7, 2), (1, 4), (8, 8)]:
        parts = [list(shard_indices(n, r, w)) for r in range(w)]
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_features_in_dataset_order_whatever_the_batching(batch_size):
    features, labels = extract_features(_pixel_mean, _Items(10), batch_size=batch_size)
    assert features.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(features[:, 0], torch.arange(10.0))
    assert labels.tolist() == [i % 3 for i in range(10)]


def test_model_runs_in_eval_mode_without_gradients():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(12, 4)).train()
    data = TensorDataset(torch.randn(6, 3, 2, 2), torch.zeros(6, dtype=torch.long))
    first, _ = extract_features(model, data, batch_size=4)
    second, _ = extract_features(model, data, batch_size=2)
    assert not model.training and not first.requires_grad
    torch.testing.assert_close(first, second)


def test_bad_inputs():
    with pytest.raises(ValueError, match="the dataset is empty"):
        extract_features(_pixel_mean, _Items(0), batch_size=2)
    with pytest.raises(TypeError, match="the feature model must return a tensor"):
        extract_features(lambda x: {"x": x}, _Items(2), batch_size=2)
