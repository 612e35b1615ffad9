"""Multi-crop DINO augmentation per image (the data-loader workers' executor of :mod:`franca.data.multicrop`).

Every crop follows the reference recipe (torchvision on PIL images) with the distribution of
:class:`~franca.data.multicrop.MultiCropDistribution`: a bicubic ``RandomResizedCrop`` and flip, colour
jitter in a random order then grayscale, Gaussian blur and solarisation, ImageNet normalisation.

What differs is how it is computed: the crop boxes and the decisions of all crops of an image are
drawn in two calls (:func:`~franca.data.multicrop.crop_box`, :meth:`~MultiCropDistribution.image_draws`); a
JPEG opened lazily (``Image.open`` without ``convert``) is decoded at 1/2, 1/4 or 1/8 scale (PIL
draft) when every crop of the image still has at least its output size in the reduced image; the
bicubic resize is torch's antialiased uint8 kernel (PIL's filter; within ±1–2 levels of
``Image.resize``); brightness/contrast/saturation are affine maps on a float copy of the crop
(clipped to [0, 255] only when a factor can leave the range); hue is the HSV hue rotation on
8-bit hue levels, as PIL's, without a colour-space round trip; the blur is two 1-D passes; the
crop is rounded to 8 bits once at the end (the reference rounds after every PIL operation). Crops
stay ``uint8`` with ``uint8_crops=True``; :func:`collate_data_and_cast` then
normalises the whole batch at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from franca.data.multicrop import (
    BLUR_KERNEL_SIZE,
    N_GLOBAL_CROPS,
    SOLARIZE_THRESHOLD,
    CropDraws,
    MultiCropDistribution,
    Uniforms,
    crop_box,
)
from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_uint8

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0])  # HSV→RGB phase of R, G, B (in sextants)


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(1, H, W)`` of a float RGB crop ``(3, H, W)``."""
    return torch.tensordot(x.new_tensor(_GRAY_WEIGHTS), x, dims=1).unsqueeze(0)


def shift_hue(x: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of float RGB crops ``(..., 3, H, W)`` by ``steps``/255 of a turn, keeping S and V.

    ``steps`` is an int or an integer tensor broadcasting against ``(..., H, W)`` (one shift per crop).

    As PIL's HSV round trip: the hue h ∈ [0, 6) sextants is quantised to the 8-bit level
    ``L = ⌊255 h / 6⌋``, shifted to ``(L + steps) mod 256`` and mapped back to ``h' = 6 L' / 255``;
    channel n ∈ (R, G, B) of the result is ``V − C · clamp(min(k, 4 − k), 0, 1)`` with
    ``k = (h' + (5, 3, 1)[n]) mod 6``, V = max and C = max − min of the pixel.
    """
    red, green, blue = x.unbind(-3)
    value = torch.maximum(torch.maximum(red, green), blue)
    chroma = value - torch.minimum(torch.minimum(red, green), blue)
    scaled_hue = torch.where(
        value == red,
        green - blue,
        torch.where(value == green, (blue - red).add_(chroma, alpha=2), (red - green).add_(chroma, alpha=4)),
    )
    hue = scaled_hue.div_(chroma.clamp(min=1e-6)).remainder_(6)
    level = hue.mul_(255 / 6).long().add_(steps).bitwise_and_(255)
    offsets = _HUE_OFFSETS.to(device=x.device, dtype=x.dtype).view(3, 1)
    phase = (torch.arange(256, dtype=x.dtype, device=x.device) * (6 / 255) + offsets).remainder_(6)
    table = torch.minimum(phase, 4 - phase).clamp_(0, 1)  # (3, 256): fraction of C removed per level
    removed = table.index_select(1, level.reshape(-1)).view(3, *level.shape).movedim(0, -3)
    return value.unsqueeze(-3) - chroma.unsqueeze(-3) * removed


def _color_jitter(x: torch.Tensor, draw: CropDraws) -> torch.Tensor:
    """torchvision ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` on a float RGB crop in [0, 255] with one crop's factors and
    operation order (``draw``, Python values)."""
    for op in draw.order:
        if op == 0:
            x.mul_(draw.brightness)
            if draw.brightness > 1:
                x.clamp_(max=255)
        elif op == 1:
            mean_gray = math.floor(float(gray(x.mean(dim=(1, 2), keepdim=True))) + 0.5)
            x.mul_(draw.contrast).add_((1 - draw.contrast) * mean_gray)
            if draw.contrast > 1:
                x.clamp_(0, 255)
        elif op == 2:
            luma = gray(x)
            x.mul_(draw.saturation).add_(luma, alpha=1 - draw.saturation)
            if draw.saturation > 1:
                x.clamp_(0, 255)
        elif draw.hue_steps != 0:  # the reference shifts PIL's 8-bit hue channel by this many levels
            x = shift_hue(x, draw.hue_steps)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """9-tap Gaussian blur with reflect padding as two 1-D passes (rows, then columns)."""
    half = BLUR_KERNEL_SIZE // 2
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-half, half + 1)]
    total = sum(taps)
    taps = [t / total for t in taps]
    height, width = x.shape[-2:]
    padded = F.pad(x.unsqueeze(0), (half, half, half, half), mode="reflect").squeeze(0)
    rows = padded[..., 0:width] * taps[0]
    for i in range(1, BLUR_KERNEL_SIZE):
        rows.add_(padded[..., i : i + width], alpha=taps[i])
    out = rows[..., 0:height, :] * taps[0]
    for i in range(1, BLUR_KERNEL_SIZE):
        out.add_(rows[..., i : i + height, :], alpha=taps[i])
    return out


class DataAugmentationDINO(MultiCropDistribution):
    """Multi-crop augmentation of one PIL image (see the module docstring), with the parameters of
    :class:`~franca.data.multicrop.MultiCropDistribution`.

    Called on a PIL image, returns ``{"global_crops": [g1, g2], "local_crops": [l1, …, lN]}`` with ``(3, S, S)``
    crops: ImageNet-normalised float32 (default, as the reference) or ``uint8`` in [0, 255] with
    ``uint8_crops=True`` (to be normalised per batch by ``collate_data_and_cast``). ``jpeg_draft`` allows the
    reduced-scale JPEG decode.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        *,
        uint8_crops: bool = False,
        jpeg_draft: bool = True,
        blur_probabilities: Sequence[float] = (0.0, 0.9, 0.5),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__(
            global_crops_scale,
            local_crops_scale,
            local_crops_number,
            global_crops_size,
            local_crops_size,
            blur_probabilities=blur_probabilities,
            mean=mean,
            std=std,
        )
        self.uint8_crops = uint8_crops
        self.jpeg_draft = jpeg_draft

    def __call__(self, image: Image.Image) -> dict:
        if not isinstance(image, Image.Image):
            raise TypeError(f"DataAugmentationDINO expects a PIL image, got {type(image).__name__}")
        u = Uniforms(block=8 * len(self.crop_specs))
        width, height = image.size
        boxes = [crop_box(u, height, width, spec.scale) for spec in self.crop_specs]
        image, factor = self._decode(image, boxes)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), HWC memory
        crops = [
            self._render(pixels, box, factor, spec.size, draw)
            for box, spec, draw in zip(boxes, self.crop_specs, self.image_draws())
        ]
        if not self.uint8_crops:
            crops = [normalize_uint8(c, mean=self.mean, std=self.std) for c in crops]
        return {"global_crops": crops[:N_GLOBAL_CROPS], "local_crops": crops[N_GLOBAL_CROPS:]}

    def _decode(self, image: Image.Image, boxes: list[tuple[int, int, int, int]]) -> tuple[Image.Image, float]:
        """Decode (at a reduced JPEG scale when every crop still has ≥ its output size) as RGB.

        Returns the image and the factor mapping full-size coordinates onto it.
        """
        width = image.size[0]
        if self.jpeg_draft and image.format == "JPEG":
            for reduction in (8, 4, 2):
                if all(min(h, w) >= reduction * spec.size for (_, _, h, w), spec in zip(boxes, self.crop_specs)):
                    image.draft("RGB", (image.size[0] // reduction, image.size[1] // reduction))
                    break
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image, image.size[0] / width

    @staticmethod
    def _render(pixels: torch.Tensor, box, factor: float, size: int, draw: CropDraws) -> torch.Tensor:
        """One crop: resize, flip, jitter, grayscale, blur, solarise → uint8 ``(3, size, size)``."""
        top, left, h, w = (round(v * factor) for v in box) if factor != 1.0 else box
        region = pixels[:, :, top : top + max(h, 1), left : left + max(w, 1)]
        # antialiased bicubic on uint8 (PIL's separable filter, within ±1 level of Image.resize)
        crop = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True).squeeze(0)
        if draw.flip:
            crop = crop.flip(-1)
        if draw.jitter or draw.grayscale or draw.sigma:
            x = crop.float()
            if draw.jitter:
                x = _color_jitter(x, draw)
            if draw.grayscale:
                x = gray(x)
            if draw.sigma:
                x = _gaussian_blur(x, draw.sigma)
            crop = x.clamp_(0, 255).add_(0.5).to(torch.uint8)
        if draw.solarize:
            crop = torch.where(crop >= SOLARIZE_THRESHOLD, 255 - crop, crop)
        return crop.expand(3, size, size).contiguous()
