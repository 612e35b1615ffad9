"""``ImageFolder:root=DIR``: images in ``DIR/<class>/…``, classes are the sorted sub-folder names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from franca.data.datasets.extended import ExtendedVisionDataset

logger = logging.getLogger(__name__)


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions PIL can open (``.png``, ``.jpg``, ``.webp``, …)."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class ImageFolder(ExtendedVisionDataset):
    """Labelled images laid out as ``root/<class name>/<any sub-path>/<image file>``.

    The target of an image is the index of its class folder in the sorted list of class folders.
    Files are taken when their extension is one PIL reads (case-insensitive); hidden files and
    folders are skipped. Samples are ordered by class, then by relative path.
    """

    def __init__(
        self,
        *,
        root: str,
        transforms: Callable | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        super().__init__(root, transforms, transform, target_transform)
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageFolder root {str(folder)!r} does not exist or is not a directory")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(
                f"ImageFolder root {str(folder)!r} has no class sub-folders (expected ROOT/<class>/<image>)"
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        extensions = image_extensions()
        samples: list[tuple[str, int]] = []
        for class_index, name in enumerate(self.classes):
            class_dir = folder / name
            files = sorted(
                path
                for path in class_dir.rglob("*")
                if path.suffix.lower() in extensions
                and path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            )
            if not files:
                logger.warning("ImageFolder class folder %s holds no image files", class_dir)
            samples.extend((str(path), class_index) for path in files)
        if not samples:
            raise FileNotFoundError(f"ImageFolder root {str(folder)!r} holds no image files in its class folders")
        self.samples = samples
        self._targets = np.array([target for _, target in samples], dtype=np.int64)

    def get_image_data(self, index: int) -> bytes:
        with open(self.samples[index][0], "rb") as f:
            return f.read()

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def get_targets(self) -> np.ndarray:
        return self._targets.copy()

    def image_source(self, index: int) -> str:
        return self.samples[index][0]

    def __len__(self) -> int:
        return len(self.samples)
