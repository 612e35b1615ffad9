"""Training checkpoints that survive a kill: atomic writes, keep the last N, automatic resume with fall-back.

A full-state checkpoint ``<save_dir>/model_<iteration:07d>.pth`` holds, for the last *completed* iteration::

    {"iteration": int, "world_size": int, "rng": [per-rank RNG state], <name>: obj.state_dict(), ..., **extra}

where ``<name>`` are the checkpointables given to ``Checkpointer`` (``model``, ``optimizer``,
``grad_scaler``) and ``extra`` what the caller adds (e.g. ``sampler_advance``). Only tensors and
primitive containers are stored, so everything is read back with ``torch.load(weights_only=True)``.

A file is written to a hidden temporary name in the same directory, flushed and fsync'ed, then
``os.replace``'d onto its final name (atomic on POSIX) and the directory is fsync'ed: a process killed
during a save leaves at worst a stray temporary file, never a truncated ``model_*.pth``, so the newest
``model_*.pth`` is always complete.

Every rank calls ``state_dict()`` (a sharded engine can gather there), only the main process writes.
The trainer passes ``franca.fsdp.ModelCheckpointState`` / ``OptimizerCheckpointState``: full tensors
gathered on rank 0 and optimizer state keyed by parameter name, so a file saved by N ranks resumes on M.

The sharded format (``model_<iteration:07d>.dcp/``, :mod:`franca.train.sharded_checkpoint`) lives in the
same directory and the same numbering: :func:`list_checkpoints` lists both, and resume takes the newest
complete one whichever its format. When the newest cannot be read, resume says so in one line and falls
back to the previous one; old checkpoints are deleted only after a newer one is complete.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

import franca.distributed as distributed
from franca.utils.io import TMP_SUFFIX, atomic_save

logger = logging.getLogger("franca")

_CHECKPOINT_RE = re.compile(r"^model_(\d+)\.(pth|dcp)$")
FULL_SUFFIX, SHARDED_SUFFIX = ".pth", ".dcp"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def checkpoint_path(save_dir: str | os.PathLike, iteration: int, suffix: str = FULL_SUFFIX) -> Path:
    return Path(save_dir) / f"model_{iteration:07d}{suffix}"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path).suffix == SHARDED_SUFFIX


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``save_dir`` (``.pth`` files, ``.dcp`` directories) as ``(iteration, path)``,
    oldest first."""
    directory = Path(save_dir)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p.is_dir() if m.group(2) == "dcp" else p.is_file())
    ]
    return sorted(found)


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint file or sharded directory (nothing when it is gone)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune_checkpoints(save_dir: str | os.PathLike, max_to_keep: int) -> None:
    """Keep the newest ``max_to_keep`` complete checkpoints; remove stray temporaries of interrupted saves.

    Called right after a save completed, by the main process only.
    """
    directory = Path(save_dir)
    for _, old in list_checkpoints(directory)[:-max_to_keep]:
        remove_checkpoint(old)
    for stray in directory.glob(f".model_*{TMP_SUFFIX}"):
        remove_checkpoint(stray)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def resume_newest(save_dir: str | os.PathLike, load: Callable[[Path], dict[str, Any]]) -> dict[str, Any] | None:
    """``load`` the newest complete checkpoint of ``save_dir``; on failure say so and try the previous one.

    Returns None when there is none; re-raises the error of the oldest when none can be read.
    """
    checkpoints = list_checkpoints(save_dir)
    for index in range(len(checkpoints) - 1, -1, -1):
        path = checkpoints[index][1]
        try:
            return load(path)
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
            if index == 0:
                raise
            previous = checkpoints[index - 1][1]
            logger.warning(f"cannot read checkpoint {path} ({_first_line(error)}); falling back to {previous}")
    return None


def latest_checkpoint(save_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(save_dir)
    return checkpoints[-1][1] if checkpoints else None


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and primitives."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, indexed by rank (collective when a process group exists)."""
    state = capture_rng_state()
    if not distributed.is_enabled():
        return [state]
    states: list[Any] = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class Checkpointer:
    """Save / resume ``checkpointables`` (objects with ``state_dict`` / ``load_state_dict``) in ``save_dir``.

    Args:
        save_dir: directory of the ``model_<iteration>.pth`` files.
        max_to_keep: after each save only the newest ``max_to_keep`` checkpoints stay (>= 1).
        checkpointables: e.g. ``model=..., optimizer=..., grad_scaler=...`` (None values are skipped).
    """

    def __init__(self, save_dir: str | os.PathLike, *, max_to_keep: int = 2, **checkpointables: Stateful | None):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        reserved = {"iteration", "world_size", "rng"} & checkpointables.keys()
        if reserved:
            raise ValueError(f"checkpointable names {sorted(reserved)} are reserved")
        self.save_dir = Path(save_dir)
        self.max_to_keep = max_to_keep
        self.checkpointables = {k: v for k, v in checkpointables.items() if v is not None}

    def save(self, iteration: int, **extra: Any) -> Path:
        """Write the checkpoint of completed iteration ``iteration`` and prune old ones."""
        data: dict[str, Any] = {name: obj.state_dict() for name, obj in self.checkpointables.items()}
        data.update(iteration=iteration, world_size=distributed.get_world_size(), rng=gather_rng_states(), **extra)
        path = checkpoint_path(self.save_dir, iteration)
        if distributed.is_main_process():
            atomic_save(data, path)
            prune_checkpoints(self.save_dir, self.max_to_keep)
            logger.info(f"Saved checkpoint {path}")
        if distributed.is_enabled():
            torch.distributed.barrier()
        return path

    def wait(self) -> None:
        """Saves are synchronous: nothing to wait for (the interface of the sharded checkpointer)."""

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load ``path`` into the checkpointables; return the other entries (iteration, rng, extras).

        ``rng`` is returned as *this rank's* state (None when the world size changed) and is not applied:
        the caller restores it with ``restore_rng_state`` at the point where the saved run stood.
        """
        path = Path(path)
        if is_sharded_checkpoint(path) and path.is_dir():
            raise ValueError(f"{path} is a sharded checkpoint: resume with train.checkpoint_format=dcp")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        # memory-mapped: the ranks of a node share the file pages instead of each holding a full copy
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = [name for name in self.checkpointables if name not in data]
        if missing:
            raise KeyError(f"checkpoint {path} has no entry {missing[0]!r}")
        for name, obj in self.checkpointables.items():
            obj.load_state_dict(data[name])
        rest = {k: v for k, v in data.items() if k not in self.checkpointables}
        return select_rank_rng(rest, path)

    def resume(self) -> dict[str, Any] | None:
        """Load the newest readable checkpoint of ``save_dir`` (see :func:`resume_newest`); None when there is none."""
        return resume_newest(self.save_dir, self.load)


def select_rank_rng(rest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Replace ``rest["rng"]`` (every saved rank's state) by this rank's, or None when the world size changed."""
    rng_states = rest.get("rng") or []
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    rest["rng"] = rng_states[rank] if len(rng_states) == world_size else None
    if rest["rng"] is None:
        logger.warning(f"{path} was saved by {len(rng_states)} rank(s), now {world_size}: RNG states not resumed")
    logger.info(f"Loaded checkpoint {path} (iteration {rest.get('iteration')})")
    return rest
