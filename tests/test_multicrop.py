"""The one multi-crop distribution (franca.data.multicrop) and its two executors (per image, batched)."""

from __future__ import annotations

import pytest
import torch

from franca.data.augmentations import DataAugmentationDINO
from franca.data.batch_augmentations import BatchAugmentationDINO
from franca.data.multicrop import (
    N_DRAWS,
    N_GLOBAL_CROPS,
    MultiCropDistribution,
    draw_crops,
    split_draws,
)


def test_draw_columns_decide_each_operation():
    uniforms = torch.full((2, N_DRAWS), 0.99, dtype=torch.float64)
    uniforms[0] = torch.tensor([0.1, 0.1, 1.0, 0.0, 0.5, 1.0, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 1.0, 0.1])
    on, off = split_draws(draw_crops(uniforms, blur_p=0.5, solarize_p=0.2))
    assert on.flip and on.jitter and on.grayscale and on.solarize
    assert on.brightness == pytest.approx(1.4) and on.contrast == pytest.approx(0.6) and on.saturation == 1.0
    assert on.hue_steps == 25 and on.order == [3, 2, 1, 0] and on.sigma == pytest.approx(2.0)
    assert not (off.flip or off.jitter or off.grayscale or off.solarize) and off.sigma == 0.0
    with pytest.raises(ValueError, match="shape"):
        draw_crops(torch.rand(3, N_DRAWS - 1), 0.5, 0.0)


def test_image_draws_follow_the_crop_probabilities():
    torch.manual_seed(0)
    dist = MultiCropDistribution((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    images = [dist.image_draws() for _ in range(3000)]
    rates = torch.tensor(
        [[[d.flip, d.jitter, d.grayscale, d.sigma > 0, d.solarize] for d in crops] for crops in images], dtype=float
    ).mean(0)
    expected = torch.tensor(
        [[0.5, 0.8, 0.2, 0.0, 0.0], [0.5, 0.8, 0.2, 0.9, 0.2], [0.5, 0.8, 0.2, 0.5, 0.0], [0.5, 0.8, 0.2, 0.5, 0.0]],
        dtype=float,
    )
    assert (rates - expected).abs().max() < 0.04


@pytest.mark.parametrize("executor", [DataAugmentationDINO, BatchAugmentationDINO])
def test_both_executors_take_the_one_definition(executor):
    aug = executor((0.32, 1.0), (0.05, 0.32), 3, 32, 16, blur_probabilities=(1.0, 0.1, 0.5))
    assert isinstance(aug, MultiCropDistribution)
    assert [s.size for s in aug.crop_specs] == [32] * N_GLOBAL_CROPS + [16] * 3
    assert [s.blur_p for s in aug.crop_specs] == [1.0, 0.1, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="local_crops_scale"):
        executor((0.32, 1.0), (0.5, 0.1), 3)


def test_both_executors_render_n_global_crops():
    from PIL import Image

    torch.manual_seed(0)
    image = Image.new("RGB", (40, 30), (120, 60, 30))
    per_image = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 32, 16)(image)
    assert len(per_image["global_crops"]) == N_GLOBAL_CROPS and len(per_image["local_crops"]) == 2
    pixels = torch.tensor([120, 60, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 30, 40).contiguous()
    global_crops, local_crops = BatchAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 32, 16)([pixels] * 3)
    assert global_crops.shape == (N_GLOBAL_CROPS * 3, 3, 32, 32) and local_crops.shape == (6, 3, 16, 16)
