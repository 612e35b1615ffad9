"""The multi-crop distribution of DINO/Franca: ``N_GLOBAL_CROPS`` global + N local crops, parameters and random draws.

One definition, two executors: :class:`~franca.data.augmentations.DataAugmentationDINO` renders one PIL image
at a time in the data-loader workers, :class:`~franca.data.batch_augmentations.BatchAugmentationDINO` renders
whole batches of decoded tensors on the training device. Both take their parameters from
:class:`MultiCropDistribution` and every random decision of a crop from :func:`draw_crops`.

Per crop (the reference recipe, torchvision on PIL images):

* the box: ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3))`` — torchvision's 10-attempt sampler with the
  central-crop fallback (:func:`crop_box`);
* ``N_DRAWS`` uniforms ``u`` (columns) decide the rest: ``u0 < 0.5`` horizontal flip; ``u1 < 0.8`` colour
  jitter with brightness ``1 ± 0.4``, contrast ``1 ± 0.4``, saturation ``1 ± 0.2`` (``u2``–``u4`` uniform over
  the range) and hue ``± 0.1`` turn, applied as ``trunc(255 · h)`` 8-bit hue steps (``u5``), in the order that
  sorts ``u6``–``u9``; ``u10 < 0.2`` grayscale; ``u11 < blur_p`` Gaussian blur (9 taps) with σ ~ U[0.1, 2.0]
  (``u12``); ``u13 < solarize_p`` solarisation (threshold 128).

``blur_p`` is 0 / 0.9 / 0.5 for (global 1, global 2, local) by default: the reference wraps torchvision's blur in
``RandomApply(p=1 − p)``, so its requested probabilities 1.0 / 0.1 / 0.5 take effect inverted; pass
``blur_probabilities=(1.0, 0.1, 0.5)`` for the recipe as written. ``solarize_p`` is 0.2 on global 2, else 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger("franca")

N_GLOBAL_CROPS = 2
"""Global crops per image: the teacher sees these, the student these and the local crops."""

FLIP_P = 0.5
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_P, GRAYSCALE_P, SOLARIZE_P, SOLARIZE_THRESHOLD = 0.8, 0.2, 0.2, 128
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
N_DRAWS = 14
"""Uniforms per crop consumed by :func:`draw_crops` (the crop box is drawn separately)."""
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


class Uniforms:
    """U[0, 1) numbers from torch's global generator, drawn in blocks to avoid per-call overhead."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.values: list[float] = []

    def __call__(self) -> float:
        if not self.values:
            self.values = torch.rand(self.block, dtype=torch.float64).tolist()
        return self.values.pop()

    def between(self, low: float, high: float) -> float:
        return low + (high - low) * self()


def crop_box(u: Uniforms, height: int, width: int, scale: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of a crop of an image of (height, width)."""
    area = height * width
    for _ in range(10):
        target_area = area * u.between(scale[0], scale[1])
        aspect = math.exp(u.between(*_LOG_RATIO))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u() * (height - h + 1)), int(u() * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width * 4 / 3))
    elif in_ratio > 4 / 3:
        w, h = int(round(height * 4 / 3)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropSpec(NamedTuple):
    """One crop of the multi-crop: output side (px), crop-area scale range, blur and solarisation probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class CropDraws(NamedTuple):
    """The random decisions of crops: tensors ``(N,)`` (``order`` ``(N, 4)``) from :func:`draw_crops`, or one crop's
    Python values from :func:`split_draws`. ``sigma`` 0 means no blur; ``order`` lists the jitter operations
    (0 brightness, 1 contrast, 2 saturation, 3 hue) in the order they apply; the jitter factors are drawn for
    every crop and apply only where ``jitter`` is set."""

    flip: Tensor | bool
    jitter: Tensor | bool
    brightness: Tensor | float
    contrast: Tensor | float
    saturation: Tensor | float
    hue_steps: Tensor | int
    order: Tensor | list[int]
    grayscale: Tensor | bool
    sigma: Tensor | float
    solarize: Tensor | bool


def draw_crops(uniforms: Tensor, blur_p: Tensor | float, solarize_p: Tensor | float) -> CropDraws:
    """The decisions of N crops from ``uniforms`` (N, ``N_DRAWS``) in [0, 1) (column meanings in the module doc).

    ``blur_p`` / ``solarize_p`` are floats or (N,) tensors (one probability per crop).
    """
    if uniforms.ndim != 2 or uniforms.shape[1] != N_DRAWS:
        raise ValueError(f"draw_crops needs uniforms of shape (N, {N_DRAWS}), got {tuple(uniforms.shape)}")
    b, c, s, h = (JITTER[k] for k in ("brightness", "contrast", "saturation", "hue"))
    low, high = BLUR_SIGMA
    return CropDraws(
        flip=uniforms[:, 0] < FLIP_P,
        jitter=uniforms[:, 1] < JITTER_P,
        brightness=1 - b + 2 * b * uniforms[:, 2],
        contrast=1 - c + 2 * c * uniforms[:, 3],
        saturation=1 - s + 2 * s * uniforms[:, 4],
        hue_steps=((2 * uniforms[:, 5] - 1) * h * 255).trunc(),
        order=uniforms[:, 6:10].argsort(dim=1),
        grayscale=uniforms[:, 10] < GRAYSCALE_P,
        sigma=torch.where(uniforms[:, 11] < blur_p, low + (high - low) * uniforms[:, 12], 0.0),
        solarize=uniforms[:, 13] < solarize_p,
    )


def split_draws(draws: CropDraws) -> list[CropDraws]:
    """Batched draws → one :class:`CropDraws` of Python values per crop (ints for ``hue_steps`` and ``order``)."""
    columns = [field.tolist() for field in draws]
    crops = []
    for values in zip(*columns):
        crop = CropDraws(*values)
        crops.append(crop._replace(hue_steps=int(crop.hue_steps)))
    return crops


class MultiCropDistribution:
    """The parameters of the multi-crop: ``N_GLOBAL_CROPS`` global crops of ``global_crops_size`` px with area
    ``global_crops_scale`` and ``local_crops_number`` local ones, blur probabilities (global 1, global 2, local),
    the normalisation ``mean``/``std``; ``crop_specs`` lists one :class:`CropSpec` per crop, globals first."""

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        *,
        blur_probabilities: Sequence[float] = (0.0, 0.9, 0.5),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        if len(blur_probabilities) != 3 or not all(0 <= p <= 1 for p in blur_probabilities):
            raise ValueError(f"blur_probabilities must be 3 values in [0, 1], got {tuple(blur_probabilities)}")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_probabilities = tuple(blur_probabilities)
        self.mean, self.std = tuple(mean), tuple(std)
        blur_g1, blur_g2, blur_local = self.blur_probabilities
        self.crop_specs = [
            CropSpec(global_crops_size, self.global_crops_scale, blur_g1, 0.0),
            CropSpec(global_crops_size, self.global_crops_scale, blur_g2, SOLARIZE_P),
        ] + [CropSpec(local_crops_size, self.local_crops_scale, blur_local, 0.0)] * local_crops_number
        logger.info(
            "%s: global %s px scale %s, %d local %s px scale %s, blur p %s",
            type(self).__name__,
            global_crops_size,
            self.global_crops_scale,
            local_crops_number,
            local_crops_size,
            self.local_crops_scale,
            self.blur_probabilities,
        )

    def image_draws(self) -> list[CropDraws]:
        """The decisions of every crop of one image (Python values), from one ``torch.rand`` call."""
        specs = self.crop_specs
        uniforms = torch.rand(len(specs), N_DRAWS, dtype=torch.float64)
        blur_p = torch.tensor([spec.blur_p for spec in specs], dtype=torch.float64)
        solarize_p = torch.tensor([spec.solarize_p for spec in specs], dtype=torch.float64)
        return split_draws(draw_crops(uniforms, blur_p, solarize_p))
