"""Evaluations in two real processes (gloo): extraction sharded and gathered, k-NN and linear probes
giving the answers of one process, classifier grids in sync across ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_eval_features import _Items, _pixel_mean
from torch.utils.data import TensorDataset

from franca.eval import linear
from franca.eval.features import extract_features, shard_indices
from franca.eval.knn import eval_knn
from franca.eval.linear import CHECKPOINT_FILENAME, run_linear_eval


class _Pool(torch.nn.Module):
    """A deterministic 'backbone': class token = fixed projection of the mean colour; 4 'blocks' for the probe."""

    embed_dim, n_blocks = 6, 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, self.embed_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.linspace(-1, 1, 18).view(6, 3))
            self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.mean(dim=(2, 3)))

    def get_intermediate_layers(self, images, n, return_class_token=True):
        patches = self.proj(images.flatten(2).transpose(1, 2))
        return tuple((patches * (i + 1), patches.mean(1) * (i + 1)) for i in range(n))


def _split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n)
    colours = torch.eye(3)[labels]
    return TensorDataset(colours[:, :, None, None] + 0.3 * torch.randn(len(labels), 3, 4, 4, generator=g), labels)


def _extractions(n: int) -> tuple:
    gathered = extract_features(_pixel_mean, _Items(n), batch_size=2)
    local = extract_features(_pixel_mean, _Items(n), batch_size=2, gather=False)
    return gathered, local


def _worker(rank: int, init_file: str, out_dir: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        extractions = {n: _extractions(n) for n in (7, 1)}  # 1 sample: rank 1 encodes nothing
        knn = eval_knn(_Pool(), _split(7, 0), _split(5, 1), nb_knn=[1, 4], batch_size=4, n_per_class_list=[-1, 2])
        trained = {}
        real_train = linear._train_one_epoch

        def record(classifiers, *args, **kwargs):
            loss = real_train(classifiers, *args, **kwargs)
            trained.update({k: v.clone() for k, v in classifiers.state_dict().items()})
            return loss

        linear._train_one_epoch = record
        torch.manual_seed(rank)  # the global RNG differs between ranks; the probe must still start in sync
        probe = run_linear_eval(
            _Pool(),
            _split(8, 2),
            _split(3, 3),
            out_dir,
            augmented_train=False,
            epochs=2,
            batch_size=4,
            learning_rates=[0.1],
            n_last_blocks_list=[1, 4],
        )
        results[rank] = (extractions, knn, probe, trained)
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_with_one(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "linear"), shared), nprocs=2, join=True)
        results = dict(shared)

    for n in (7, 1):
        expected, expected_labels = extract_features(_pixel_mean, _Items(n), batch_size=n)
        for rank in (0, 1):
            (features, labels), (local_features, local_labels) = results[rank][0][n]
            torch.testing.assert_close(features, expected)  # every rank holds the whole, ordered dataset
            assert torch.equal(labels, expected_labels)
            share = list(shard_indices(n, rank, 2))
            torch.testing.assert_close(local_features, expected[share].reshape(len(share), 2))
            assert local_labels.tolist() == expected_labels[share].tolist()

    single = eval_knn(_Pool(), _split(7, 0), _split(5, 1), nb_knn=[1, 4], batch_size=100, n_per_class_list=[-1, 2])
    assert results[0][1] == results[1][1] == single  # val shards summed over ranks = one process

    # each rank trains on its own share, gradients are averaged: the heads stay identical
    weights = [results[rank][3] for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key])
    assert results[0][2]["best_classifier"] == results[1][2]["best_classifier"]
    assert torch.load(tmp_path / "linear" / CHECKPOINT_FILENAME, weights_only=True)["epoch"] == 2
