"""``ImageNet:split=TRAIN|VAL|TEST:root=R:extra=E``: ImageNet-1k read through precomputed index files.

Layout of ``R`` (the official one): ``train/<wnid>/<wnid>_<n>.JPEG``, ``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``,
``test/ILSVRC2012_test_<8 digits>.JPEG`` and ``labels.txt`` (CSV lines ``wnid,class name``).
``E`` holds, per split ``S``: ``entries-S.npy`` (structured: ``actual_index`` u4, ``class_index`` u4,
``class_id`` str, ``class_name`` str), ``class-ids-S.npy`` and ``class-names-S.npy`` (by class index;
not for TEST). They are written once by::

    python -m franca.data.datasets.image_net --root R --extra E

and are the same files the official DINOv2/Franca code writes, so existing ones can be reused.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

import numpy as np

from franca.data.datasets.extended import UNLABELLED, ExtendedVisionDataset

logger = logging.getLogger(__name__)

_NO_CLASS = np.iinfo(np.uint32).max
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class _Split(Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    @property
    def is_labelled(self) -> bool:
        return self is not _Split.TEST

    def image_relpath(self, actual_index: int, class_id: str) -> str:
        """Relative path of an image from its number and class (official file naming)."""
        if self is _Split.TRAIN:
            return os.path.join(self.value, class_id, f"{class_id}_{actual_index}.JPEG")
        name = f"ILSVRC2012_{self.value}_{actual_index:08d}.JPEG"
        return os.path.join(self.value, class_id, name) if self.is_labelled else os.path.join(self.value, name)

    def extra_name(self, kind: str) -> str:
        return f"{kind}-{self.name}.npy"


def _parse_split(split: str | _Split) -> _Split:
    if isinstance(split, _Split):
        return split
    try:
        return _Split[str(split).upper()]
    except KeyError:
        raise ValueError(f"ImageNet split {split!r} is not one of TRAIN, VAL, TEST") from None


def _dump_command(root: str, extra: str) -> str:
    return f"python -m franca.data.datasets.image_net --root {root} --extra {extra}"


class ImageNet(ExtendedVisionDataset):
    """ImageNet-1k split; item ``i`` is ``(image, class_index)`` (``UNLABELLED`` for TEST)."""

    Split = _Split

    def __init__(
        self,
        *,
        split: str | _Split,
        root: str,
        extra: str,
        transforms: Callable | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        super().__init__(root, transforms, transform, target_transform)
        self._split = _parse_split(split)
        self._extra_root = str(extra)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"ImageNet root {root!r} does not exist or is not a directory")
        kinds = ("entries", "class-ids", "class-names") if self._split.is_labelled else ("entries",)
        for kind in kinds:
            path = Path(extra) / self._split.extra_name(kind)
            if not path.is_file():
                raise FileNotFoundError(
                    f"ImageNet index file {path} is missing; create it with: {_dump_command(root, extra)}"
                )
        self._entries: np.ndarray | None = None
        self._class_ids: np.ndarray | None = None
        self._class_names: np.ndarray | None = None

    @property
    def split(self) -> _Split:
        return self._split

    def _load_extra(self, kind: str) -> np.ndarray:
        return np.load(Path(self._extra_root) / self._split.extra_name(kind), mmap_mode="r")

    def _get_entries(self) -> np.ndarray:
        if self._entries is None:
            self._entries = self._load_extra("entries")
        return self._entries

    def _require_labels(self, what: str) -> None:
        if not self._split.is_labelled:
            raise ValueError(f"ImageNet TEST split has no {what}")

    def get_image_data(self, index: int) -> bytes:
        with open(self.image_source(index), "rb") as f:
            return f.read()

    def image_source(self, index: int) -> str:
        entry = self._get_entries()[index]
        return os.path.join(self.root, self._split.image_relpath(int(entry["actual_index"]), str(entry["class_id"])))

    def get_target(self, index: int) -> int:
        return int(self._get_entries()[index]["class_index"]) if self._split.is_labelled else UNLABELLED

    def get_targets(self) -> np.ndarray:
        if not self._split.is_labelled:
            return np.full(len(self), UNLABELLED, dtype=np.int64)
        return np.asarray(self._get_entries()["class_index"], dtype=np.int64)

    def get_class_id(self, index: int) -> str:
        self._require_labels("class ids")
        return str(self._get_entries()[index]["class_id"])

    def get_class_name(self, index: int) -> str:
        self._require_labels("class names")
        return str(self._get_entries()[index]["class_name"])

    def find_class_id(self, class_index: int) -> str:
        self._require_labels("class ids")
        if self._class_ids is None:
            self._class_ids = self._load_extra("class-ids")
        return str(self._class_ids[class_index])

    def find_class_name(self, class_index: int) -> str:
        self._require_labels("class names")
        if self._class_names is None:
            self._class_names = self._load_extra("class-names")
        return str(self._class_names[class_index])

    def __len__(self) -> int:
        return len(self._get_entries())

    def __getstate__(self) -> dict:
        # Memory maps are reopened in each DataLoader worker instead of being pickled whole.
        state = self.__dict__.copy()
        state.update(_entries=None, _class_ids=None, _class_names=None)
        return state


def _read_labels(root: Path) -> dict[str, str]:
    path = root / "labels.txt"
    if not path.is_file():
        logger.warning("%s not found: class names will be the class ids", path)
        return {}
    with open(path, newline="") as f:
        return {row[0]: ",".join(row[1:]) for row in csv.reader(f) if row}


def _actual_index(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[-1])
    except ValueError:
        raise ValueError(
            f"ImageNet file {path} does not follow the official naming (<wnid>_<n>.JPEG or ILSVRC2012_<split>_<n>.JPEG)"
        ) from None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _str_dtype(values: Sequence[str]) -> str:
    return f"U{max([1, *map(len, values)])}"


def _save(extra: Path, name: str, array: np.ndarray) -> None:
    extra.mkdir(parents=True, exist_ok=True)
    np.save(extra / name, array)
    logger.info("wrote %s (%d rows)", extra / name, len(array))


def dump_extra(root: str, extra: str, split: str | _Split) -> int:
    """Scan ``root/<split>`` and write the split's index files into ``extra``; returns the sample count."""
    split = _parse_split(split)
    split_dir = Path(root) / split.value
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ImageNet split folder {split_dir} does not exist")
    rows: list[tuple[int, int, str, str]] = []
    if split.is_labelled:
        names = _read_labels(Path(root))
        class_ids = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not class_ids:
            raise FileNotFoundError(f"ImageNet split folder {split_dir} has no class folders")
        for class_index, class_id in enumerate(class_ids):
            for path in _image_files(split_dir / class_id):
                rows.append((_actual_index(path), class_index, class_id, names.get(class_id, class_id)))
    else:
        rows = [(_actual_index(path), _NO_CLASS, "", "") for path in _image_files(split_dir)]
    if not rows:
        raise FileNotFoundError(f"ImageNet split folder {split_dir} holds no images")
    dtype = np.dtype(
        [
            ("actual_index", "<u4"),
            ("class_index", "<u4"),
            ("class_id", _str_dtype([r[2] for r in rows])),
            ("class_name", _str_dtype([r[3] for r in rows])),
        ]
    )
    entries = np.array(rows, dtype=dtype)
    extra_dir = Path(extra)
    _save(extra_dir, split.extra_name("entries"), entries)
    if split.is_labelled:
        _save(extra_dir, split.extra_name("class-ids"), np.array(class_ids, dtype=_str_dtype(class_ids)))
        labels = [names.get(c, c) for c in class_ids]
        _save(extra_dir, split.extra_name("class-names"), np.array(labels, dtype=_str_dtype(labels)))
    return len(entries)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the ImageNet-1k index files (entries/class-ids/class-names).")
    parser.add_argument("--root", required=True, help="dataset root holding train/, val/, test/ and labels.txt")
    parser.add_argument("--extra", help="folder for the index files (default: the root)")
    parser.add_argument(
        "--splits",
        nargs="+",
        choices=[s.name for s in _Split],
        help="splits to index (default: every split folder present)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = args.extra or args.root
    splits = args.splits or [s.name for s in _Split if (Path(args.root) / s.value).is_dir()]
    if not splits:
        parser.error(f"no train/, val/ or test/ folder under {args.root}")
    for name in splits:
        count = dump_extra(args.root, extra, name)
        print(f"{name}: {count} images indexed in {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
