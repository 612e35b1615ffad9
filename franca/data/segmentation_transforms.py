"""Paired image + mask transforms for the dense evaluations.

A segmentation item is a PIL image and a PIL mask of class indices of the same size. Geometric steps
are drawn once and applied to both (bilinear for the image, nearest for the mask, so labels stay
integers); photometric steps touch the image only. The pipeline ends with the image as a normalised
float tensor (3, S, S) and the mask as an int64 tensor (S, S).

HummingBird (open-hummingbird-eval): train = shared ``RandomResizedCrop(S, scale=(0.5, 2.0))``, then on
the image four independent colour jitters (brightness, contrast, saturation, hue, 0.1 each, p = 0.5);
val = both resized to (S, S). The linear segmentation eval adds a shared horizontal flip to the train crop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from franca.data.transforms import make_normalize_transform

HBIRD_CROP_SCALE = (0.5, 2.0)
HBIRD_JITTER = 0.1
HBIRD_JITTER_P = 0.5

PairedTransform = Callable[[Image.Image, Image.Image], tuple[Image.Image, Image.Image]]


class PairedRandomResizedCrop:
    """One ``RandomResizedCrop`` box for image and mask: the image resampled bilinearly, the mask by nearest."""

    def __init__(self, size: int, scale: Sequence[float] = HBIRD_CROP_SCALE, ratio=(3 / 4, 4 / 3)) -> None:
        self.size = (size, size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        image = TF.resized_crop(image, top, left, height, width, self.size, InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resized_crop(mask, top, left, height, width, self.size, InterpolationMode.NEAREST)
        return image, mask


class PairedResize:
    """Both resized to (size, size): the image bilinearly with antialiasing, the mask by nearest."""

    def __init__(self, size: int) -> None:
        self.size = (size, size)

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        return (
            TF.resize(image, self.size, InterpolationMode.BILINEAR, antialias=True),
            TF.resize(mask, self.size, InterpolationMode.NEAREST),
        )


class PairedRandomHorizontalFlip:
    """Mirror image and mask together with probability ``p`` (drawn from torch's generator, like the crops)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
        if torch.rand(1).item() < self.p:
            return TF.hflip(image), TF.hflip(mask)
        return image, mask


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """A PIL mask of class indices (mode L or P) → int64 (H, W)."""
    return torch.from_numpy(np.array(mask, dtype=np.int64))


class SegmentationTransform:
    """``(image, mask)`` → ``(normalised float (3, S, S), int64 (S, S))``: paired steps, then image-only steps."""

    def __init__(self, paired: Sequence[PairedTransform], image: Callable) -> None:
        self.paired = list(paired)
        self.image = image

    def __call__(self, image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        for step in self.paired:
            image, mask = step(image, mask)
        return self.image(image), mask_to_tensor(mask)


def _colour_jitter(strength: float, p: float) -> list[transforms.RandomApply]:
    return [
        transforms.RandomApply([transforms.ColorJitter(**{name: strength})], p=p)
        for name in ("brightness", "contrast", "saturation", "hue")
    ]


def make_segmentation_train_transform(
    crop_size: int, scale: Sequence[float] = HBIRD_CROP_SCALE, hflip: bool = False
) -> SegmentationTransform:
    """The HummingBird memory augmentation (random resized crop + colour jitter), optionally with a flip."""
    paired: list[PairedTransform] = [PairedRandomResizedCrop(crop_size, scale)]
    if hflip:
        paired.append(PairedRandomHorizontalFlip())
    image = transforms.Compose(
        [*_colour_jitter(HBIRD_JITTER, HBIRD_JITTER_P), transforms.ToTensor(), make_normalize_transform()]
    )
    return SegmentationTransform(paired, image)


def make_segmentation_eval_transform(crop_size: int) -> SegmentationTransform:
    """Image and mask resized to (crop_size, crop_size), the image normalised."""
    return SegmentationTransform(
        [PairedResize(crop_size)], transforms.Compose([transforms.ToTensor(), make_normalize_transform()])
    )
