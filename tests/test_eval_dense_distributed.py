"""The dense evaluations in two real processes (gloo): memory all-gathered, confusion matrices summed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from franca.eval.hummingbird import eval_hummingbird
from franca.eval.linear_seg import run_linear_seg
from tests.dense_fixtures import PixelProjection, colour_patch_datasets, write_colour_patch_splits


def _worker(rank: int, init_file: str, root: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        train, val = colour_patch_datasets(Path(root))
        hb = eval_hummingbird(PixelProjection(), train, val, 4, dims=[16, 4], memory_size=None, batch_size=2)
        seg = run_linear_seg(PixelProjection(), train, val, 4, Path(root) / "ls", learning_rates=[0.1], epochs=2)
        results[rank] = (hb, seg["best"])
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_with_one(tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    write_colour_patch_splits(tmp_path, 7, 5)  # odd train count: rank 1 encodes one image fewer
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path), shared), nprocs=2, join=True)
        results = dict(shared)
    train, val = colour_patch_datasets(tmp_path)
    single = eval_hummingbird(PixelProjection(), train, val, 4, dims=[16, 4], memory_size=None, batch_size=8)
    for rank in (0, 1):
        for m in ("16", "4"):
            assert results[rank][0][m]["mIoU"] == pytest.approx(single[m]["mIoU"], abs=1e-9)
    assert results[0][1] == results[1][1]  # gradients averaged: both ranks end with the same heads and scores
