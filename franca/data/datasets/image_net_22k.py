"""``ImageNet22k:root=R:extra=E``: ImageNet-21k/22k stored as one tar per class, ``R/<wnid>.tar``.

Images are read by byte range straight out of the class tars, using ``E/entries.npy`` (structured:
``class_index`` u4, ``class_id`` str, ``start_offset``, ``end_offset``, ``filename`` str) and
``E/class-ids.npy``. A member's data is ``tar[start_offset + 512 : end_offset]`` — the official index
layout, so index files written by the DINOv2/Franca code also work. Write them with::

    python -m franca.data.datasets.image_net_22k --root R --extra E

Classes are the sorted tar names; a gzip-compressed member is decompressed transparently.
"""

from __future__ import annotations

import argparse
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from franca.data.datasets.extended import ExtendedVisionDataset

logger = logging.getLogger(__name__)

_HEADER_BYTES = 512
_ENTRIES = "entries.npy"
_CLASS_IDS = "class-ids.npy"


def _dump_command(root: str, extra: str) -> str:
    return f"python -m franca.data.datasets.image_net_22k --root {root} --extra {extra}"


class ImageNet22k(ExtendedVisionDataset):
    """All images of all class tars; item ``i`` is ``(image, class_index)``."""

    def __init__(
        self,
        *,
        root: str,
        extra: str,
        transforms: Callable | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        super().__init__(root, transforms, transform, target_transform)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"ImageNet22k root {root!r} does not exist or is not a directory")
        for name in (_ENTRIES, _CLASS_IDS):
            if not (Path(extra) / name).is_file():
                raise FileNotFoundError(
                    f"ImageNet22k index file {Path(extra) / name} is missing; create it with: {_dump_command(root, extra)}"
                )
        self._extra_root = str(extra)
        self._entries: np.ndarray | None = None
        self._class_ids: np.ndarray | None = None

    def _get_entries(self) -> np.ndarray:
        if self._entries is None:
            self._entries = np.load(Path(self._extra_root) / _ENTRIES, mmap_mode="r")
        return self._entries

    def _tar_path(self, class_id: str) -> str:
        return os.path.join(self.root, f"{class_id}.tar")

    def get_image_data(self, index: int) -> bytes:
        entry = self._get_entries()[index]
        start = int(entry["start_offset"]) + _HEADER_BYTES
        with open(self._tar_path(str(entry["class_id"])), "rb") as f:
            f.seek(start)
            return f.read(int(entry["end_offset"]) - start)

    def image_source(self, index: int) -> str:
        entry = self._get_entries()[index]
        return f"{self._tar_path(str(entry['class_id']))}:{entry['filename']}"

    def get_target(self, index: int) -> int:
        return int(self._get_entries()[index]["class_index"])

    def get_targets(self) -> np.ndarray:
        return np.asarray(self._get_entries()["class_index"], dtype=np.int64)

    def get_class_id(self, index: int) -> str:
        return str(self._get_entries()[index]["class_id"])

    def find_class_id(self, class_index: int) -> str:
        if self._class_ids is None:
            self._class_ids = np.load(Path(self._extra_root) / _CLASS_IDS, mmap_mode="r")
        return str(self._class_ids[class_index])

    def __len__(self) -> int:
        return len(self._get_entries())

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_entries=None, _class_ids=None)
        return state


def dump_extra(root: str, extra: str) -> int:
    """Index every regular member of every ``root/*.tar`` into ``extra``; returns the sample count.

    ``start_offset`` is the offset of the member's last header block (so ``+512`` is its data, even
    after long-name extension headers) and ``end_offset`` is the end of its data.
    """
    tars = sorted(Path(root).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"ImageNet22k root {root!r} holds no <class>.tar files")
    class_ids = [path.stem for path in tars]
    rows: list[tuple[int, str, int, int, str]] = []
    for class_index, path in enumerate(tars):
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    start = member.offset_data - _HEADER_BYTES
                    rows.append((class_index, path.stem, start, member.offset_data + member.size, member.name))
        logger.info("indexed %s", path)
    if not rows:
        raise FileNotFoundError(f"ImageNet22k tars under {root!r} hold no files")
    dtype = np.dtype(
        [
            ("class_index", "<u4"),
            ("class_id", f"U{max(len(c) for c in class_ids)}"),
            ("start_offset", "<u8"),
            ("end_offset", "<u8"),
            ("filename", f"U{max(len(r[4]) for r in rows)}"),
        ]
    )
    Path(extra).mkdir(parents=True, exist_ok=True)
    np.save(Path(extra) / _ENTRIES, np.array(rows, dtype=dtype))
    np.save(Path(extra) / _CLASS_IDS, np.array(class_ids, dtype=f"U{max(len(c) for c in class_ids)}"))
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the ImageNet-22k index files (entries.npy, class-ids.npy).")
    parser.add_argument("--root", required=True, help="folder holding one <wnid>.tar per class")
    parser.add_argument("--extra", help="folder for the index files (default: the root)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = args.extra or args.root
    count = dump_extra(args.root, extra)
    print(f"{count} images indexed in {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
