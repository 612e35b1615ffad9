"""The embedded demo dataset: layout, idempotence, determinism, read-back, colour carries no class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from franca.data.datasets import DEMO_CLASSES, ImageFolder, write_demo_dataset
from franca.data.datasets import demo as demo_module
from franca.data.loaders import make_dataset


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_layout_and_read_back(tmp_path: Path):
    root = write_demo_dataset(tmp_path / "demo", n_train_per_class=3, n_val_per_class=2, image_size=32, seed=1)
    assert root == tmp_path / "demo"
    assert list(DEMO_CLASSES) == sorted(DEMO_CLASSES)
    train = make_dataset(f"ImageFolder:root={root / 'train'}")
    val = make_dataset(f"ImageFolder:root={root / 'val'}")
    assert isinstance(train, ImageFolder)
    assert train.classes == val.classes == list(DEMO_CLASSES)
    assert len(train) == 3 * len(DEMO_CLASSES) and len(val) == 2 * len(DEMO_CLASSES)
    assert np.bincount(train.get_targets()).tolist() == [3] * len(DEMO_CLASSES)
    image, target = val[5]
    assert image.mode == "RGB" and image.size == (32, 32) and target == 2
    manifest = json.loads((root / demo_module.MANIFEST_NAME).read_text())
    assert manifest["classes"] == list(DEMO_CLASSES) and manifest["image_size"] == 32


def test_second_call_with_same_arguments_does_nothing(tmp_path: Path, monkeypatch):
    root = write_demo_dataset(tmp_path, 2, 1, 24, 0)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("images were drawn again")

    monkeypatch.setattr(demo_module, "render_demo_sample", fail)
    assert write_demo_dataset(tmp_path, 2, 1, 24, 0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_other_arguments_or_missing_files_regenerate(tmp_path: Path):
    write_demo_dataset(tmp_path, 2, 1, 24, 0)
    write_demo_dataset(tmp_path, 3, 1, 24, 0)
    assert len(list((tmp_path / "train").rglob("*.png"))) == 3 * len(DEMO_CLASSES)
    next((tmp_path / "val").rglob("*.png")).unlink()
    write_demo_dataset(tmp_path, 3, 1, 24, 0)
    assert len(list((tmp_path / "val").rglob("*.png"))) == len(DEMO_CLASSES)
    assert not (tmp_path / ".demo_staging").exists()


def test_deterministic_in_the_arguments(tmp_path: Path):
    a = files(write_demo_dataset(tmp_path / "a", 2, 1, 24, seed=5))
    b = files(write_demo_dataset(tmp_path / "b", 2, 1, 24, seed=5))
    c = files(write_demo_dataset(tmp_path / "c", 2, 1, 24, seed=6))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_refuses_to_overwrite_foreign_folders(tmp_path: Path):
    (tmp_path / "train" / "mine").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not written by the demo generator"):
        write_demo_dataset(tmp_path, 1, 1, 16, 0)
    with pytest.raises(ValueError, match="image_size"):
        write_demo_dataset(tmp_path / "x", 1, 1, 4, 0)
    with pytest.raises(ValueError, match="at least one image"):
        write_demo_dataset(tmp_path / "x", 0, 1, 16, 0)


def test_colour_statistics_do_not_reveal_the_class(tmp_path: Path):
    """Nearest-centroid on mean and std RGB must stay near chance (10 classes): the class lives in the shape."""
    rng = np.random.default_rng(0)

    def colour_features(label: int) -> np.ndarray:
        pixels = np.asarray(demo_module.render_demo_image(DEMO_CLASSES[label], 32, rng), dtype=np.float32) / 255
        return np.concatenate([pixels.mean(axis=(0, 1)), pixels.std(axis=(0, 1))])

    n = 60
    labels = np.repeat(np.arange(len(DEMO_CLASSES)), n)
    feats = np.stack([colour_features(int(y)) for y in labels])
    train = np.tile(np.arange(n) < n // 2, len(DEMO_CLASSES))
    centroids = np.stack([feats[train & (labels == k)].mean(0) for k in range(len(DEMO_CLASSES))])
    predicted = np.argmin(((feats[~train, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == labels[~train]).mean()
    assert accuracy < 0.25


def test_command_line(tmp_path: Path, capsys):
    args = ["--root", str(tmp_path), "--train-per-class", "1", "--val-per-class", "1", "--image-size", "16"]
    assert demo_module.main(args) == 0
    assert "10 classes" in capsys.readouterr().out
    assert len(list((tmp_path / "train").rglob("*.png"))) == len(DEMO_CLASSES)


def test_masks_of_the_drawn_shapes_read_as_segfolder(tmp_path: Path):
    root = write_demo_dataset(tmp_path, 2, 1, 32, 0)
    for split, per_class in (("train", 2), ("val", 1)):
        dataset = make_dataset(f"SegFolder:root={root / demo_module.SEGMENTATION_DIR / split}")
        assert len(dataset) == per_class * len(DEMO_CLASSES)
        assert dataset.scan_num_classes() == demo_module.NUM_SEGMENTATION_CLASSES
    dataset = make_dataset(f"SegFolder:root={root / demo_module.SEGMENTATION_DIR / 'train'}")
    for index in range(len(dataset)):
        image, mask = dataset[index]
        class_index = DEMO_CLASSES.index(Path(dataset.pairs[index][0]).parent.name)
        assert set(mask.unique().tolist()) == {0, class_index + 1}
        # the shape is bright on dark or dark on bright: the mask separates the two brightness bands
        brightness = np.asarray(image, dtype=np.float32).mean(axis=2) / 255
        inside, outside = brightness[mask.numpy() > 0].mean(), brightness[mask.numpy() == 0].mean()
        assert abs(inside - outside) > 0.15
