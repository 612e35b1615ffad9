"""The host never waits for the device inside a training iteration (forward_backward → clip → step → EMA).

Counted on CPU: every Python-level read of a tensor value (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``int()``, ``.cpu()``, ``.numpy()``) and, below Python, every ``aten._local_scalar_dense`` / ``nonzero`` /
boolean-mask index dispatched. On a GPU each is a synchronisation; the one read the loop needs (the logged
losses) comes after the EMA. The non-finite-loss check that used to read the losses before the step is now
decided on the device, from the rank-averaged losses: checked with FSDP2 on two gloo ranks.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import pytest
import torch
from tiny_ssl import tiny_ssl_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from franca.data.synthetic import random_collated_batch
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import apply_optim_scheduler, build_optimizer, training_step

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select"}


class _SyncOps(TorchDispatchMode):
    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        )
        if name in SYNC_OPS or bool_index:
            self.record(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_host_reads(model: SSLMetaArch):
    """Yields (inside, after): the reads made before ``model.update_teacher`` returns, and those after it."""
    inside: list[str] = []
    after: list[str] = []
    state = {"window": inside}

    def record(what: str) -> None:
        where = traceback.extract_stack(limit=4)[0]
        state["window"].append(f"{what} at {where.filename}:{where.lineno}")

    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def patched(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            record(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return read

    update_teacher = model.update_teacher

    def update_then_close(*args, **kwargs):
        update_teacher(*args, **kwargs)
        state["window"] = after

    model.update_teacher = update_then_close
    for name in READS:
        setattr(torch.Tensor, name, patched(name))
    try:
        with _SyncOps(record):
            yield inside, after
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        del model.update_teacher


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("ibot.separate_head=false", "student.drop_path_rate=0.2"),
        ("train.centering=centering", "ibot.sk_exclude_padding=true"),
    ],
    ids=["sinkhorn-separate", "shared-head-drop-path", "centering"],
)
def test_one_iteration_has_no_host_sync_before_the_losses_are_logged(overrides):
    torch.manual_seed(0)
    cfg = tiny_ssl_cfg(4, *overrides)
    model = SSLMetaArch(cfg).train()
    model.prepare_for_distributed_training()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    apply_optim_scheduler(optimizer, 1e-3, 0.04, 1e-3)
    batch = random_collated_batch(cfg, seed=1)
    step = {"iteration": 0, "teacher_temp": 0.07, "momentum": 0.99, "clip_grad": 3.0}
    training_step(model, optimizer, batch, **step)  # first step: the optimizer state is created
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}

    with count_host_reads(model) as (inside, after):
        losses = training_step(model, optimizer, batch, **{**step, "iteration": 1})

    assert inside == [], "host syncs inside the iteration:\n" + "\n".join(inside)
    assert after, "the logged losses are read on the host after the EMA"
    assert set(losses) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert all(isinstance(v, float) for v in losses.values())
    assert any(not torch.equal(before[k], v) for k, v in model.teacher.state_dict().items()), "EMA ran"


def _poisoned_step_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Rank 1's losses are NaN at iteration 1: every rank must skip that step (rank-averaged check)."""
    from test_fsdp import _init, build_model, rank_batch, tiny_cfg

    from franca import fsdp
    from franca.train.train import NonFiniteLossError

    _init(rank, world_size, port)
    try:
        cfg = tiny_cfg()
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model.get_params_groups())
        apply_optim_scheduler(optimizer, 1e-3, 0.04, 1e-3)
        step = {"teacher_temp": 0.07, "momentum": 0.99, "clip_grad": 3.0}
        training_step(model, optimizer, rank_batch(cfg, rank), iteration=0, **step)
        before = fsdp.full_state_dict(model)
        forward_backward = model.forward_backward

        def poisoned(batch, teacher_temp):
            losses = forward_backward(batch, teacher_temp)
            return {k: v * float("nan") for k, v in losses.items()} if rank == 1 else losses

        model.forward_backward = poisoned
        try:
            training_step(model, optimizer, rank_batch(cfg, rank), iteration=1, **step)
            raised = False
        except NonFiniteLossError:
            raised = True
        after = fsdp.full_state_dict(model)
        if rank == 0:
            student = [k for k in before if k.startswith("student.")]
            torch.save({"raised": raised, "unchanged": all(torch.equal(before[k], after[k]) for k in student)}, out)
        assert raised, f"rank {rank} did not stop"
    finally:
        torch.distributed.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """FSDP2 on 2 gloo ranks: the fused AdamW skips on the device (no host read before the step) on both."""
    from test_fsdp import run_ranks

    out = tmp_path / "result.pt"
    run_ranks(_poisoned_step_worker, str(out))
    result = torch.load(out, weights_only=True)
    assert result == {"raised": True, "unchanged": True}
