"""Base class of the indexable datasets: bytes + target per index, decoding with substitution."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets import VisionDataset

from franca.data.datasets.decoders import decode_image, warn_unreadable

UNLABELLED = -1
"""Target of a sample that has no class (ImageNet TEST split, unlabelled shards)."""

_MAX_SUBSTITUTIONS = 64


class ExtendedVisionDataset(VisionDataset):
    """A map-style dataset whose items are ``(image, target)`` with ``image`` an RGB PIL image before transforms.

    Subclasses provide ``get_image_data(index) -> bytes``, ``get_target(index) -> int``,
    ``image_source(index) -> str`` (a path for messages) and ``__len__``. When sample ``i`` cannot be
    decoded, a warning names its source (once) and the next readable sample ``i+1, i+2, …`` (cyclically)
    is returned in its place, image and target together, so batches keep their size and labels stay true.
    """

    def get_image_data(self, index: int) -> bytes:
        raise NotImplementedError

    def get_target(self, index: int) -> int:
        raise NotImplementedError

    def image_source(self, index: int) -> str:
        raise NotImplementedError

    def get_targets(self) -> np.ndarray:
        """All targets as an int64 array (``UNLABELLED`` where there is no class)."""
        return np.array([self.get_target(i) for i in range(len(self))], dtype=np.int64)

    @property
    def targets(self) -> np.ndarray:
        """Same as :meth:`get_targets` (the torchvision attribute name)."""
        return self.get_targets()

    def _load_readable(self, index: int) -> tuple[Image.Image, int]:
        count = len(self)
        for offset in range(min(count, _MAX_SUBSTITUTIONS)):
            candidate = (index + offset) % count
            try:
                image = decode_image(self.get_image_data(candidate))
            except Exception as error:  # PIL and I/O raise many types; all mean "cannot use this file"
                warn_unreadable(self.image_source(candidate), error)
                continue
            return image, self.get_target(candidate)
        raise RuntimeError(
            f"{type(self).__name__}: none of the {min(count, _MAX_SUBSTITUTIONS)} samples from index {index} "
            f"(first: {self.image_source(index)}) could be read; check the dataset files"
        )

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(self)} samples")
        image, target = self._load_readable(index % len(self))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __len__(self) -> int:
        raise NotImplementedError
