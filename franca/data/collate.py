"""Batch multi-crop samples and draw the iBOT masks of the global crops.

Crop contract: each sample holds ``global_crops`` and ``local_crops`` as lists of ``(3, H, W)``
tensors, either

* ``uint8`` in ``[0, 255]`` (``DataAugmentationDINO(..., uint8_crops=True)``, the fast path): they
  are normalised here, once per batch, straight into the output buffer with the ImageNet
  ``(x / 255 − mean) / std`` (bit-identical to ``ToTensor`` + ``Normalize`` per crop), or
* floating point, already normalised (the reference behaviour): they are only stacked and cast.

Crops are ordered crop-major: ``[crop0 of every image, crop1 of every image, …]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from franca.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, normalize_uint8


def _crops_of(sample) -> dict:
    """The augmentation output of one sample: ``{"image": crops}`` or ``(crops, target)``."""
    if isinstance(sample, dict):
        return sample["image"] if "image" in sample else sample
    return sample[0]


def _stack_crops(crops: list[torch.Tensor], dtype: torch.dtype, mean: Sequence[float], std: Sequence[float]):
    if crops[0].dtype == torch.uint8:
        return normalize_uint8(torch.stack(crops), torch.empty((len(crops), *crops[0].shape), dtype=dtype), mean, std)
    return torch.stack(crops).to(dtype)


def collate_data_and_cast(
    samples_list: Sequence,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: Callable[[int], np.ndarray] | None = None,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> dict:
    """Stack crops (see the module docstring) and mask ``int(B · mask_probability)`` global crops.

    With ``B`` global crops and ``m = int(B · mask_probability)``, the interval ``mask_ratio_tuple =
    (r0, r1)`` is cut at ``linspace(r0, r1, m + 1)``; crop ``i < m`` gets
    ``int(n_tokens · U[p_i, p_{i+1}])`` masked patches, the other ``B − m`` none, and the list of
    masks is shuffled. Returns

    * ``collated_global_crops`` ``(n_global·batch, 3, H, W)``, ``collated_local_crops`` likewise,
      both in ``dtype``;
    * ``collated_masks`` bool ``(B, n_tokens)``; ``mask_indices_list`` the flat indices of its
      ``True`` entries; ``n_masked_patches`` = ``tensor([len(mask_indices_list)])``;
    * ``masks_weight`` ``1 / (masked patches of its image)`` for each masked patch;
    * ``upperbound`` ``Σ_i int(n_tokens · p_{i+1})`` ≥ the number of masked patches (a static
      buffer size for the iBOT head).
    """
    if not samples_list:
        raise ValueError("collate_data_and_cast: empty batch")
    if mask_generator is None or n_tokens is None:
        raise ValueError("collate_data_and_cast needs n_tokens and mask_generator")
    crops = [_crops_of(s) for s in samples_list]
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0]["local_crops"])
    global_list = [c["global_crops"][i] for i in range(n_global) for c in crops]
    local_list = [c["local_crops"][i] for i in range(n_local) for c in crops]
    collated_global = _stack_crops(global_list, dtype, mean, std)
    collated_local = _stack_crops(local_list, dtype, mean, std) if local_list else torch.empty(0, dtype=dtype)

    return {
        "collated_global_crops": collated_global,
        "collated_local_crops": collated_local,
        **draw_masks(len(global_list), mask_ratio_tuple, mask_probability, n_tokens, mask_generator),
    }


def draw_masks(
    n_images: int,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: Callable[[int], np.ndarray],
) -> dict:
    """The iBOT masks of ``n_images`` global crops and their derived keys (see :func:`collate_data_and_cast`)."""
    n_masked_images = int(n_images * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_masked_images + 1)
    upperbound = 0
    masks = []
    for i in range(n_masked_images):
        low, high = probs[i], probs[i + 1]
        masks.append(mask_generator(int(n_tokens * random.uniform(low, high))))
        upperbound += int(n_tokens * high)
    masks += [mask_generator(0) for _ in range(n_images - n_masked_images)]
    random.shuffle(masks)

    collated_masks = torch.from_numpy(np.stack(masks)).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_image = collated_masks.sum(-1, keepdim=True).clamp(min=1).float()
    masks_weight = (1 / per_image).expand_as(collated_masks)[collated_masks]
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


def collate_encoded(
    samples_list: Sequence[tuple[torch.Tensor, str]],
    n_global_crops: int,
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    n_tokens: int,
    mask_generator: Callable[[int], np.ndarray],
) -> dict:
    """Batch of encoded images for the device-side augmentation (``train.batch_augmentation``).

    Returns ``encoded_images`` (list of 1-D uint8 tensors), ``image_sources`` and the mask keys of
    :func:`collate_data_and_cast` for ``n_global_crops · B`` global crops; the crops themselves are rendered
    on the training device by :class:`~franca.data.batch_augmentations.BatchAugmentationDINO`.
    """
    if not samples_list:
        raise ValueError("collate_encoded: empty batch")
    return {
        "encoded_images": [data for data, _ in samples_list],
        "image_sources": [source for _, source in samples_list],
        **draw_masks(n_global_crops * len(samples_list), mask_ratio_tuple, mask_probability, n_tokens, mask_generator),
    }
