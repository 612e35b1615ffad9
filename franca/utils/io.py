"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never half of one.

Each write goes to a hidden temporary name in the destination folder, is flushed and fsync'ed, then
``os.replace``'d over the destination, and the folder is fsync'ed so the rename survives a crash.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> Path:
    """The hidden per-process temporary name next to ``path`` (``.NAME.PID.tmp``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file, then move it to ``path`` atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


SAFETENSORS_SUFFIX = ".safetensors"


def load_tensor_file(path: str | os.PathLike) -> Any:
    """The contents of a saved-tensors file on the CPU: a ``*.safetensors`` file's tensors (a flat dict), else
    ``torch.load(path, weights_only=True)`` (memory-mapped for torch's zip format). An unreadable safetensors file
    is a ``ValueError`` naming it."""
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        # memory-mapped (files in torch's zip format): the ranks of a node reading one file share its pages
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
