"""FSDP2 sharding of the Franca student and teacher, and rank-independent checkpoints.

* :func:`shard_ssl_meta_arch` — called by ``SSLMetaArch.prepare_for_distributed_training()`` when the
  process group has several ranks (see :mod:`franca.fsdp.shard`, :mod:`franca.fsdp.policy`);
* :func:`full_state_dict` / :func:`load_full_state_dict`, :class:`ModelCheckpointState`,
  :class:`OptimizerCheckpointState`, :func:`export_teacher` — save from N ranks, resume on M
  (see :mod:`franca.fsdp.checkpoint`).
"""

from franca.fsdp.checkpoint import (
    ModelCheckpointState,
    OptimizerCheckpointState,
    export_teacher,
    full_optimizer_state_dict,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from franca.fsdp.policy import SHARDING_STRATEGIES, ShardingPlan, mixed_precision_policy, sharding_plan
from franca.fsdp.shard import broadcast_from_rank0, shard_module, shard_ssl_meta_arch

__all__ = [
    "SHARDING_STRATEGIES",
    "ModelCheckpointState",
    "OptimizerCheckpointState",
    "ShardingPlan",
    "broadcast_from_rank0",
    "export_teacher",
    "full_optimizer_state_dict",
    "full_state_dict",
    "is_sharded",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "mixed_precision_policy",
    "shard_module",
    "shard_ssl_meta_arch",
    "sharding_plan",
]
