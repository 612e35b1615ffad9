"""Images for RASA post-training: the official crop augmentations and the dataset layouts it reads.

Training layouts (``data.dataset_name``):

* ``voc``: Pascal VOC as the official code reads it — ``<root>/images/<id>.jpg``, ``<root>/sets/<split>.txt``,
  ``<root>/SegmentationClassAug/<id>.png`` (train / trainaug splits) and ``<root>/SegmentationClass/<id>.png``
  (val); ``<root>`` may also be the parent of a ``VOCSegmentation`` folder.
* ``coco``: the images of ``<root>/images/train2017`` (or ``<root>/train2017``), unlabelled.
* ``imagenet100``: the classes listed in ``<root>/imagenet100.txt`` (one WordNet id a line), images in
  ``<root>/train/<wnid>/`` folders or ``<root>/train/<wnid>.tar`` shards.
* ``folder``: every image file under ``<root>`` (recursively; class sub-folders or none).

Held-out images are Pascal VOC ``val`` (with masks, enabling k-means mIoU) or a plain folder.
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_DATASETS = ("voc", "coco", "imagenet100", "folder")


class PILGaussianBlur:
    """Blur a PIL image with a Gaussian of radius σ ~ U(sigma[0], sigma[1]) (SimCLR-style, as RASA uses)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def make_rasa_train_transform(
    size_crops: int,
    min_scale_crops: float = 0.25,
    max_scale_crops: float = 1.0,
    jitter_strength: float = 0.4,
    blur_strength: float = 1.0,
) -> transforms.Compose:
    """The official RASA training view: a random resized crop (scale ∈ [min, max]) to ``size_crops``², colour jitter
    (0.8·s, 0.8·s, 0.8·s, 0.2·s; p=0.8), grayscale (p=0.2), PIL Gaussian blur σ ∈ [0.1·b, 2·b] (p=0.5), horizontal and
    vertical flips (p=0.5 each), a rotation by up to ±90° (nearest, black fill; p=0.5), ImageNet normalisation.

    The official code normalises training views with std (0.229, 0.224, 0.255) (a typo for 0.225, which its
    validation transform uses); we use the ImageNet std for both.
    """
    s = jitter_strength
    return transforms.Compose(
        [
            transforms.RandomResizedCrop((size_crops, size_crops), scale=(min_scale_crops, max_scale_crops)),
            transforms.RandomApply([transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([PILGaussianBlur((0.1 * blur_strength, 2.0 * blur_strength))], p=0.5),
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomVerticalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.RandomRotation(90, interpolation=InterpolationMode.NEAREST, fill=0)], p=0.5
            ),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def make_rasa_val_transform(size: int) -> transforms.Compose:
    """Held-out view: resize to ``size``² (no crop), ImageNet normalisation."""
    return transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def make_rasa_mask_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Segmentation mask → (size, size) int64 class map (nearest resize; 255 = ignore)."""
    resize = transforms.Resize((size, size), interpolation=InterpolationMode.NEAREST)
    return lambda mask: torch.as_tensor(transforms.functional.pil_to_tensor(resize(mask))[0], dtype=torch.int64)


class ImageFiles(Dataset):
    """Unlabelled images: each item is a file path or a ``(tar_path, member_name)`` pair; returns the transformed image."""

    def __init__(self, items: list[str | tuple[str, str]], transform: Callable | None = None) -> None:
        self.items = items
        self.transform = transform
        self._tars: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _open(self, item: str | tuple[str, str]) -> Image.Image:
        if isinstance(item, str):
            return Image.open(item).convert("RGB")
        tar_path, member = item
        if tar_path not in self._tars:
            self._tars[tar_path] = tarfile.open(tar_path)
        return Image.open(io.BytesIO(self._tars[tar_path].extractfile(member).read())).convert("RGB")

    def __getitem__(self, index: int):
        image = self._open(self.items[index])
        return self.transform(image) if self.transform is not None else image

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tars": {}}


class VOCSegmentation(Dataset):
    """Pascal VOC segmentation split; items are images, or ``(image, mask)`` when ``mask_transform`` is given."""

    def __init__(
        self, root: str | Path, split: str, transform: Callable | None = None, mask_transform: Callable | None = None
    ) -> None:
        root = Path(root)
        if (root / "VOCSegmentation").is_dir():
            root = root / "VOCSegmentation"
        seg_folder = "SegmentationClass" if split == "val" else "SegmentationClassAug"
        split_file = root / "sets" / f"{split}.txt"
        for required in (root / "images", root / seg_folder, split_file):
            if not required.exists():
                raise FileNotFoundError(f"Pascal VOC layout: {required} not found (see rasa/data.py for the layout)")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        self.images = [root / "images" / f"{i}.jpg" for i in ids]
        self.masks = [root / seg_folder / f"{i}.png" for i in ids]
        missing = next((p for p in self.images + self.masks if not p.is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"Pascal VOC {split} split lists a file that does not exist: {missing}")
        self.transform = transform
        self.mask_transform = mask_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = Image.open(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        if self.mask_transform is None:
            return image
        return image, self.mask_transform(Image.open(self.masks[index]))


def image_files_under(root: str | Path) -> list[str]:
    """Every image file under ``root`` (recursive, sorted); a clear error when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def coco_items(root: str | Path) -> list[str]:
    """COCO train2017 images: ``<root>/images/train2017`` or ``<root>/train2017``."""
    root = Path(root)
    for candidate in (root / "images" / "train2017", root / "train2017"):
        if candidate.is_dir():
            return image_files_under(candidate)
    raise FileNotFoundError(f"COCO layout: neither {root}/images/train2017 nor {root}/train2017 exists")


def imagenet100_items(root: str | Path, class_list: str | Path | None = None) -> list[str | tuple[str, str]]:
    """ImageNet-100 images: classes from ``class_list`` (default ``<root>/imagenet100.txt``), each either a folder
    ``<root>/train/<wnid>/`` or a tar shard ``<root>/train/<wnid>.tar``."""
    root = Path(root)
    class_list = Path(class_list) if class_list is not None else root / "imagenet100.txt"
    if not class_list.is_file():
        raise FileNotFoundError(f"ImageNet-100 class list not found: {class_list}")
    train_dir = root / "train" if (root / "train").is_dir() else root
    items: list[str | tuple[str, str]] = []
    for wnid in (line.strip() for line in class_list.read_text().splitlines() if line.strip()):
        folder, shard = train_dir / wnid, train_dir / f"{wnid}.tar"
        if folder.is_dir():
            items.extend(image_files_under(folder))
        elif shard.is_file():
            with tarfile.open(shard) as tar:
                names = sorted(m.name for m in tar.getmembers() if m.isfile())
            items.extend((str(shard), n) for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise FileNotFoundError(f"ImageNet-100 class {wnid}: neither {folder}/ nor {shard} exists")
    return items


def build_train_dataset(
    dataset_name: str,
    data_dir: str | Path,
    transform: Callable,
    max_images: int | None = None,
    seed: int = 0,
    class_list: str | None = None,
) -> Dataset:
    """The unlabelled training images of one layout (``voc`` uses the ``trainaug`` split), optionally a seeded
    random subset of ``max_images``."""
    if dataset_name == "voc":
        dataset = VOCSegmentation(data_dir, "trainaug", transform=transform)
        items: list = [str(p) for p in dataset.images]
    elif dataset_name == "coco":
        items = coco_items(data_dir)
    elif dataset_name == "imagenet100":
        items = imagenet100_items(data_dir, class_list)
    elif dataset_name == "folder":
        items = image_files_under(data_dir)
    else:
        raise ValueError(f"data.dataset_name must be one of {', '.join(TRAIN_DATASETS)}; got {dataset_name!r}")
    if max_images is not None and max_images < len(items):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:max_images]
        items = [items[i] for i in sorted(order.tolist())]
    return ImageFiles(items, transform)


def build_val_dataset(
    voc_data_path: str | None, val_data_dir: str | None, size: int, max_images: int | None = None
) -> tuple[Dataset, bool]:
    """Held-out images at ``size``²: Pascal VOC val with masks (``(image, mask)`` items) when ``voc_data_path`` is
    set, else every image of ``val_data_dir``. Returns the dataset and whether it has masks."""
    transform = make_rasa_val_transform(size)
    if voc_data_path:
        dataset: Dataset = VOCSegmentation(voc_data_path, "val", transform, make_rasa_mask_transform(size))
        has_masks = True
    elif val_data_dir:
        dataset, has_masks = ImageFiles(image_files_under(val_data_dir), transform), False
    else:
        raise ValueError("held-out images are needed: set data.voc_data_path or data.val_data_dir")
    if max_images is not None and max_images < len(dataset):
        dataset = torch.utils.data.Subset(dataset, range(max_images))
    return dataset, has_masks
