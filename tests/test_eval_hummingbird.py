"""HummingBird in-context segmentation on colour-patch images whose masks are a function of the pixels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from franca.eval.hummingbird import eval_hummingbird, patch_label_fractions, propagate_labels, sample_patches
from tests.dense_fixtures import PixelProjection, colour_patch_datasets, write_colour_patch_splits


@pytest.fixture(scope="module")
def colour_patches(tmp_path_factory: pytest.TempPathFactory):
    return colour_patch_datasets(write_colour_patch_splits(tmp_path_factory.mktemp("colour_patches"), 12, 6))


def test_patch_label_fractions_and_rare_classes_kept_first() -> None:
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 1  # one patch (of 2×2 pixels) of class 1
    masks[0, 0, 3] = 255  # ignored pixels count as class 0
    fractions = patch_label_fractions(masks, patch_size=2, num_classes=2)
    assert fractions.shape == (1, 4, 2)
    assert fractions[0].tolist() == [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    # scores: 1·U for the class-1 patch, 3·U for the others; it is kept first in P(U0 < 3·min U) ≈ 0.65 of draws
    kept = [sample_patches(fractions, 1, torch.Generator().manual_seed(seed)).item() for seed in range(400)]
    assert kept.count(0) / len(kept) > 0.55
    assert sample_patches(fractions, 4).sort().values.tolist() == [[0, 1, 2, 3]]


def test_label_propagation_is_a_softmax_over_neighbours() -> None:
    sims = torch.tensor([[1.0, 0.98]])
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w = torch.softmax(torch.tensor([1.0, 0.98]) / 0.02, dim=0)
    assert propagate_labels(sims, labels, 0.02)[0].tolist() == pytest.approx(w.tolist())


def test_projection_backbone_segments_and_shuffled_is_near_chance(colour_patches, tmp_path: Path) -> None:
    train, val = colour_patches
    good = eval_hummingbird(PixelProjection(), train, val, num_classes=4, dims=[16, 8], memory_size=None)
    assert list(good) == ["16", "8"]
    assert good["16"]["mIoU"] > 90.0 and good["8"]["mIoU"] > 90.0
    # bounded memory: 12 images × 8 kept patches
    bounded = eval_hummingbird(PixelProjection(), train, val, num_classes=4, memory_size=96, num_neighbours=10)
    assert bounded["16"]["mIoU"] > 90.0
    shuffled = eval_hummingbird(PixelProjection(shuffle=True), train, val, num_classes=4, memory_size=None)
    assert shuffled["16"]["mIoU"] < 40.0


def test_memory_smaller_than_one_patch_per_image_is_an_error(colour_patches) -> None:
    train, val = colour_patches
    with pytest.raises(ValueError, match="below one patch per image"):
        eval_hummingbird(PixelProjection(), train, val, num_classes=4, memory_size=5)


def test_faiss_and_torch_searches_agree(colour_patches) -> None:
    pytest.importorskip("faiss")
    train, val = colour_patches
    results = [
        eval_hummingbird(PixelProjection(), train, val, num_classes=4, memory_size=None, backend=backend)
        for backend in ("faiss", "torch")
    ]
    assert results[0]["16"]["mIoU"] == pytest.approx(results[1]["16"]["mIoU"], abs=1e-6)
