"""Evaluation / linear-probe transforms and the ImageNet normalisation shared by every pipeline.

Normalisation is ``(x / 255 − mean) / std`` per channel with the ImageNet statistics below; the
float arithmetic is the one of ``ToTensor`` + ``Normalize`` (divide by 255, subtract, divide), so
normalising 8-bit crops in a batch (:func:`normalize_uint8`) is bit-identical to normalising each
crop with torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import transforms

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class MaybeToTensor(transforms.ToTensor):
    """``ToTensor`` that passes tensors through unchanged (PIL / ndarray → float CHW in [0, 1])."""

    def __call__(self, pic):
        if isinstance(pic, torch.Tensor):
            return pic
        return super().__call__(pic)


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> transforms.Normalize:
    """``Normalize(mean, std)`` for float CHW tensors in [0, 1]."""
    return transforms.Normalize(mean=mean, std=std)


def normalize_uint8(
    images: torch.Tensor,
    out: torch.Tensor | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Normalise uint8 images ``(..., 3, H, W)`` into float: ``(x / 255 − mean) / std``.

    The result is written into ``out`` (any floating dtype, same shape) when given. The arithmetic
    runs in float32 and is cast once, as ``ToTensor`` + ``Normalize`` followed by ``.to(dtype)``.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_uint8 expects uint8 images, got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != len(mean):
        raise ValueError(f"normalize_uint8 expects (..., {len(mean)}, H, W) images, got shape {tuple(images.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32)
    elif out.shape != images.shape or not out.is_floating_point():
        raise ValueError(f"normalize_uint8: out must be a float tensor of shape {tuple(images.shape)}")
    work = out if out.dtype == torch.float32 else torch.empty(images.shape, dtype=torch.float32)
    work.copy_(images).div_(255).sub_(mean_t).div_(std_t)
    if work is not out:
        out.copy_(work)
    return out


def make_classification_train_transform(
    *,
    crop_size: int = 224,
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BICUBIC,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Linear-probe training: RandomResizedCrop (default scale (0.08, 1)), flip, tensor, normalise."""
    steps: list = [transforms.RandomResizedCrop(crop_size, interpolation=interpolation)]
    if hflip_prob > 0.0:
        steps.append(transforms.RandomHorizontalFlip(hflip_prob))
    steps += [MaybeToTensor(), make_normalize_transform(mean, std)]
    return transforms.Compose(steps)


def make_classification_eval_transform(
    *,
    resize_size: int = 256,
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BICUBIC,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> transforms.Compose:
    """Evaluation: resize the short side to ``resize_size``, centre-crop ``crop_size``, tensor, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=interpolation),
            transforms.CenterCrop(crop_size),
            MaybeToTensor(),
            make_normalize_transform(mean, std),
        ]
    )
