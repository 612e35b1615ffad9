"""The multi-crop DINO augmentation for whole batches on the training device (the GPU data path).

DataLoader workers only read the encoded files (:class:`EncodedImages`); the training process decodes
the batch (``torchvision.io.decode_jpeg`` on CUDA, batched, for JPEG files; torchvision's or PIL's CPU
decoder otherwise) and renders every crop with batched tensor operations on the device. The distribution
is :mod:`franca.data.multicrop`'s, which the per-image executor
(:class:`~franca.data.augmentations.DataAugmentationDINO`) renders too:

1. the ``RandomResizedCrop`` boxes (:func:`~franca.data.multicrop.crop_box`), an antialiased bicubic resize per
   crop, the horizontal flip;
2. colour jitter in each crop's random order — four rounds, each applying every operation with the identity
   factor for the crops whose order puts another operation there; then grayscale;
3. Gaussian blur (reflect padding) as two grouped 1-D convolutions with one kernel per crop (identity for the
   crops not blurred); solarisation;
4. rounding to 8-bit levels once, then ImageNet normalisation into the requested dtype.

Every per-crop random choice (:func:`~franca.data.multicrop.draw_crops`) is drawn on the device in one
``torch.rand`` call per crop group, so nothing is synchronised with the host inside the pipeline except the
crop boxes (drawn on the host from the image sizes, which the host knows after decoding). The distribution of
each crop is the reference one; the random stream is not the per-image path's (numbers are drawn per crop group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from franca.data.augmentations import gray, shift_hue
from franca.data.datasets.decoders import decode_image, warn_unreadable
from franca.data.multicrop import (
    BLUR_KERNEL_SIZE,
    N_DRAWS,
    N_GLOBAL_CROPS,
    SOLARIZE_THRESHOLD,
    CropDraws,
    CropSpec,
    MultiCropDistribution,
    Uniforms,
    crop_box,
    draw_crops,
)

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


def _jitter_batch(x: Tensor, draws: CropDraws) -> Tensor:
    """Colour jitter of float crops (N, 3, S, S) in [0, 255] with the per-crop factors and order of ``draws``.

    The crops without jitter get identity factors; each round applies every operation, identity where the crop's
    order has another operation in that round. A hue shift of 0 steps leaves the crop untouched (as the per-image
    path: the 8-bit hue round trip is skipped).
    """
    on = draws.jitter
    brightness = torch.where(on, draws.brightness, 1.0)
    contrast = torch.where(on, draws.contrast, 1.0)
    saturation = torch.where(on, draws.saturation, 1.0)
    hue_steps = torch.where(on, draws.hue_steps, 0.0)
    for rank in range(4):
        chosen = draws.order[:, rank]
        factor = _per_crop(torch.where(chosen == 0, brightness, 1.0))
        x = x.mul(factor).clamp_(0, 255)
        factor = _per_crop(torch.where(chosen == 1, contrast, 1.0))
        mean_gray = _gray_batch(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_()
        x = x.mul(factor).add_((1 - factor) * mean_gray).clamp_(0, 255)
        factor = _per_crop(torch.where(chosen == 2, saturation, 1.0))
        x = x.mul(factor).add_((1 - factor) * _gray_batch(x)).clamp_(0, 255)
        steps = torch.where(chosen == 3, hue_steps, 0.0)
        x = torch.where(_per_crop(steps != 0), shift_hue(x, steps.long().view(-1, 1, 1)), x)
    return x


def _gray_batch(x: Tensor) -> Tensor:
    """Luma (N, 1, H, W) of float RGB crops (N, 3, H, W)."""
    return gray(x.transpose(0, 1)).transpose(0, 1)


def _blur_batch(x: Tensor, sigmas: Tensor) -> Tensor:
    """9-tap Gaussian blur of (N, C, H, W) with one σ per crop (σ = 0: identity), reflect padding, 2 passes."""
    n, channels, height, width = x.shape
    half = BLUR_KERNEL_SIZE // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    taps = torch.exp(-0.5 * (offsets / sigmas.clamp(min=1e-6).unsqueeze(1)) ** 2)
    taps = taps / taps.sum(dim=1, keepdim=True)  # σ → 0 gives the one-hot identity kernel
    kernel = taps.repeat_interleave(channels, dim=0)  # (N·C, 9)
    padded = F.pad(x, (half, half, half, half), mode="reflect").view(1, n * channels, height + 2 * half, -1)
    rows = F.conv2d(padded, kernel.view(n * channels, 1, 1, -1), groups=n * channels)
    out = F.conv2d(rows, kernel.view(n * channels, 1, -1, 1), groups=n * channels)
    return out.view(n, channels, height, width)


class BatchAugmentationDINO(MultiCropDistribution):
    """Batched multi-crop augmentation: decoded uint8 images → normalised global and local crop batches.

    Built with the parameters of :class:`~franca.data.multicrop.MultiCropDistribution` (decoding is separate, see
    :func:`decode_batch`). ``__call__(images)`` with ``images`` a list of B ``(3, H_i, W_i)`` uint8 tensors on one
    device returns ``(global (N_GLOBAL_CROPS·B, 3, S, S), local (n_local·B, 3, s, s))`` in ``dtype``, crop-major
    like :func:`~franca.data.collate.collate_data_and_cast`.
    """

    def __call__(self, images: Sequence[Tensor], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        if not images:
            raise ValueError("BatchAugmentationDINO: empty batch")
        device = images[0].device
        u = Uniforms(block=8 * len(self.crop_specs) * len(images))
        crops = [self._render_group(images, spec, u, device, dtype) for spec in self.crop_specs]
        global_crops = torch.cat(crops[:N_GLOBAL_CROPS])
        local_crops = crops[N_GLOBAL_CROPS:]
        return global_crops, torch.cat(local_crops) if local_crops else torch.empty(0, dtype=dtype, device=device)

    def _render_group(
        self, images: Sequence[Tensor], spec: CropSpec, u: Uniforms, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """Crop ``spec`` of every image: (B, 3, S, S) normalised."""
        resized = []
        for image in images:
            top, left, h, w = crop_box(u, image.shape[-2], image.shape[-1], spec.scale)
            region = image[:, top : top + h, left : left + w].unsqueeze(0).float()
            resized.append(F.interpolate(region, size=(spec.size, spec.size), mode="bicubic", antialias=True))
        x = torch.cat(resized).clamp_(0, 255)
        draws = draw_crops(torch.rand(len(images), N_DRAWS, device=device), spec.blur_p, spec.solarize_p)
        x = torch.where(_per_crop(draws.flip), x.flip(-1), x)
        x = _jitter_batch(x, draws)
        x = torch.where(_per_crop(draws.grayscale), _gray_batch(x).expand_as(x), x)
        x = _blur_batch(x, draws.sigma).clamp_(0, 255).add_(0.5).floor_()
        solarize = _per_crop(draws.solarize) & (x >= SOLARIZE_THRESHOLD)
        x = torch.where(solarize, 255 - x, x)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return x.div_(255).sub_(mean).div_(std).to(dtype)
