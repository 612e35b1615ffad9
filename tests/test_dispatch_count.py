"""benchmarks/dispatch.py: the operator / element-wise byte / host-sync counter, and one counted iteration."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import franca.layers.attention as attention
from benchmarks import dispatch


def test_counter_counts_operators_bytes_regions_and_backward():
    counter = dispatch.DispatchCounter()
    with FakeTensorMode(), counter:
        w = torch.empty(256, 128, requires_grad=True)
        x = torch.empty(64, 256)
        counter.counts.clear()
        with counter.region("heads"):
            y = (x @ w).mul(2.0)  # a product and one element-wise op writing 64 × 128 floats
            dispatch.tag_graph(y, "heads")
        view = y.view(-1)  # a view: not counted
        loss = view.sum()  # glue
        loss.backward()
        with counter.region("ema"):
            w.detach().add_(1.0)
        with counter.region("optimizer"):
            torch.empty(1024, 1024)  # an allocation: an operator that writes nothing
    rows = counter.table()
    assert rows["optimizer"]["ops"] == 1 and rows["optimizer"]["elementwise_mb"] == 0
    assert rows["heads"]["ops"] >= 2 + 2  # mm, mul forward; mul and mm backward (attributed to heads)
    assert rows["heads"]["elementwise_mb"] >= 64 * 128 * 4 / 2**20
    assert rows["glue"]["ops"] >= 1 and rows["ema"]["ops"] == 1
    assert rows["ema"]["elementwise_mb"] == pytest.approx(256 * 128 * 4 / 2**20)
    assert all(row["host_syncs"] == 0 for row in rows.values())


def test_counter_counts_host_reads_of_fake_tensors():
    counter = dispatch.DispatchCounter()
    with FakeTensorMode(), counter:
        x = torch.empty(4)
        counter.counts.clear()
        x.sum().item()
        bool(x.amax() > 0)
    assert counter.table()["glue"]["host_syncs"] == 2


def test_one_counted_iteration_has_no_host_sync_inside():
    """The demo network (``train/cpu_tiny``) at batch 2: every region dispatches, the losses are read after the EMA."""
    result = dispatch.count_side("ours", "train/cpu_tiny", 2, [])
    regions = result["regions"]
    for region in ("backbone", "heads", "sinkhorn_knopp", "losses", "clip", "optimizer", "ema"):
        assert regions[region]["ops"] > 0, region
    assert result["total"]["host_syncs"] == 0
    assert regions["logging"]["host_syncs"] == 4  # the four logged loss terms, read once after the EMA
    assert regions["ema"]["ops"] == 1 and regions["optimizer"]["elementwise_mb"] > 0
    assert result["elementwise_mb_outside_backbone"] < result["total"]["elementwise_mb"]
    # nothing of the fake run outlives it: the attention call and the cached Sinkhorn-Knopp indicator are restored
    assert attention.F is torch.nn.functional
    assert importlib.import_module("franca.loss.sinkhorn_knopp")._level_indicator.cache_info().currsize == 0
