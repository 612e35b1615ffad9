"""Checkpoints of sharded (or plain) models in one rank-independent format.

Every state is gathered into a *full* state dict on CPU on rank 0 (``torch.distributed.checkpoint``'s
``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``;
the other ranks get ``{}``). A file written this way does not depend on the number of ranks that wrote
it: a run saved by N ranks resumes on M ranks (M = 1 included), each rank taking its own shards on load.

* model: the module's usual keys (FSDP2 keeps the parameter names), so ``model["teacher"]`` of a
  training checkpoint is a release-format teacher;
* optimizer: ``{"state": {param name: {...}}, "param_groups": [{..., "params": [param names]}]}``,
  keyed by parameter name instead of position, so it is the same with and without sharding.

The gather is a collective: call these functions on every rank. The sharded alternative, where every rank
writes its own shards, is :mod:`franca.train.sharded_checkpoint` (``train.checkpoint_format=dcp``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

import franca.distributed as distributed
from franca.utils.io import atomic_save

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD = StateDictOptions(full_state_dict=True, strict=True)


def is_sharded(module: nn.Module) -> bool:
    """True when some parameter of ``module`` is a DTensor (the module went through ``fully_shard``)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, Any]:
    """The full state dict of ``module``: gathered to CPU on rank 0 when sharded (``{}`` on other ranks)."""
    if not is_sharded(module):
        return module.state_dict()
    return get_model_state_dict(module, options=_GATHER)


def load_full_state_dict(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Load a full state dict (strict); a sharded module keeps the shards of this rank."""
    if not is_sharded(module):
        module.load_state_dict(state_dict)
        return
    set_model_state_dict(module, state_dict, options=_LOAD)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state keyed by the parameter names of ``model`` (on rank 0 when sharded)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER if is_sharded(model) else StateDictOptions())


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Inverse of :func:`full_optimizer_state_dict`, whatever the number of ranks that saved it."""
    options = StateDictOptions(full_state_dict=True) if is_sharded(model) else StateDictOptions()
    set_optimizer_state_dict(model, optimizer, state_dict, options=options)


class ModelCheckpointState:
    """``state_dict`` / ``load_state_dict`` of a model through the full, rank-independent format."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return full_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_full_state_dict(self.model, state_dict)


class OptimizerCheckpointState:
    """``state_dict`` / ``load_state_dict`` of an optimizer keyed by parameter names (see the module doc)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return full_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_full_optimizer_state_dict(self.model, self.optimizer, state_dict)


def export_teacher(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``{"teacher": teacher state dict}`` (the official release format) from rank 0; collective."""

    state = full_state_dict(model.teacher)
    path = Path(path)
    if distributed.is_main_process():
        atomic_save({"teacher": state}, path)
    return path
