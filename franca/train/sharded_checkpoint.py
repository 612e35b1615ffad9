"""Sharded training checkpoints through ``torch.distributed.checkpoint`` (DCP), ``train.checkpoint_format=dcp``.

A checkpoint is the directory ``<save_dir>/model_<iteration:07d>.dcp/``: DCP's ``.metadata`` and one
``__<rank>_0.distcp`` file per rank (each rank writes its own shards, in parallel), plus ``extra.pth``
(``{"iteration", "world_size", "rng": [per-rank RNG state], **extra}``, written by rank 0). The DCP
state dict is::

    {"model": {FQN: tensor | DTensor shard}, "optimizer": {"state": {FQN: {...}}, "param_groups": [...]},
     "grad_scaler": {...}}  # grad_scaler only with fp16

with the optimizer state keyed by parameter name (``get_optimizer_state_dict``), so DCP reshards a
checkpoint saved by N ranks onto M ranks (M = 1 included) at load time.

Atomicity: every rank writes into ``.model_<iteration:07d>.dcp.tmp``; once DCP's coordinator has written
``.metadata`` (after every rank's data), rank 0 writes ``extra.pth`` and renames the directory to its
final name, then prunes to the newest ``max_to_keep``. A kill during a save leaves only the hidden
temporary directory, which resume ignores and the next save deletes.

``async_save=True``: the state is copied to host memory at the save call, then written by a background
thread on a dedicated gloo process group while training continues; rank 0 renames when the write is
complete. At most one save is in flight; :meth:`ShardedCheckpointer.wait` blocks until it is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import franca.distributed as distributed
from franca.train.checkpointing import (
    SHARDED_SUFFIX,
    Checkpointer,
    checkpoint_path,
    gather_rng_states,
    is_sharded_checkpoint,
    prune_checkpoints,
    remove_checkpoint,
    resume_newest,
    select_rank_rng,
)
from franca.utils.io import TMP_SUFFIX, atomic_save, fsync_dir

logger = logging.getLogger("franca")

EXTRA_FILE = "extra.pth"
METADATA_FILE = ".metadata"


def temporary_directory(final: Path) -> Path:
    """The hidden name every rank writes into (the same on all ranks: no PID in it)."""
    return final.with_name(f".{final.name}{TMP_SUFFIX}")


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns at every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _barrier() -> None:
    if distributed.is_enabled():
        dist.barrier()


class ShardedCheckpointer:
    """Save / resume ``model``, ``optimizer`` and ``grad_scaler`` as DCP directories in ``save_dir``.

    Args:
        save_dir: directory of the ``model_<iteration>.dcp`` checkpoints.
        model: the (possibly FSDP2-sharded) module whose parameter names key the state.
        optimizer, grad_scaler: saved and restored alongside when given.
        max_to_keep: complete checkpoints kept after each save (>= 1).
        async_save: write in a background thread (see the module docstring).
        full_checkpointer: loads the single-file ``model_<it>.pth`` checkpoints of earlier runs.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        grad_scaler: Any = None,
        *,
        max_to_keep: int = 2,
        async_save: bool = False,
        full_checkpointer: Checkpointer | None = None,
    ) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.save_dir = Path(save_dir)
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.max_to_keep = max_to_keep
        self.async_save = async_save
        self.full_checkpointer = full_checkpointer
        # the background writer's collectives must not interleave with training's on the default group
        self._group = dist.new_group(backend="gloo") if async_save and distributed.is_enabled() else None
        self._pending: Future | None = None
        self._published = threading.Event()
        self._pending_error: BaseException | None = None

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def save(self, iteration: int, **extra: Any) -> Path:
        """Write the checkpoint of completed iteration ``iteration`` (collective); returns its final path."""
        self.wait()
        final = checkpoint_path(self.save_dir, iteration, SHARDED_SUFFIX)
        tmp = temporary_directory(final)
        if distributed.is_main_process():
            remove_checkpoint(tmp)  # left by a save that was killed
            tmp.mkdir(parents=True)
        _barrier()
        meta = dict(iteration=iteration, world_size=distributed.get_world_size(), rng=gather_rng_states(), **extra)
        no_dist = not distributed.is_enabled()
        if not self.async_save:
            with single_process_quiet():
                dcp.save(self._state(), checkpoint_id=tmp, no_dist=no_dist)
            self._complete(tmp, final, meta)
            _barrier()
            return final
        self._published.clear()
        with single_process_quiet():
            future = dcp.async_save(self._state(), checkpoint_id=tmp, process_group=self._group, no_dist=no_dist)
        future.add_done_callback(lambda done: self._complete_in_background(done, tmp, final, meta))
        self._pending = future
        return final

    def _complete(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0, once DCP's metadata is written: extra entries, the rename that publishes it, pruning."""
        if not distributed.is_main_process():
            return
        atomic_save(meta, tmp / EXTRA_FILE)
        remove_checkpoint(final)  # one of the same iteration that resume could not read (a rename cannot replace it)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        prune_checkpoints(self.save_dir, self.max_to_keep)
        logger.info(f"Saved checkpoint {final}")

    def _complete_in_background(self, done: Future, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        try:
            done.result()
            self._complete(tmp, final, meta)
        except BaseException as error:  # re-raised by wait() in the training thread
            self._pending_error = error
        finally:
            self._published.set()

    def wait(self) -> None:
        """Block until the asynchronous save in flight (if any) is complete on every rank (collective)."""
        if self._pending is None:
            return
        self._pending = None
        self._published.wait()
        _barrier()
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load ``path`` (a ``.dcp`` directory, or a full-state ``.pth`` of an earlier run) into the model,
        optimizer and grad scaler; return the other entries with this rank's RNG state (None when the world
        size changed), as :meth:`franca.train.checkpointing.Checkpointer.load`."""
        path = Path(path)
        if not is_sharded_checkpoint(path):
            if self.full_checkpointer is None:
                raise ValueError(f"{path} is a full-state checkpoint: resume with train.checkpoint_format=full")
            return self.full_checkpointer.load(path)
        for name in (METADATA_FILE, EXTRA_FILE):
            if not (path / name).is_file():
                raise FileNotFoundError(f"incomplete sharded checkpoint {path}: no {name}")
        state = self._state()
        try:
            with single_process_quiet():
                dcp.load(state, checkpoint_id=path, no_dist=not distributed.is_enabled())
        except dcp.api.CheckpointException as error:  # a BaseException: make it an ordinary read error
            raise RuntimeError(f"cannot load {path}: {error}") from None
        set_model_state_dict(self.model, state["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        meta = torch.load(path / EXTRA_FILE, map_location="cpu", weights_only=True)
        return select_rank_rng(meta, path)

    def resume(self) -> dict[str, Any] | None:
        """Load the newest readable checkpoint of ``save_dir``, whichever its format; None when there is none."""
        return resume_newest(self.save_dir, self.load)
