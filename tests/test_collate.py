"""collate_data_and_cast: layout, mask bookkeeping, uint8 fast path, parity with the reference."""

from __future__ import annotations

import random

import pytest
import torch
from test_masking import load_official_module
from torchvision import transforms as T

from franca.data.collate import collate_data_and_cast
from franca.data.masking import MaskingGenerator
from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_uint8

GRID = 4
N_TOKENS = GRID * GRID


def _uint8_samples(batch: int, n_local: int = 3, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)

    def crop(size):
        return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)

    return [
        ({"global_crops": [crop(8), crop(8)], "local_crops": [crop(4) for _ in range(n_local)]}, None)
        for _ in range(batch)
    ]


def _float_like(samples: list) -> list:
    """The same crops as the reference augmentation returns them: ToTensor + Normalize per crop."""
    normalize = T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

    def convert(c):
        return normalize(c.float().div(255))

    return [({k: [convert(c) for c in v] for k, v in s.items()}, t) for s, t in samples]


def _collate(samples, dtype=torch.float32, probability=0.5, generator=None):
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=probability,
        dtype=dtype,
        n_tokens=N_TOKENS,
        mask_generator=generator or MaskingGenerator(GRID, max_num_patches=0.5 * N_TOKENS),
    )


def test_layout_is_crop_major_and_uint8_is_normalised_bit_identically():
    samples = _uint8_samples(batch=3)
    random.seed(0)
    fast = _collate(samples)
    random.seed(0)
    slow = _collate(_float_like(samples))
    assert fast["collated_global_crops"].shape == (6, 3, 8, 8)
    assert fast["collated_local_crops"].shape == (9, 3, 4, 4)
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "masks_weight"):
        assert torch.equal(fast[key], slow[key]), key
    # crop-major: row i·B + b is crop i of image b
    expected = normalize_uint8(samples[2][0]["global_crops"][1])
    assert torch.equal(fast["collated_global_crops"][1 * 3 + 2], expected)


def test_low_precision_output_is_the_float32_result_cast():
    samples = _uint8_samples(batch=2)
    random.seed(1)
    half = _collate(samples, dtype=torch.bfloat16)
    random.seed(1)
    full = _collate(samples)
    assert half["collated_global_crops"].dtype == torch.bfloat16
    assert torch.equal(half["collated_global_crops"], full["collated_global_crops"].to(torch.bfloat16))


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_mask_bookkeeping(batch):
    random.seed(batch)
    out = _collate(_uint8_samples(batch), probability=0.5)
    masks = out["collated_masks"]
    n_images = 2 * batch
    n_masked_images = int(n_images * 0.5)
    assert masks.shape == (n_images, N_TOKENS) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) <= n_masked_images  # a ratio may round down to 0 patches
    bounds = torch.linspace(0.1, 0.5, n_masked_images + 1)
    # the i-th smallest masked count lies in [N·p_i, N·p_(i+1)] (one ratio per linspace bin)
    masked_counts = sorted(counts.tolist())[n_images - n_masked_images :]
    for i, count in enumerate(masked_counts):
        assert int(N_TOKENS * bounds[i]) <= count <= int(N_TOKENS * bounds[i + 1])
    assert int(counts.sum()) <= out["upperbound"] == sum(int(N_TOKENS * p) for p in bounds[1:])
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(counts.sum())]
    assert out["masks_weight"].shape == (int(counts.sum()),)
    # weights are 1 / (masked patches of the image): they sum to 1 per masked image
    assert float(out["masks_weight"].sum()) == pytest.approx(int((counts > 0).sum()), rel=1e-6)


def test_invalid_calls_raise_clear_errors():
    with pytest.raises(ValueError, match="empty batch"):
        _collate([])
    with pytest.raises(ValueError, match="n_tokens and mask_generator"):
        collate_data_and_cast(_uint8_samples(1), (0.1, 0.5), 0.5, torch.float32)


def test_same_batch_as_the_reference_collate():
    official = load_official_module("franca/data/collate.py")
    samples = _float_like(_uint8_samples(batch=5, seed=3))
    generator = MaskingGenerator(GRID, max_num_patches=0.5 * N_TOKENS)
    for seed in range(5):
        random.seed(seed)
        expected = official.collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, N_TOKENS, generator)
        random.seed(seed)
        ours = _collate(samples, generator=generator)
        assert expected.keys() == ours.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key
            else:
                assert value == ours[key], key
