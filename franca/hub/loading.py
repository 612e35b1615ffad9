"""The one checkpoint reader for backbones (hub, trainer, evaluations, RASA, export all use it).

* :func:`read_checkpoint` loads a file with ``torch.load(..., weights_only=True)`` — or a folder holding the pieces
  ``*.tar.gz.part_*`` of a split tar archive (the ViT-g release) — and returns the state dict inside
  (the ``teacher``, ``model`` or ``state_dict`` entry when present).
* :func:`backbone_state_dict` strips the ``module.`` / ``backbone.`` prefixes and drops head keys.
* :func:`load_backbone_weights` maps the file's block keys to the model's layout — chunked
  ``blocks.<chunk>.<i>.…`` or flat ``blocks.<i>.…``, either way round — and loads strictly: any missing or
  unexpected key or shape mismatch raises one :class:`CheckpointError` naming the keys and both shapes.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from franca.layers.folded_norm import prepare_for_folded_state_dict

_STATE_DICT_ENTRIES = ("teacher", "model", "state_dict")
_WRAPPER_PREFIXES = ("module.", "backbone.")
# Keys of heads trained beside the backbone; a backbone load ignores them (the RASA head is loaded on its own).
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "rasa_head.")
PART_GLOB = "*.tar.gz.part_*"
FOLDED_NORM_KEY = "norm.patch_proj.weight"  # written by franca.layers.folded_norm: patch tokens get their own final map
_CHUNKED_BLOCK_KEY = re.compile(r"blocks\.\d+\.(\d+)\.(.+)")
_LISTED = 5


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (missing/unexpected keys, shape mismatch) or is not a state dict."""


class _ChainedFiles(io.RawIOBase):
    """Read several files one after the other as a single stream."""

    def __init__(self, paths: list[Path]) -> None:
        self._pending = list(paths)
        self._current = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._current is None:
                if not self._pending:
                    return 0
                self._current = open(self._pending.pop(0), "rb")
            count = self._current.readinto(buffer)
            if count:
                return count
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()


def extract_checkpoint_parts(folder: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Concatenate the sorted ``*.tar.gz.part_*`` pieces in ``folder`` and extract the checkpoint file they hold.

    The first regular file of the archive is written to ``destination`` (a file path); returns that path.
    """
    parts = sorted(Path(folder).glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"no checkpoint pieces matching {PART_GLOB!r} in folder {folder}")
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".partial")
    with _ChainedFiles(parts) as raw, tarfile.open(fileobj=io.BufferedReader(raw), mode="r|gz") as archive:
        for member in archive:
            if member.isfile():
                with archive.extractfile(member) as source, open(partial, "wb") as target:
                    shutil.copyfileobj(source, target, length=16 << 20)
                os.replace(partial, destination)
                return destination
    raise CheckpointError(f"the archive pieces in {folder} hold no file")


def _state_dict_of(obj: object, origin: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{origin} holds a {type(obj).__name__}, not a state dict")
    for entry in _STATE_DICT_ENTRIES:
        if isinstance(obj.get(entry), Mapping):
            return dict(obj[entry])
    return dict(obj)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """State dict of a checkpoint file (or a folder of ``*.tar.gz.part_*`` pieces), loaded on the CPU.

    Picks the ``teacher``, ``model`` or ``state_dict`` entry (first present) of the saved dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            extracted = extract_checkpoint_parts(path, Path(tmp) / "checkpoint.pth")
            obj = torch.load(extracted, map_location="cpu", weights_only=True)
    else:
        # memory-mapped (files in torch's zip format): the ranks of a node reading one file share its pages
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    return _state_dict_of(obj, str(path))


def _strip_wrappers(key: str) -> str:
    stripped = None
    while stripped != key:
        stripped = key
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
    return key


def backbone_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Backbone keys only: leading ``module.`` / ``backbone.`` removed, ``dino_head.`` / ``ibot_head.`` dropped."""
    out = {}
    for key, value in state_dict.items():
        key = _strip_wrappers(key)
        if not key.startswith(_HEAD_PREFIXES):
            out[key] = value
    return out


def _flat_key(key: str) -> str:
    """``blocks.<chunk>.<i>.rest`` → ``blocks.<i>.rest``; every other key unchanged."""
    match = _CHUNKED_BLOCK_KEY.fullmatch(key)
    return f"blocks.{match[1]}.{match[2]}" if match else key


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" (+{len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def match_backbone_keys(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` (backbone keys, any block layout) renamed to ``model``'s keys; strict on keys and shapes."""
    expected = {_flat_key(k): (k, v.shape) for k, v in model.state_dict().items() if not k.startswith(_HEAD_PREFIXES)}
    given = {_flat_key(k): (k, v) for k, v in state_dict.items()}
    missing = [expected[k][0] for k in expected if k not in given]
    unexpected = [given[k][0] for k in given if k not in expected]
    mismatched = [
        f"{expected[k][0]} checkpoint {tuple(given[k][1].shape)} vs model {tuple(expected[k][1])}"
        for k in expected
        if k in given and tuple(given[k][1].shape) != tuple(expected[k][1])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    return {expected[k][0]: given[k][1] for k in expected}


def load_backbone_weights(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor]) -> None:
    """Load backbone weights (a checkpoint path, folder of pieces, or a state dict) strictly into ``model``.

    A model built on the ``meta`` device receives the checkpoint tensors themselves (``assign=True``).
    A RASA-folded file (extra ``norm.patch_proj.{weight,bias}`` keys, see ``franca.layers.folded_norm``) first swaps the
    model's final norm for the folded norm, so it loads into the plain architecture.
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        state_dict = read_checkpoint(path_or_state_dict)
    else:
        state_dict = _state_dict_of(path_or_state_dict, "the given object")
    backbone = backbone_state_dict(state_dict)
    if FOLDED_NORM_KEY in backbone:
        prepare_for_folded_state_dict(model, backbone)
    renamed = match_backbone_keys(model, backbone)
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(renamed, strict=False, assign=on_meta)
