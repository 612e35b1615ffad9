"""The segmentation dataset readers on tiny trees in the real VOC 2012, ADE20K and SegFolder layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from franca.data.loaders import make_dataset
from franca.data.segmentation_transforms import make_segmentation_eval_transform, make_segmentation_train_transform


def _image(path: Path, size=(6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8)).save(path)


def _mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)


def test_voc2012_reads_palette_masks_of_a_split(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    values = np.array([[0, 0, 15, 15, 255, 1]] * 4)
    for name in ("2007_000032", "2007_000039"):
        _image(voc / "JPEGImages" / f"{name}.jpg")
        _mask(voc / "SegmentationClass" / f"{name}.png", values, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n2007_000032\n")
    train = make_dataset(f"VOC2012:root={tmp_path}:split=train")  # the parent of VOCdevkit is accepted too
    val = make_dataset(f"VOC2012:root={voc}:split=val")
    assert len(train) == 1 and len(val) == 2 and train.num_classes == 21
    image, mask = val[0]
    assert image.size == (6, 4) and mask.dtype == torch.int64
    assert torch.equal(mask, torch.from_numpy(values))
    with pytest.raises(FileNotFoundError, match="split file not found"):
        make_dataset(f"VOC2012:root={voc}:split=trainaug")


def test_ade20k_reduces_the_zero_label(tmp_path: Path) -> None:
    ade = tmp_path / "ADEChallengeData2016"
    values = np.array([[0, 1, 2, 150, 150, 0]] * 4)
    _image(ade / "images" / "training" / "ADE_train_00000001.jpg")
    _mask(ade / "annotations" / "training" / "ADE_train_00000001.png", values)
    dataset = make_dataset(f"ADE20K:root={tmp_path}:split=train", transforms=make_segmentation_eval_transform(8))
    image, mask = dataset[0]
    assert dataset.num_classes == 150 and image.shape == (3, 8, 8) and mask.shape == (8, 8)
    assert set(mask.unique().tolist()) == {255, 0, 1, 149}
    with pytest.raises(ValueError, match="train or val"):
        make_dataset(f"ADE20K:root={ade}:split=test")


def test_segfolder_nested_pairs_class_count_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    _image(root / "images" / "a" / "x.jpg")
    _mask(root / "masks" / "a" / "x.png", np.array([[0, 3, 255, 1, 1, 0]] * 4))
    _image(root / "images" / "y.png")
    _mask(root / "masks" / "y.png", np.zeros((4, 6)))
    dataset = make_dataset(f"SegFolder:root={root}", transforms=make_segmentation_train_transform(4, hflip=True))
    assert len(dataset) == 2 and dataset.scan_num_classes() == 4
    image, mask = dataset[0]
    assert image.shape == (3, 4, 4) and set(mask.unique().tolist()) <= {0, 1, 3, 255}
    _image(root / "images" / "z.png")
    with pytest.raises(FileNotFoundError, match="no mask"):
        make_dataset(f"SegFolder:root={root}")
    with pytest.raises(ValueError, match="has no masks"):
        make_dataset(f"ImageFolder:root={root}", transforms=make_segmentation_eval_transform(4))
