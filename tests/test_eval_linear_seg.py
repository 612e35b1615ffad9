"""Linear segmentation on colour-patch images whose masks are a function of the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from franca.eval.linear_seg import BEST_HEAD_FILENAME, RESULTS_FILENAME, LinearSegHead, run_linear_seg
from tests.dense_fixtures import PixelProjection, colour_patch_datasets, write_colour_patch_splits


@pytest.fixture(scope="module")
def colour_patches(tmp_path_factory: pytest.TempPathFactory):
    return colour_patch_datasets(write_colour_patch_splits(tmp_path_factory.mktemp("colour_patches_linear"), 32, 8))


def test_head_keeps_the_first_dims_of_every_block() -> None:
    head = LinearSegHead(embed_dim=4, n_blocks=2, dim=2, num_classes=3)
    features = torch.randn(1, 8, 2, 2)
    kept = torch.cat([features[:, 0:2], features[:, 4:6]], dim=1)
    head.eval()
    assert torch.allclose(head(features), head.conv(head.bn(kept)))


def test_projection_backbone_is_segmented_linearly_and_shuffled_is_not(colour_patches, tmp_path: Path) -> None:
    train, val = colour_patches
    kwargs = dict(learning_rates=[0.01, 0.1], epochs=6, batch_size=8, dims=[16, 8])
    results = run_linear_seg(PixelProjection(), train, val, 4, tmp_path / "good", **kwargs)
    assert list(results["best"]) == ["16", "8"]
    assert results["best"]["16"]["mIoU"] > 80.0 and results["best"]["8"]["mIoU"] > 80.0
    assert len(results["heads"]) == 4
    assert json.loads((tmp_path / "good" / RESULTS_FILENAME).read_text())["best"] == results["best"]
    saved = torch.load(tmp_path / "good" / BEST_HEAD_FILENAME, weights_only=True)
    assert saved["dim"] == 16 and saved["num_classes"] == 4
    shuffled = run_linear_seg(PixelProjection(shuffle=True), train, val, 4, tmp_path / "bad", **kwargs)
    assert shuffled["best"]["16"]["mIoU"] < 40.0
