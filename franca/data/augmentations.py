"""Multi-crop DINO augmentation: 2 global + N local crops with the reference distribution, made fast.

Every crop follows the reference recipe (torchvision on PIL images):

1. ``RandomResizedCrop(size, scale, ratio=(3/4, 4/3), bicubic)`` (torchvision's 10-attempt
   sampler, central-crop fallback) and a horizontal flip with p = 0.5;
2. with p = 0.8 colour jitter — brightness, contrast, saturation, hue in a random order with
   factors ``U[0.6, 1.4]``, ``U[0.6, 1.4]``, ``U[0.8, 1.2]``, ``U[−0.1, 0.1]`` — then grayscale
   with p = 0.2;
3. Gaussian blur (kernel 9, σ ~ U[0.1, 2.0], reflect padding) with p = ``blur_probabilities`` for
   (global 1, global 2, local), and solarisation (threshold 128) with p = 0.2 on global 2;
4. ImageNet normalisation.

The reference wraps torchvision's blur in ``RandomApply(p=1 − p)``, so its requested
probabilities 1.0 / 0.1 / 0.5 take effect as 0.0 / 0.9 / 0.5; that effective behaviour is the
default here. Pass ``blur_probabilities=(1.0, 0.1, 0.5)`` for the BYOL/DINO recipe as written.

What differs is how it is computed: all random numbers of an image are drawn in one call; a
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

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_uint8

logger = logging.getLogger("franca")

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0])  # HSV→RGB phase of R, G, B (in sextants)
_BLUR_KERNEL_SIZE = 9
_BLUR_SIGMA = (0.1, 2.0)
_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
_JITTER_P, _GRAYSCALE_P, _SOLARIZE_P, _SOLARIZE_THRESHOLD = 0.8, 0.2, 0.2, 128
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


class _Uniforms:
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


def _crop_box(u: _Uniforms, height: int, width: int, scale: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of a crop of the image."""
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


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``(1, H, W)`` of a float RGB crop ``(3, H, W)``."""
    return torch.tensordot(x.new_tensor(_GRAY_WEIGHTS), x, dims=1).unsqueeze(0)


def _shift_hue(x: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
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


def _color_jitter(x: torch.Tensor, u: _Uniforms) -> torch.Tensor:
    """torchvision ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` on a float RGB crop in [0, 255], in a random order."""
    brightness = u.between(1 - _JITTER["brightness"], 1 + _JITTER["brightness"])
    contrast = u.between(1 - _JITTER["contrast"], 1 + _JITTER["contrast"])
    saturation = u.between(1 - _JITTER["saturation"], 1 + _JITTER["saturation"])
    hue_factor = u.between(-_JITTER["hue"], _JITTER["hue"])
    hue_steps = int(hue_factor * 255)  # the reference shifts PIL's 8-bit hue channel by this
    for op in sorted(range(4), key=lambda _: u()):
        if op == 0:
            x.mul_(brightness)
            if brightness > 1:
                x.clamp_(max=255)
        elif op == 1:
            mean_gray = math.floor(float(_gray(x.mean(dim=(1, 2), keepdim=True))) + 0.5)
            x.mul_(contrast).add_((1 - contrast) * mean_gray)
            if contrast > 1:
                x.clamp_(0, 255)
        elif op == 2:
            gray = _gray(x)
            x.mul_(saturation).add_(gray, alpha=1 - saturation)
            if saturation > 1:
                x.clamp_(0, 255)
        elif hue_steps != 0:
            x = _shift_hue(x, hue_steps)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """9-tap Gaussian blur with reflect padding as two 1-D passes (rows, then columns)."""
    half = _BLUR_KERNEL_SIZE // 2
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-half, half + 1)]
    total = sum(taps)
    taps = [t / total for t in taps]
    height, width = x.shape[-2:]
    padded = F.pad(x.unsqueeze(0), (half, half, half, half), mode="reflect").squeeze(0)
    rows = padded[..., 0:width] * taps[0]
    for i in range(1, _BLUR_KERNEL_SIZE):
        rows.add_(padded[..., i : i + width], alpha=taps[i])
    out = rows[..., 0:height, :] * taps[0]
    for i in range(1, _BLUR_KERNEL_SIZE):
        out.add_(rows[..., i : i + height, :], alpha=taps[i])
    return out


class DataAugmentationDINO:
    """Multi-crop augmentation (see the module docstring).

    Called on a PIL image, returns ``{"global_crops": [g1, g2], "global_crops_teacher": [g1, g2],
    "local_crops": [l1, …, lN], "offsets": ()}`` with ``(3, S, S)`` crops: ImageNet-normalised
    float32 (default, as the reference) or ``uint8`` in [0, 255] with ``uint8_crops=True`` (to be
    normalised per batch by ``collate_data_and_cast``).
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
        blur_probabilities: Sequence[float] = (0.0, 0.9, 0.5),
        jpeg_draft: bool = True,
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
        self.uint8_crops = uint8_crops
        self.blur_probabilities = tuple(blur_probabilities)
        self.jpeg_draft = jpeg_draft
        self.mean, self.std = tuple(mean), tuple(std)
        blur_g1, blur_g2, blur_local = self.blur_probabilities
        # (output size, crop scale, blur probability, solarisation probability) of each crop
        self._crop_specs = [
            (global_crops_size, self.global_crops_scale, blur_g1, 0.0),
            (global_crops_size, self.global_crops_scale, blur_g2, _SOLARIZE_P),
        ] + [(local_crops_size, self.local_crops_scale, blur_local, 0.0)] * local_crops_number
        logger.info(
            "DataAugmentationDINO: global %s px scale %s, %d local %s px scale %s, blur p %s, uint8 crops %s",
            global_crops_size,
            self.global_crops_scale,
            local_crops_number,
            local_crops_size,
            self.local_crops_scale,
            self.blur_probabilities,
            uint8_crops,
        )

    def __call__(self, image: Image.Image) -> dict:
        if not isinstance(image, Image.Image):
            raise TypeError(f"DataAugmentationDINO expects a PIL image, got {type(image).__name__}")
        u = _Uniforms(block=40 * len(self._crop_specs))
        width, height = image.size
        boxes = [_crop_box(u, height, width, scale) for _, scale, _, _ in self._crop_specs]
        image, factor = self._decode(image, boxes)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), HWC memory
        crops = [self._render(pixels, box, factor, spec, u) for box, spec in zip(boxes, self._crop_specs)]
        if not self.uint8_crops:
            crops = [normalize_uint8(c, mean=self.mean, std=self.std) for c in crops]
        global_crops = crops[:2]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": crops[2:],
            "offsets": (),
        }

    def _decode(self, image: Image.Image, boxes: list[tuple[int, int, int, int]]) -> tuple[Image.Image, float]:
        """Decode (at a reduced JPEG scale when every crop still has ≥ its output size) as RGB.

        Returns the image and the factor mapping full-size coordinates onto it.
        """
        width = image.size[0]
        if self.jpeg_draft and image.format == "JPEG":
            for reduction in (8, 4, 2):
                if all(min(h, w) >= reduction * size for (_, _, h, w), (size, *_) in zip(boxes, self._crop_specs)):
                    image.draft("RGB", (image.size[0] // reduction, image.size[1] // reduction))
                    break
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image, image.size[0] / width

    def _render(self, pixels: torch.Tensor, box, factor: float, spec, u: _Uniforms) -> torch.Tensor:
        """One crop: resize, flip, jitter, grayscale, blur, solarise → uint8 ``(3, S, S)``."""
        size, _, blur_p, solarize_p = spec
        top, left, h, w = (round(v * factor) for v in box) if factor != 1.0 else box
        region = pixels[:, :, top : top + max(h, 1), left : left + max(w, 1)]
        # antialiased bicubic on uint8 (PIL's separable filter, within ±1 level of Image.resize)
        crop = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True).squeeze(0)
        if u() < 0.5:
            crop = crop.flip(-1)
        jitter = u() < _JITTER_P
        grayscale = u() < _GRAYSCALE_P
        sigma = u.between(*_BLUR_SIGMA) if u() < blur_p else None
        solarize = u() < solarize_p
        if jitter or grayscale or sigma:
            x = crop.float()
            if jitter:
                x = _color_jitter(x, u)
            if grayscale:
                x = _gray(x)
            if sigma:
                x = _gaussian_blur(x, sigma)
            crop = x.clamp_(0, 255).add_(0.5).to(torch.uint8)
        if solarize:
            crop = torch.where(crop >= _SOLARIZE_THRESHOLD, 255 - crop, crop)
        return crop.expand(3, size, size).contiguous()
