"""Weighted k-NN: neighbour search backends, vote arithmetic, accuracy on separable / shuffled data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from franca.eval.knn import (
    eval_knn,
    format_results,
    knn_results,
    sample_per_class,
    search_neighbors,
    weighted_votes,
)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_votes_match_hand_computation():
    # one query, three neighbours with similarities 0.9, 0.5, 0.1 labelled 1, 0, 1; T = 0.5
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    scores = weighted_votes(sims, labels, nb_knn=[1, 2, 3], temperature=0.5, num_classes=3)
    e = [math.exp(0.9 / 0.5), math.exp(0.5 / 0.5), math.exp(0.1 / 0.5)]
    total = sum(e)
    torch.testing.assert_close(scores[1], torch.tensor([[0.0, e[0] / total, 0.0]]))
    torch.testing.assert_close(scores[2], torch.tensor([[e[1] / total, e[0] / total, 0.0]]))
    torch.testing.assert_close(scores[3], torch.tensor([[e[1] / total, (e[0] + e[2]) / total, 0.0]]))


def test_low_temperature_majority_flips_to_nearest():
    # two far neighbours of class 0 outvote one near neighbour of class 1 only when T is large
    sims = torch.tensor([[0.9, 0.8, 0.8]])
    labels = torch.tensor([[1, 0, 0]])
    hot = weighted_votes(sims, labels, [3], temperature=10.0, num_classes=2)[3]
    cold = weighted_votes(sims, labels, [3], temperature=0.01, num_classes=2)[3]
    assert hot.argmax().item() == 0 and cold.argmax().item() == 1


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_backends_return_exact_neighbours(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    keys, queries = _unit(300, 16, 0), _unit(50, 16, 1)
    sims, idx = search_neighbors(queries, keys, k=7, backend=backend)
    expected = (queries @ keys.T).topk(7, dim=1)
    torch.testing.assert_close(sims, expected.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.gather(queries @ keys.T, 1, idx), expected.values, atol=1e-5, rtol=0)


def test_torch_search_chunking_is_invisible():
    keys, queries = _unit(200, 8, 2), _unit(37, 8, 3)
    whole = search_neighbors(queries, keys, 5, backend="torch", chunk_size=1000)
    chunked = search_neighbors(queries, keys, 5, backend="torch", chunk_size=4)
    torch.testing.assert_close(whole[0], chunked[0])
    assert torch.equal(whole[1], chunked[1])


def test_search_rejects_bad_k_and_backend():
    keys = _unit(10, 4, 0)
    with pytest.raises(ValueError, match="k=11 nearest neighbours asked but there are 10 training samples"):
        search_neighbors(keys, keys, 11)
    with pytest.raises(ValueError, match="unknown k-NN backend 'annoy'"):
        search_neighbors(keys, keys, 3, backend="annoy")


def _two_clusters(n_per_class: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.zeros(2, dim)
    centres[0, 0], centres[1, 1] = 1.0, 1.0
    labels = torch.arange(2).repeat_interleave(n_per_class)
    features = centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=g)
    return F.normalize(features, dim=1), labels


def test_separable_features_give_100_percent():
    train_f, train_l = _two_clusters(150, 32, 0)
    val_f, val_l = _two_clusters(150, 32, 1)
    results = knn_results(train_f, train_l, val_f, val_l, nb_knn=[1, 10, 20], temperature=0.07, backend="torch")
    for k in ("1", "10", "20"):
        assert results["full"][k] == {"top-1": 100.0, "top-5": 100.0}


def test_shuffled_labels_give_chance():
    # each val point is a noisy copy of one train point: the true labels are recovered exactly,
    # labels shuffled among the train points leave nothing to learn (binomial std ~2.9 % at n=300)
    g = torch.Generator().manual_seed(0)
    train_f = _unit(300, 64, 0)
    train_l = torch.randint(0, 2, (300,), generator=g)
    val_f = F.normalize(train_f + 0.02 * torch.randn(300, 64, generator=g), dim=1)
    exact = knn_results(train_f, train_l, val_f, train_l, nb_knn=[1, 20], temperature=0.07, backend="torch")
    assert exact["full"]["1"]["top-1"] == 100.0 and exact["full"]["20"]["top-1"] == 100.0
    shuffled = train_l[torch.randperm(300, generator=g)]
    chance = knn_results(train_f, shuffled, val_f, train_l, nb_knn=[1, 20], temperature=0.07, backend="torch")
    for k in ("1", "20"):
        assert 38.0 < chance["full"][k]["top-1"] < 62.0


def test_few_shot_subsets_and_ks():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 3)
    picked = sample_per_class(labels, 2, seed=0)
    assert torch.bincount(labels[picked]).tolist() == [2, 2, 2]
    assert torch.equal(picked, sample_per_class(labels, 2, seed=0))
    train_f, train_l = _two_clusters(20, 8, 0)
    val_f, val_l = _two_clusters(20, 8, 1)
    results = knn_results(
        train_f, train_l, val_f, val_l, nb_knn=[1, 10, 20], temperature=0.07, n_per_class_list=[-1, 5], n_tries=3
    )
    assert list(results) == ["full", "5 per class"]
    assert list(results["5 per class"]) == ["1", "5"]  # ks above 5 dropped, 5 itself added
    assert results["5 per class"]["5"]["top-1"] == 100.0
    assert "full" in format_results(results) and "k=20" in format_results(results)


def test_val_label_unknown_to_train_is_a_clear_error():
    train_f, train_l = _two_clusters(5, 4, 0)
    with pytest.raises(ValueError, match=r"class mismatch between splits: val labels \[7\]"):
        knn_results(train_f, train_l, train_f[:1], torch.tensor([7]), nb_knn=[1], temperature=0.07)


class _MeanColour(torch.nn.Module):
    """A 'backbone' whose class token is a random projection of the mean colour of the image."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 16)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.mean(dim=(2, 3)))


def test_eval_knn_on_images_of_two_colours():
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorDataset:
        labels = torch.arange(2).repeat(n)
        base = torch.stack([torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9])])[labels]
        images = base[:, :, None, None] + 0.05 * torch.randn(len(labels), 3, 8, 8, generator=g)
        return TensorDataset(images, labels)

    torch.manual_seed(0)
    results = eval_knn(_MeanColour(), split(12), split(10), nb_knn=[3, 5], temperature=0.07, batch_size=7)
    assert results["full"]["3"]["top-1"] == 100.0 and results["full"]["5"]["top-1"] == 100.0
    with pytest.raises(ValueError, match="--nb_knn 200 exceeds the 24 samples of the train split"):
        eval_knn(_MeanColour(), split(12), split(10), nb_knn=[200])
