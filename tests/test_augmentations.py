"""DataAugmentationDINO: output contract, per-operation parity with torchvision, same distribution
as the reference pipeline (per-channel statistics, sharpness, crop-scale/aspect histograms)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from benchmarks.augment import make_reference_augmentation, synthetic_jpeg
from franca.data.augmentations import DataAugmentationDINO, _color_jitter, _gaussian_blur, shift_hue
from franca.data.multicrop import N_DRAWS, Uniforms, crop_box, draw_crops, split_draws
from franca.data.transforms import normalize_uint8


def _scripted_jitter(factors: list[float], order: list[float]):
    """One crop's draws with the jitter uniforms ``factors`` (brightness, contrast, saturation, hue) and ``order``."""
    uniforms = torch.zeros(1, N_DRAWS, dtype=torch.float64)
    uniforms[0, 2:10] = torch.tensor(factors + order, dtype=torch.float64)
    return split_draws(draw_crops(uniforms, 0.0, 0.0))[0]


def _photo(seed: int = 0, size=(120, 90)) -> Image.Image:
    return Image.open(io.BytesIO(synthetic_jpeg(*size, seed=seed))).convert("RGB")


def test_output_contract_float_and_uint8():
    image = _photo()
    torch.manual_seed(0)
    floats = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 56, 28)(image)
    torch.manual_seed(0)
    bytes_ = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 56, 28, uint8_crops=True)(image)
    assert set(floats) == {"global_crops", "local_crops"}
    assert [c.shape for c in floats["global_crops"]] == [(3, 56, 56)] * 2
    assert [c.shape for c in floats["local_crops"]] == [(3, 28, 28)] * 3
    assert all(c.dtype == torch.uint8 for c in bytes_["global_crops"] + bytes_["local_crops"])
    # same seed, same crops: the float path is the uint8 path normalised like ToTensor + Normalize
    for f, b in zip(floats["global_crops"] + floats["local_crops"], bytes_["global_crops"] + bytes_["local_crops"]):
        reference = TF.normalize(b.float().div(255), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert f.dtype == torch.float32 and torch.equal(f, reference)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="global_crops_scale"):
        DataAugmentationDINO((0.5, 0.2), (0.05, 0.32), 2)
    with pytest.raises(ValueError, match="local_crops_number"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), -1)
    with pytest.raises(ValueError, match="blur_probabilities"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, blur_probabilities=(1.0, 0.1))
    with pytest.raises(TypeError, match="PIL image"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2)(torch.zeros(3, 8, 8))


def test_reference_blur_wrapper_inverts_its_probability():
    """The reference GaussianBlur(p) applies the blur with probability 1 − p (our documented default)."""
    from test_masking import load_official_module

    pytest.importorskip("torchvision")
    try:
        official = load_official_module("franca/data/transforms.py")
    except ImportError as error:  # pragma: no cover - depends on the checkout
        pytest.skip(f"reference transforms do not import: {error}")
    assert official.GaussianBlur(p=1.0).p == 0.0 and official.GaussianBlur(p=0.1).p == pytest.approx(0.9)
    assert DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 1).blur_probabilities == (0.0, 0.9, 0.5)


def test_crop_scale_and_aspect_histograms_match_torchvision():
    height, width, scale, draws = 90, 120, (0.05, 0.32), 4000
    u = Uniforms(block=4096)
    torch.manual_seed(0)
    ours = np.array([crop_box(u, height, width, scale) for _ in range(draws)], dtype=float)
    image = torch.zeros(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(draws)], float)
    for boxes in (ours, theirs):
        assert (boxes[:, 0] + boxes[:, 2] <= height).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    for feature, bins in (
        (lambda b: b[:, 2] * b[:, 3] / (height * width), np.linspace(0.04, 0.34, 11)),
        (lambda b: np.log(b[:, 3] / b[:, 2]), np.linspace(-0.35, 0.35, 11)),
        (lambda b: (b[:, 1] + b[:, 3] / 2) / width, np.linspace(0, 1, 11)),
    ):
        h_ours = np.histogram(feature(ours), bins)[0] / draws
        h_theirs = np.histogram(feature(theirs), bins)[0] / draws
        assert np.abs(h_ours - h_theirs).max() < 0.03


def test_blur_equals_torchvision_gaussian_blur():
    x = torch.rand(3, 30, 26) * 255
    for sigma in (0.1, 0.7, 2.0):
        expected = TF.gaussian_blur(x, kernel_size=9, sigma=sigma)
        torch.testing.assert_close(_gaussian_blur(x.clone(), sigma), expected, rtol=0, atol=1e-3)


def test_hue_shift_matches_pil_hsv_round_trip():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()
    for factor in (-0.1, -0.03, 0.05, 0.1):
        expected = np.asarray(TF.adjust_hue(Image.fromarray(pixels), factor)).transpose(2, 0, 1).astype(float)
        ours = shift_hue(x.clone(), int(factor * 255)).numpy()
        assert np.abs(ours - expected).mean() < 0.35  # PIL also rounds S and V to 8 bits
        assert np.abs(ours - expected).max() <= 8


@pytest.mark.parametrize(
    "op, script, reference",
    [
        ("brightness", [0.9, 0.5, 0.5, 0.5], lambda im: TF.adjust_brightness(im, 1.32)),
        ("brightness", [0.1, 0.5, 0.5, 0.5], lambda im: TF.adjust_brightness(im, 0.68)),
        ("contrast", [0.5, 0.95, 0.5, 0.5], lambda im: TF.adjust_contrast(im, 1.36)),
        ("contrast", [0.5, 0.05, 0.5, 0.5], lambda im: TF.adjust_contrast(im, 0.64)),
        ("saturation", [0.5, 0.5, 1.0, 0.5], lambda im: TF.adjust_saturation(im, 1.2)),
        ("saturation", [0.5, 0.5, 0.0, 0.5], lambda im: TF.adjust_saturation(im, 0.8)),
    ],
)
def test_single_jitter_operation_matches_torchvision_on_pil(op, script, reference):
    """Factors set to 1 except one: ours (float, rounded once) equals PIL's 8-bit op within 1 level."""
    pixels = np.array(_photo(seed=2, size=(48, 40)))
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()
    ours = _color_jitter(x, _scripted_jitter(script, [0.1, 0.2, 0.3, 0.4])).add_(0.5).floor_().numpy()
    expected = np.asarray(reference(Image.fromarray(pixels))).transpose(2, 0, 1).astype(float)
    assert np.abs(ours - expected).max() <= 1, op


def _crop_statistics(crops: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Per crop: channel means and stds (normalised units), grayness and Laplacian sharpness."""
    stack = torch.stack([c.float() for c in crops])
    centre = stack[..., 1:-1, 1:-1]
    laplacian = 4 * centre - stack[..., :-2, 1:-1] - stack[..., 2:, 1:-1] - stack[..., 1:-1, :-2] - stack[..., 1:-1, 2:]
    return {
        "mean": stack.mean((2, 3)).numpy(),
        "std": stack.std((2, 3)).numpy(),
        "gray": ((stack[:, 0] - stack[:, 1]).abs().amax((1, 2)) < 0.05).float().numpy(),
        "sharpness": laplacian.abs().mean((1, 2, 3)).numpy(),
    }


@pytest.mark.parametrize("draws", [40, pytest.param(400, marks=pytest.mark.slow)])
def test_same_distribution_as_the_reference_pipeline(draws):
    """Both pipelines on the same photos, many draws: per crop type, every statistic's mean agrees
    within 4.5 standard errors of the difference (and the blur/solarise/grayscale wiring shows up in
    the sharpness, std and grayness)."""
    images = [_photo(seed=s) for s in range(4)]
    kwargs = dict(global_crops_size=32, local_crops_size=24, local_crops_number=4)
    pipelines = {
        "reference": make_reference_augmentation((0.32, 1.0), (0.05, 0.32), **kwargs),
        "ours": DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), **kwargs),
        # negative control: the blur probabilities as written (1.0 / 0.1 / 0.5) must be told apart
        "as_written": DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), **kwargs, blur_probabilities=(1.0, 0.1, 0.5)),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        outputs = {k: [f(im) for _ in range(draws) for im in images] for k, f in pipelines.items()}
    finally:
        torch.set_num_threads(threads)
    for crop_type, pick in (
        ("global1", lambda o: [o["global_crops"][0]]),
        ("global2", lambda o: [o["global_crops"][1]]),
        ("local", lambda o: o["local_crops"]),
    ):
        stats = {k: _crop_statistics([c for o in v for c in pick(o)]) for k, v in outputs.items() if k != "as_written"}
        for name in ("mean", "std", "gray", "sharpness"):
            ref, got = stats["reference"][name], stats["ours"][name]
            stderr = np.sqrt(ref.var(0) / len(ref) + got.var(0) / len(got))
            gap = np.abs(got.mean(0) - ref.mean(0))
            assert np.all(gap <= 4.5 * stderr + 0.01), (crop_type, name, got.mean(0), ref.mean(0), stderr)
    sharp = {k: _crop_statistics([o["global_crops"][0] for o in v])["sharpness"].mean() for k, v in outputs.items()}
    blurred = {k: _crop_statistics([o["global_crops"][1] for o in v])["sharpness"].mean() for k, v in outputs.items()}
    assert blurred["ours"] < 0.8 * sharp["ours"] and blurred["reference"] < 0.8 * sharp["reference"]
    assert sharp["as_written"] < 0.8 * sharp["reference"]


def test_reduced_scale_jpeg_decoding_only_when_every_crop_still_downsamples():
    data = synthetic_jpeg(960, 720, seed=5)
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 112, 48, uint8_crops=True)
    exact = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, 112, 48, uint8_crops=True, jpeg_draft=False)
    reduced_sizes, differences = [], []
    for seed in range(3):
        lazy = Image.open(io.BytesIO(data))
        torch.manual_seed(seed)
        fast = augment(lazy)
        reduced_sizes.append(lazy.size)
        torch.manual_seed(seed)
        full = exact(Image.open(io.BytesIO(data)))
        for a, b in zip(fast["global_crops"] + fast["local_crops"], full["global_crops"] + full["local_crops"]):
            differences.append((a.float() - b.float()).abs().mean().item())
    assert any(size[0] < 960 for size in reduced_sizes)  # the draft was used
    assert float(np.mean(differences)) < 2.5  # same crops, slightly different low-pass: a few levels
    small = Image.open(io.BytesIO(synthetic_jpeg(200, 150)))
    augment(small)
    assert small.size == (200, 150)  # a 2× reduction would upsample some crop: full decode


def test_collate_of_uint8_crops_equals_collate_of_float_crops():
    from franca.data.collate import collate_data_and_cast
    from franca.data.masking import MaskingGenerator

    image = _photo(seed=7)
    args = ((0.32, 1.0), (0.05, 0.32), 2, 28, 14)
    torch.manual_seed(3)
    fast = [(DataAugmentationDINO(*args, uint8_crops=True)(image), None) for _ in range(2)]
    torch.manual_seed(3)
    slow = [(DataAugmentationDINO(*args)(image), None) for _ in range(2)]
    collate = dict(mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32, n_tokens=4)
    batch_fast = collate_data_and_cast(fast, mask_generator=MaskingGenerator(2), **collate)
    batch_slow = collate_data_and_cast(slow, mask_generator=MaskingGenerator(2), **collate)
    assert torch.equal(batch_fast["collated_global_crops"], batch_slow["collated_global_crops"])
    assert torch.equal(batch_fast["collated_local_crops"], batch_slow["collated_local_crops"])
    crop_major = [sample["local_crops"][i] for i in range(2) for sample, _ in fast]
    assert torch.equal(batch_fast["collated_local_crops"], normalize_uint8(torch.stack(crop_major)))
