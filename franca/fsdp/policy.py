"""From ``compute_precision.<student|teacher>.<module>`` to FSDP2 settings.

Sharding strategies (the FSDP1 names the configs use) map onto FSDP2 ``fully_shard`` as:

============== ========================================== =============================================
strategy       parameter placement                        after the forward pass
============== ========================================== =============================================
FULL_SHARD     ``Shard(0)`` over all ranks (1-D mesh)     reshard (all-gather again for the backward)
SHARD_GRAD_OP  ``Shard(0)`` over all ranks (1-D mesh)     keep gathered until the backward is done
NO_SHARD       replicated: HSDP mesh ``(world, 1)``,      keep gathered (nothing to free: shards are the
               i.e. ``(Replicate(), Shard(0))`` with a    full tensors); gradients are all-reduced, as
               shard group of one rank                    with DDP
============== ========================================== =============================================

NO_SHARD is expressed as hybrid sharding with a one-rank shard group rather than with a separate
DDP wrapper so that every parameter of the model is a DTensor: the EMA update, gradient clipping
and the checkpoint gather are then one code path whatever the strategy.

Mixed precision: ``param_dtype`` is the dtype of the gathered parameters (the compute dtype),
``reduce_dtype`` the dtype of the gradient reduce-scatter / all-reduce. FSDP2 does not manage
buffers, so ``buffer_dtype`` is applied once, by casting the module's floating-point buffers when it
is sharded. On CPU every dtype is fp32 while ``compute_precision.fp32_on_cpu`` is true (the default), as
in the single-process CPU path of ``SSLMetaArch``, so a CPU run with several ranks computes what one rank
computes; with ``fp32_on_cpu: false`` the configured dtypes apply on CPU too (the mixed-precision tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch.distributed.fsdp import MixedPrecisionPolicy

from franca.utils.precision import device_dtype, precision_dtype

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


@dataclass(frozen=True)
class ShardingPlan:
    """How one sub-network (e.g. the student backbone) is sharded."""

    replicate: bool
    reshard_after_forward: bool
    mp_policy: MixedPrecisionPolicy
    buffer_dtype: torch.dtype


def mixed_precision_policy(
    mixed_precision: DictConfig | dict, *, device_type: str, fp32_on_cpu: bool = True, where: str = ""
) -> tuple[MixedPrecisionPolicy, torch.dtype]:
    """``(MixedPrecisionPolicy, buffer_dtype)`` for a ``mixed_precision`` node (``param_dtype`` …).

    On ``device_type == "cpu"`` with ``fp32_on_cpu`` every dtype is fp32 (see the module docstring).
    """
    prefix = f"{where}.mixed_precision" if where else "mixed_precision"
    param, reduce, buffer = (
        device_dtype(precision_dtype(mixed_precision[key], f"{prefix}.{key}"), device_type, fp32_on_cpu)
        for key in ("param_dtype", "reduce_dtype", "buffer_dtype")
    )
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, cast_forward_inputs=True), buffer


def sharding_plan(
    module_cfg: DictConfig | dict, *, device_type: str, fp32_on_cpu: bool = True, where: str = ""
) -> ShardingPlan:
    """The plan of one ``compute_precision.<role>.<module>`` node."""
    strategy = module_cfg["sharding_strategy"]
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(
            f"{where or 'compute_precision'}.sharding_strategy is {strategy!r}, "
            f"must be one of {', '.join(SHARDING_STRATEGIES)}"
        )
    policy, buffer_dtype = mixed_precision_policy(
        module_cfg["mixed_precision"], device_type=device_type, fp32_on_cpu=fp32_on_cpu, where=where
    )
    return ShardingPlan(
        replicate=strategy == "NO_SHARD",
        reshard_after_forward=strategy == "FULL_SHARD",
        mp_policy=policy,
        buffer_dtype=buffer_dtype,
    )
