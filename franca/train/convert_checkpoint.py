"""A training checkpoint → the release file: ``python -m franca.train.convert_checkpoint CHECKPOINT [--output F]``.

``CHECKPOINT`` is a sharded ``model_<it>.dcp`` directory, a full-state ``model_<it>.pth`` file, or a training
output directory (its newest checkpoint). The output, by default
``<output dir>/eval/training_<it>/teacher_checkpoint.pth`` as the trainer's own export, is
``{"teacher": teacher state dict}`` with the official key names (``backbone.*``, ``dino_head.*``, ...).

One process, no process group: only the teacher's tensors are read (DCP reassembles each from the shards
of every rank that wrote it), so the memory needed is one teacher, whatever the number of ranks.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from franca.train.checkpointing import is_sharded_checkpoint, latest_checkpoint
from franca.train.sharded_checkpoint import EXTRA_FILE, METADATA_FILE, single_process_quiet
from franca.utils.cli import run_cli
from franca.utils.io import atomic_save

PREFIX = "teacher."


def _sharded_teacher(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    for name in (METADATA_FILE, EXTRA_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"incomplete sharded checkpoint {path}: no {name}")
    metadata = dcp.FileSystemReader(path).read_metadata()
    template: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        fqn = key.removeprefix("model.")
        if key.startswith("model.") and fqn.startswith(PREFIX) and isinstance(item, TensorStorageMetadata):
            template[fqn] = torch.empty(item.size, dtype=item.properties.dtype)
    if not template:
        raise KeyError(f"{path} holds no teacher tensors (no 'model.teacher.*' entry)")
    state = {"model": template}
    with single_process_quiet():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    iteration = int(torch.load(path / EXTRA_FILE, weights_only=True)["iteration"])
    return state["model"], iteration


def _full_teacher(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "model" not in data:
        raise KeyError(f"{path} is not a training checkpoint (no 'model' entry)")
    return {k: v for k, v in data["model"].items() if k.startswith(PREFIX)}, int(data["iteration"])


def teacher_state_dict(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """The teacher of a training checkpoint (keys without the ``teacher.`` prefix) and its iteration."""
    path = Path(checkpoint)
    if path.is_dir() and not is_sharded_checkpoint(path):
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"no training checkpoint in {path}")
        path = newest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    teacher, iteration = _sharded_teacher(path) if is_sharded_checkpoint(path) else _full_teacher(path)
    return {k.removeprefix(PREFIX): v for k, v in teacher.items()}, iteration


def convert(checkpoint: str | Path, output: str | Path | None = None) -> Path:
    """Write the release file of ``checkpoint`` (see the module docstring); returns its path."""
    teacher, iteration = teacher_state_dict(checkpoint)
    source = Path(checkpoint)
    run_dir = source if source.is_dir() and not is_sharded_checkpoint(source) else source.parent
    path = Path(output) if output else run_dir / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
    return atomic_save({"teacher": teacher}, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training checkpoint (DCP or full) → teacher_checkpoint.pth")
    parser.add_argument("checkpoint", help="model_<it>.dcp directory, model_<it>.pth file, or a training output dir")
    parser.add_argument("--output", default="", help="release file (default <dir>/eval/training_<it>/...)")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.checkpoint, args.output or None)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
