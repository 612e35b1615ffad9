"""The device-side (GPU data path) augmentation, run here on CPU: batched operations equal the per-crop
ones, decoding substitutes unreadable files, the crop distribution matches the reference pipeline, and the
trainer runs with ``train.batch_augmentation``."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_augmentations import _crop_statistics
from test_train_loop import LOSS_KEYS, _cfg, _model, _records, demo_root, tiny_arch  # noqa: F401  (fixtures)

from benchmarks.augment import make_reference_augmentation, synthetic_jpeg
from franca.data.augmentations import _gaussian_blur, shift_hue
from franca.data.batch_augmentations import (
    BatchAugmentationDINO,
    EncodedImages,
    _blur_batch,
    _jitter_batch,
    decode_batch,
)
from franca.data.collate import collate_encoded
from franca.data.loaders import make_dataset
from franca.data.masking import MaskingGenerator
from franca.data.multicrop import N_DRAWS, draw_crops
from franca.train.train import build_data_loader, do_train


def _encoded(seed: int, size=(120, 90)) -> torch.Tensor:
    return torch.frombuffer(bytearray(synthetic_jpeg(*size, seed=seed)), dtype=torch.uint8)


def test_batched_hue_shift_equals_per_crop():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 7, 9) * 255
    steps = torch.tensor([-25, -3, 0, 7, 25])
    batched = shift_hue(x, steps.view(-1, 1, 1))
    for i in range(5):
        torch.testing.assert_close(batched[i], shift_hue(x[i], int(steps[i])), rtol=0, atol=0)


def test_batched_blur_equals_per_crop_blur_and_sigma_zero_is_identity():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 12, 10) * 255
    sigmas = torch.tensor([0.0, 0.7, 1.9])
    out = _blur_batch(x, sigmas)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=1e-3)
    for i in (1, 2):
        torch.testing.assert_close(out[i], _gaussian_blur(x[i], float(sigmas[i])), rtol=0, atol=1e-3)


def test_jitter_off_is_identity_and_on_changes_colours():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 6, 6) * 255
    draws = torch.rand(4, N_DRAWS)
    draws[:, 1] = 0.9  # p(jitter) = 0.8: all off
    torch.testing.assert_close(_jitter_batch(x.clone(), draw_crops(draws, 0.0, 0.0)), x, rtol=0, atol=1e-3)
    draws[:, 1] = 0.1
    draws[:, 2:6] = torch.tensor([0.95, 0.05, 0.95, 0.95])  # strong brightness, low contrast, hue +
    assert (_jitter_batch(x.clone(), draw_crops(draws, 0.0, 0.0)) - x).abs().mean() > 5


def test_decode_batch_matches_pil_and_substitutes_unreadable(caplog):
    good = [_encoded(s) for s in range(2)]
    bad = torch.frombuffer(bytearray(b"not an image"), dtype=torch.uint8)
    images = decode_batch([good[0], bad, good[1]], ["a.jpg", "broken.jpg", "c.jpg"], torch.device("cpu"))
    assert len(images) == 3 and "broken.jpg" in caplog.text
    expected = np.array(Image.open(io.BytesIO(synthetic_jpeg(120, 90, seed=1))).convert("RGB"))
    assert torch.equal(images[2], torch.from_numpy(expected).permute(2, 0, 1))
    assert images[1].shape == images[0].shape  # replaced by a readable image of the batch
    with pytest.raises(RuntimeError, match="could be decoded"):
        decode_batch([bad], ["broken.jpg"], torch.device("cpu"))


def test_encoded_images_and_collate(demo_root):  # noqa: F811
    dataset = EncodedImages(make_dataset(f"ImageFolder:root={demo_root}/train"))
    data, source = dataset[0]
    assert data.dtype == torch.uint8 and source.endswith(".png")
    generator = MaskingGenerator(input_size=(4, 4), max_num_patches=8)
    batch = collate_encoded([dataset[i] for i in range(3)], 2, (0.1, 0.5), 0.5, 16, generator)
    assert len(batch["encoded_images"]) == 3 and batch["collated_masks"].shape == (6, 16)
    with pytest.raises(TypeError, match="get_image_data"):
        EncodedImages([1, 2, 3])


def test_output_contract():
    aug = BatchAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, global_crops_size=32, local_crops_size=16)
    images = decode_batch([_encoded(s) for s in range(4)], ["x"] * 4, torch.device("cpu"))
    global_crops, local_crops = aug(images, dtype=torch.bfloat16)
    assert global_crops.shape == (8, 3, 32, 32) and local_crops.shape == (12, 3, 16, 16)
    assert global_crops.dtype == local_crops.dtype == torch.bfloat16
    assert torch.isfinite(global_crops.float()).all()


@pytest.mark.parametrize("draws", [40, pytest.param(400, marks=pytest.mark.slow)])
def test_same_distribution_as_the_reference_pipeline(draws):
    """Per crop type, the mean of every crop statistic agrees with the reference transform within 4.5
    standard errors (channel means/stds, grayness, sharpness: jitter, grayscale, blur and solarise)."""
    kwargs = dict(global_crops_size=32, local_crops_size=24, local_crops_number=4)
    reference = make_reference_augmentation((0.32, 1.0), (0.05, 0.32), **kwargs)
    ours = BatchAugmentationDINO((0.32, 1.0), (0.05, 0.32), **kwargs)
    encoded = [_encoded(s) for s in range(4)]
    photos = [Image.open(io.BytesIO(e.numpy().tobytes())).convert("RGB") for e in encoded]
    images = decode_batch(encoded, ["x"] * 4, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        ref_out = [reference(p) for _ in range(draws) for p in photos]
        our_out = [ours(images) for _ in range(draws)]
    finally:
        torch.set_num_threads(threads)
    n = len(photos)
    picks = {
        "global1": ([o["global_crops"][0] for o in ref_out], [c for g, _ in our_out for c in g[:n]]),
        "global2": ([o["global_crops"][1] for o in ref_out], [c for g, _ in our_out for c in g[n:]]),
        "local": ([c for o in ref_out for c in o["local_crops"]], [c for _, loc in our_out for c in loc]),
    }
    for crop_type, (ref_crops, our_crops) in picks.items():
        ref, got = _crop_statistics(ref_crops), _crop_statistics(our_crops)
        for name in ("mean", "std", "gray", "sharpness"):
            stderr = np.sqrt(ref[name].var(0) / len(ref[name]) + got[name].var(0) / len(got[name]))
            gap = np.abs(got[name].mean(0) - ref[name].mean(0))
            assert np.all(gap <= 4.5 * stderr + 0.01), (crop_type, name, got[name].mean(0), ref[name].mean(0))


def test_trainer_with_batch_augmentation(demo_root, tmp_path, tiny_arch):  # noqa: F811
    cfg = _cfg(demo_root, tmp_path, **{"train.batch_augmentation": True})
    batch = next(iter(build_data_loader(cfg)))
    assert "encoded_images" in batch and "collated_global_crops" not in batch
    averages = do_train(cfg, _model(cfg), log_period=1)
    assert all(math.isfinite(averages[k]) for k in LOSS_KEYS)
    assert [r["iteration"] for r in _records(tmp_path)] == [0, 1, 2, 3]
