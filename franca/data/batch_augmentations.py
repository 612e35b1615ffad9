"""The multi-crop DINO augmentation for whole batches on the training device (the GPU data path).

DataLoader workers only read the encoded files (:class:`EncodedImages`); the training process decodes
the batch (``torchvision.io.decode_jpeg`` on CUDA, batched, for JPEG files; torchvision's or PIL's CPU
decoder otherwise) and renders every crop with batched tensor operations on the device:

1. ``RandomResizedCrop`` boxes from the same sampler as :class:`~franca.data.augmentations.DataAugmentationDINO`
   (torchvision's 10-attempt rule), an antialiased bicubic resize per crop, a horizontal flip (p = 0.5);
2. colour jitter (p = 0.8): brightness, contrast, saturation and hue with the reference factor ranges, in a
   random order per crop — four rounds, each applying every operation with the identity factor for the
   crops whose order puts another operation there; then grayscale (p = 0.2);
3. Gaussian blur (9 taps, σ ~ U[0.1, 2], reflect padding) as two grouped 1-D convolutions with one kernel
   per crop (identity for the crops not blurred), with the effective reference probabilities
   0 / 0.9 / 0.5 (global 1 / global 2 / local); solarisation (p = 0.2, threshold 128) on global 2;
4. rounding to 8-bit levels once, then ImageNet normalisation into the requested dtype.

Every per-crop random choice is drawn on the device in one ``torch.rand`` call per crop group, so nothing
is synchronised with the host inside the pipeline except the crop boxes (drawn on the host from the image
sizes, which the host knows after decoding). The distribution of each crop is the reference one; the random
stream is not (the order in which numbers are drawn differs from the per-image CPU path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from franca.data.augmentations import (
    _BLUR_KERNEL_SIZE,
    _BLUR_SIGMA,
    _GRAYSCALE_P,
    _JITTER,
    _JITTER_P,
    _SOLARIZE_THRESHOLD,
    DataAugmentationDINO,
    _crop_box,
    _gray,
    _shift_hue,
    _Uniforms,
)
from franca.data.datasets.decoders import decode_image, warn_unreadable

_JPEG_MAGIC = b"\xff\xd8"


class EncodedImages(Dataset):
    """The encoded file bytes of an indexable dataset (one with ``get_image_data``) as uint8 tensors.

    ``dataset[i]`` is ``(bytes as a 1-D uint8 tensor, source name)``; decoding happens on the device.
    """

    def __init__(self, dataset) -> None:
        if not hasattr(dataset, "get_image_data"):
            raise TypeError(
                f"train.batch_augmentation needs an indexable dataset with get_image_data "
                f"(ImageNet, ImageNet22k, ImageFolder), got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        data = self.dataset.get_image_data(index)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), self.dataset.image_source(index)


def decode_batch(encoded: Sequence[Tensor], sources: Sequence[str], device: torch.device) -> list[Tensor]:
    """Decode encoded images into ``(3, H, W)`` uint8 tensors on ``device``.

    JPEG files go through ``torchvision.io.decode_jpeg`` in one batched call on CUDA; everything else (and
    every file on CPU) through the PIL decoder the datasets use. An unreadable file is reported once and
    replaced by the next readable image of the batch, so the batch keeps its size.
    """
    images: list[Tensor | None] = [None] * len(encoded)
    if device.type == "cuda":
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = [i for i, data in enumerate(encoded) if bytes(data[:2].tolist()) == _JPEG_MAGIC]
        if jpeg:
            try:
                decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
                for i, image in zip(jpeg, decoded):
                    images[i] = image
            except RuntimeError:
                pass  # one bad file fails the batched call: fall back to the per-file path below
    for i, data in enumerate(encoded):
        if images[i] is None:
            try:
                pil = decode_image(data.numpy().tobytes())
            except Exception as error:  # PIL and I/O raise many types; all mean "cannot use this file"
                warn_unreadable(sources[i], error)
                continue
            pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
            images[i] = pixels.view(pil.size[1], pil.size[0], 3).permute(2, 0, 1).to(device)
    readable = [image for image in images if image is not None]
    if not readable:
        raise RuntimeError(f"none of the {len(encoded)} images of the batch could be decoded (first: {sources[0]})")
    return [image if image is not None else readable[i % len(readable)] for i, image in enumerate(images)]


def _per_crop(values: Tensor) -> Tensor:
    """(N,) → (N, 1, 1, 1) for broadcasting over crops (N, C, H, W)."""
    return values.view(-1, 1, 1, 1)


def _jitter_batch(x: Tensor, draws: Tensor) -> Tensor:
    """Colour jitter of float crops (N, 3, S, S) in [0, 255]; ``draws`` (N, 9) uniforms, column 0 = apply.

    Columns 1–4 give the brightness, contrast, saturation and hue factors, 5–8 the random order. The crops
    without jitter get identity factors; each round applies every operation, identity where the crop's order
    has another operation in that round. A hue shift of 0 steps leaves the crop untouched (as the CPU path:
    the 8-bit hue round trip is skipped).
    """
    on = draws[:, 0] < _JITTER_P
    b, c, s = (_JITTER[k] for k in ("brightness", "contrast", "saturation"))
    brightness = torch.where(on, 1 - b + 2 * b * draws[:, 1], 1.0)
    contrast = torch.where(on, 1 - c + 2 * c * draws[:, 2], 1.0)
    saturation = torch.where(on, 1 - s + 2 * s * draws[:, 3], 1.0)
    hue_steps = torch.where(on, ((2 * draws[:, 4] - 1) * _JITTER["hue"] * 255).trunc(), 0.0)
    order = draws[:, 5:9].argsort(dim=1)
    for rank in range(4):
        chosen = order[:, rank]
        factor = _per_crop(torch.where(chosen == 0, brightness, 1.0))
        x = x.mul(factor).clamp_(0, 255)
        factor = _per_crop(torch.where(chosen == 1, contrast, 1.0))
        mean_gray = _gray_batch(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()
        x = x.mul(factor).add_((1 - factor) * mean_gray).clamp_(0, 255)
        factor = _per_crop(torch.where(chosen == 2, saturation, 1.0))
        x = x.mul(factor).add_((1 - factor) * _gray_batch(x)).clamp_(0, 255)
        steps = torch.where(chosen == 3, hue_steps, 0.0)
        x = torch.where(_per_crop(steps != 0), _shift_hue(x, steps.long().view(-1, 1, 1)), x)
    return x


def _gray_batch(x: Tensor) -> Tensor:
    """Luma (N, 1, H, W) of float RGB crops (N, 3, H, W)."""
    return _gray(x.transpose(0, 1)).transpose(0, 1)


def _blur_batch(x: Tensor, sigmas: Tensor) -> Tensor:
    """9-tap Gaussian blur of (N, C, H, W) with one σ per crop (σ = 0: identity), reflect padding, 2 passes."""
    n, channels, height, width = x.shape
    half = _BLUR_KERNEL_SIZE // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    taps = torch.exp(-0.5 * (offsets / sigmas.clamp(min=1e-6).unsqueeze(1)) ** 2)
    taps = taps / taps.sum(dim=1, keepdim=True)  # σ → 0 gives the one-hot identity kernel
    kernel = taps.repeat_interleave(channels, dim=0)  # (N·C, 9)
    padded = F.pad(x, (half, half, half, half), mode="reflect").view(1, n * channels, height + 2 * half, -1)
    rows = F.conv2d(padded, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    out = F.conv2d(rows, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return out.view(n, channels, height, width)


class BatchAugmentationDINO(DataAugmentationDINO):
    """Batched multi-crop augmentation: decoded uint8 images → normalised global and local crop batches.

    Built with the arguments of :class:`~franca.data.augmentations.DataAugmentationDINO` (``uint8_crops`` and
    ``jpeg_draft`` do not apply: decoding is separate, see :func:`decode_batch`). ``__call__(images)`` with
    ``images`` a list of B ``(3, H_i, W_i)`` uint8 tensors on one device returns ``(global (2B, 3, S, S),
    local (n_local·B, 3, s, s))`` in ``dtype``, crop-major like :func:`~franca.data.collate.collate_data_and_cast`.
    """

    def __call__(self, images: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        if not images:
            raise ValueError("BatchAugmentationDINO: empty batch")
        device = images[0].device
        u = _Uniforms(block=40 * len(self._crop_specs) * len(images))
        crops = [self._render_group(images, spec, u, device, dtype) for spec in self._crop_specs]
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if len(crops) > 2 else torch.empty(0, dtype=dtype, device=device)
        return global_crops, local_crops

    def _render_group(self, images, spec, u: _Uniforms, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Crop ``spec`` of every image: (B, 3, S, S) normalised."""
        size, scale, blur_p, solarize_p = spec
        resized = []
        for image in images:
            top, left, h, w = _crop_box(u, image.shape[-2], image.shape[-1], scale)
            region = image[:, top : top + h, left : left + w].unsqueeze(0).float()
            resized.append(F.interpolate(region, size=(size, size), mode="bicubic", antialias=True))
        x = torch.cat(resized).clamp_(0, 255)
        draws = torch.rand(len(images), 14, device=device)
        x = torch.where(_per_crop(draws[:, 0] < 0.5), x.flip(-1), x)
        x = _jitter_batch(x, draws[:, 1:10])
        x = torch.where(_per_crop(draws[:, 10] < _GRAYSCALE_P), _gray_batch(x).expand_as(x), x)
        low, high = _BLUR_SIGMA
        sigmas = torch.where(draws[:, 11] < blur_p, low + (high - low) * draws[:, 12], 0.0)
        x = _blur_batch(x, sigmas).clamp_(0, 255).add_(0.5).floor_()
        solarize = _per_crop(draws[:, 13] < solarize_p) & (x >= _SOLARIZE_THRESHOLD)
        x = torch.where(solarize, 255 - x, x)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return x.div_(255).sub_(mean).div_(std).to(dtype)
