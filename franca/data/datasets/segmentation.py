"""Semantic-segmentation datasets: images with per-pixel class masks (255 = ignore).

Dataset strings (``franca.data.loaders.make_dataset``)::

    VOC2012:root=R:split=S    R = the VOC2012 folder: JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
                              ImageSets/Segmentation/<S>.txt (S = train, val, trainval; trainaug reads
                              its masks from SegmentationClassAug/). 21 classes (0 = background).
    ADE20K:root=R:split=S     R = ADEChallengeData2016 (or its parent): images/{training,validation}/*.jpg,
                              annotations/{training,validation}/*.png; S = train or val. 150 classes:
                              annotation value v ≥ 1 is class v − 1, 0 ("other") is ignored (255).
    SegFolder:root=DIR        DIR/images/**/<name>.{jpg,jpeg,png} with DIR/masks/**/<name>.png at the same
                              relative path; mask values are class indices, 255 ignored.

An item is ``transforms(image, mask)`` when a paired transform is given (see
:mod:`franca.data.segmentation_transforms`), else ``(transform(image), target_transform(mask))`` with
the mask as an int64 tensor (H, W).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from franca.data.segmentation_transforms import mask_to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class SegmentationDataset(Dataset):
    """Pairs ``(image path, mask path)``; subclasses list them and say how mask values map to classes."""

    num_classes: int | None = None

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        transforms: Callable | None = None,
    ) -> None:
        if not pairs:
            raise ValueError(f"{type(self).__name__}: no image/mask pairs found")
        self.pairs = pairs
        self.transform = transform
        self.target_transform = target_transform
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.pairs)

    def convert_mask(self, mask: np.ndarray) -> np.ndarray:
        """Stored mask values → class indices (255 ignored); identity by default."""
        return mask

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The RGB image and its mask of class indices (mode L) at ``index``."""
        image_path, mask_path = self.pairs[index]
        image = Image.open(image_path).convert("RGB")
        mask = self.convert_mask(np.array(Image.open(mask_path)))
        if mask.ndim != 2:
            raise ValueError(f"mask {mask_path} must be one channel of class indices, got shape {mask.shape}")
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {mask_path} is {mask.shape[::-1]} pixels, its image is {image.size}")
        return image, Image.fromarray(mask.astype(np.uint8), mode="L")

    def scan_num_classes(self, ignore_index: int = 255) -> int:
        """1 + the largest class index in any mask (reads every mask once); the declared count when there is one."""
        if self.num_classes is not None:
            return self.num_classes
        largest = -1
        for _, mask_path in self.pairs:
            mask = self.convert_mask(np.array(Image.open(mask_path)))
            valid = mask[mask != ignore_index]
            if valid.size:
                largest = max(largest, int(valid.max()))
        if largest < 0:
            raise ValueError(f"{type(self).__name__}: every mask pixel is {ignore_index} (ignored): no class to learn")
        return largest + 1

    def __getitem__(self, index: int) -> tuple[object, object]:
        image, mask = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, mask)
        image = self.transform(image) if self.transform is not None else image
        target = mask_to_tensor(mask)
        return image, self.target_transform(target) if self.target_transform is not None else target


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class VOC2012(SegmentationDataset):
    """Pascal VOC 2012 segmentation (21 classes, 255 = object borders, ignored)."""

    num_classes = 21

    def __init__(self, *, root: str, split: str, **kwargs) -> None:
        root_path = Path(root).expanduser()
        if not (root_path / "JPEGImages").is_dir() and (root_path / "VOCdevkit" / "VOC2012").is_dir():
            root_path = root_path / "VOCdevkit" / "VOC2012"
        masks = "SegmentationClassAug" if split == "trainaug" else "SegmentationClass"
        ids = _read_ids(root_path / "ImageSets" / "Segmentation" / f"{split}.txt")
        pairs = [(root_path / "JPEGImages" / f"{i}.jpg", root_path / masks / f"{i}.png") for i in ids]
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"VOC2012 {split}: {len(missing)} files missing, e.g. {missing[0]}")
        super().__init__(pairs, **kwargs)


class ADE20K(SegmentationDataset):
    """ADE20K scene parsing (ADEChallengeData2016): 150 classes, annotation 0 ignored."""

    num_classes = 150
    _SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, *, root: str, split: str, **kwargs) -> None:
        if split not in self._SPLITS:
            raise ValueError(f"ADE20K split must be train or val, got {split!r}")
        root_path = Path(root).expanduser()
        if (root_path / "ADEChallengeData2016").is_dir():
            root_path = root_path / "ADEChallengeData2016"
        folder = self._SPLITS[split]
        images = root_path / "images" / folder
        if not images.is_dir():
            raise FileNotFoundError(f"ADE20K images not found: {images}")
        pairs = [(p, root_path / "annotations" / folder / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
        missing = [str(m) for _, m in pairs if not m.is_file()]
        if missing:
            raise FileNotFoundError(f"ADE20K {split}: {len(missing)} annotations missing, e.g. {missing[0]}")
        super().__init__(pairs, **kwargs)

    def convert_mask(self, mask: np.ndarray) -> np.ndarray:
        """``v − 1`` for v ≥ 1 and 255 for 0 ("reduce zero label")."""
        return np.where(mask == 0, 255, mask.astype(np.int64) - 1)


class SegFolder(SegmentationDataset):
    """A folder of images with masks of the same relative path (any number of classes, 255 ignored)."""

    def __init__(self, *, root: str, **kwargs) -> None:
        root_path = Path(root).expanduser()
        images, masks = root_path / "images", root_path / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise FileNotFoundError(f"SegFolder {root_path} needs images/ and masks/ sub-folders")
        pairs = []
        for folder, _, files in sorted(os.walk(images)):
            for name in sorted(files):
                image = Path(folder) / name
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    mask = masks / image.relative_to(images).with_suffix(".png")
                    if not mask.is_file():
                        raise FileNotFoundError(f"SegFolder: no mask {mask} for the image {image}")
                    pairs.append((image, mask))
        super().__init__(pairs, **kwargs)
