"""Shard the student and the teacher of ``SSLMetaArch`` with FSDP2 ``fully_shard``.

Units, innermost first: every entry of ``backbone.blocks`` (a ``BlockChunk`` with ``block_chunks > 0``,
a ``Block`` otherwise), then the backbone itself (patch embedding, tokens, position embedding, final
norm), then each head as one unit. ``SSLMetaArch`` calls ``backbone.forward_features`` rather than
``backbone(...)``, so that method is registered as an FSDP forward method.

The student follows its ``sharding_strategy`` (see :mod:`franca.fsdp.policy`). The teacher never runs a
backward pass, so its units always reshard right after their forward: the EMA update then pairs every
student shard with the teacher shard of the same rank (same mesh, same ``Shard(0)`` split). For that
the student and teacher copies of a module must agree on NO_SHARD vs sharded; FULL_SHARD and
SHARD_GRAD_OP are equivalent for the teacher.

Before sharding, rank 0's parameters and buffers are broadcast to every rank (FSDP1's
``sync_module_states``), so a run with N ranks starts from the weights one process would have built
with the same seed.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from franca.fsdp.policy import ShardingPlan, sharding_plan

logger = logging.getLogger("franca")


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank 0's values (collective)."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        dist.broadcast(tensor.data, src=0)


def _cast_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    for sub in module.modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(sub, name, buffer.to(dtype))


def shard_module(module: nn.Module, mesh: DeviceMesh, plan: ShardingPlan) -> nn.Module:
    """``fully_shard`` each block (chunk) of a backbone, then ``module`` itself as the root of its units."""
    _cast_buffers(module, plan.buffer_dtype)
    kwargs = dict(mesh=mesh, reshard_after_forward=plan.reshard_after_forward, mp_policy=plan.mp_policy)
    for block in getattr(module, "blocks", ()):
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    if hasattr(module, "forward_features"):
        register_fsdp_forward_method(module, "forward_features")
    return module


class _Meshes:
    """The 1-D shard mesh and, when some module asks for NO_SHARD, the ``(world, 1)`` replicate mesh."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.world_size = dist.get_world_size()
        self._shard: DeviceMesh | None = None
        self._replicate: DeviceMesh | None = None

    def get(self, replicate: bool) -> DeviceMesh:
        if replicate:
            if self._replicate is None:
                self._replicate = init_device_mesh(
                    self.device_type, (self.world_size, 1), mesh_dim_names=("replicate", "shard")
                )
            return self._replicate
        if self._shard is None:
            self._shard = init_device_mesh(self.device_type, (self.world_size,), mesh_dim_names=("shard",))
        return self._shard


def shard_ssl_meta_arch(model: nn.Module) -> None:
    """Shard ``model.student`` and ``model.teacher`` (an ``SSLMetaArch``) in place across the process group.

    Plans come from ``model.cfg.compute_precision.{student,teacher}.<backbone|dino_head|ibot_head>``.
    Raises ValueError when a module has no plan or when student and teacher disagree on NO_SHARD.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_ssl_meta_arch needs an initialised process group (franca.distributed.enable())")
    # The step slices the backbone and head outputs but never modifies them in place (the 2-rank parity test
    # compares the gradients), so FSDP2's warning about returning views is noise here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    device_type = next(model.parameters()).device.type
    precision = model.cfg.compute_precision
    meshes = _Meshes(device_type)
    broadcast_from_rank0(model)
    for name in model.student.keys():
        plans = {}
        for role in ("student", "teacher"):
            if name not in precision[role]:
                raise ValueError(f"compute_precision.{role} has no entry for '{name}'")
            where = f"compute_precision.{role}.{name}"
            plans[role] = sharding_plan(
                precision[role][name], device_type=device_type, fp32_on_cpu=precision.fp32_on_cpu, where=where
            )
        student_plan, teacher_plan = plans["student"], plans["teacher"]
        if student_plan.replicate != teacher_plan.replicate:
            raise ValueError(
                f"compute_precision.student.{name} and compute_precision.teacher.{name} must both be NO_SHARD "
                "or both sharded: the EMA update pairs student and teacher shards"
            )
        mesh = meshes.get(student_plan.replicate)
        shard_module(model.student[name], mesh, student_plan)
        shard_module(model.teacher[name], mesh, replace(teacher_plan, reshard_after_forward=True))
    logger.info(
        "FSDP2: student and teacher sharded over %d ranks (%s), per block and per head",
        meshes.world_size,
        device_type,
    )
