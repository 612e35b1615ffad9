"""One training iteration of the eager loop: ``forward_backward`` → clip → AdamW step → EMA → the logged losses.

A step whose (rank-averaged) losses are not all finite changes no student weight and raises
:class:`NonFiniteLossError` naming the iteration and every term. :mod:`franca.train.static_step` runs the same
iteration with its schedule values on the device (``train.cuda_graph``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import franca.distributed as distributed
from franca.train.ssl_meta_arch import SSLMetaArch


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the iteration and every term."""


def clip_gradients(model: SSLMetaArch, max_norm: float) -> None:
    """Clip the gradient norm of each student part (backbone, dino_head, ibot_head) separately.

    Per part: ``g ← g · min(1, max_norm / (‖g‖₂ + 1e-6))`` with ``‖g‖₂`` over all of the part's gradients, in
    foreach kernels (one norm and one scaling over all tensors of a part) and without a host sync. With FSDP
    the gradients are DTensor shards and the norm is reduced across ranks: the total norm is that of the
    full gradient (checked against one process in ``tests/test_fsdp.py``).
    """
    for part in model.student.values():
        params = [p for p in part.parameters() if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=params[0].device.type in ("cpu", "cuda"))


def stacked_losses(loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss terms as one float32 vector [n_terms], averaged over ranks (an all-reduce on the device)."""
    values = torch.stack([value.detach().float() for value in loss_dict.values()])
    if distributed.is_enabled() and distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
        values /= distributed.get_world_size()
    return values


def reduce_losses(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each loss term over ranks, as floats (one all-reduce for all terms; one host sync)."""
    return dict(zip(loss_dict, stacked_losses(loss_dict).tolist()))


def check_finite(iteration: int, losses: dict[str, float]) -> None:
    if not all(math.isfinite(v) for v in losses.values()):
        terms = ", ".join(f"{name}={value:.6g}" for name, value in losses.items())
        raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: {terms}; stopping")


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the 0-d ``skip`` is 1, decided on the device: the fused AdamW kernel reads it
    (``found_inf``, as the grad scaler passes it) and leaves parameters, moments and step counts unchanged."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def step_on_device(
    model: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    loss_dict: dict[str, torch.Tensor],
    *,
    clip_grad: float,
    momentum: float | torch.Tensor,
    before_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Clip → fused AdamW step, skipped on the device when a rank-averaged loss is not finite → EMA, after
    ``backward``; returns the loss vector [n_terms] (nothing read on the host). ``before_step(skip)`` runs
    just before the step with the 0-d skip flag (1.0: skip)."""
    values = stacked_losses(loss_dict)
    skip = (~torch.isfinite(values).all()).float()
    if clip_grad:
        clip_gradients(model, clip_grad)
    if before_step is not None:
        before_step(skip)
    step_unless(optimizer, skip)
    model.update_teacher(momentum)
    return values


def training_step(
    model: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    iteration: int,
    teacher_temp: float,
    momentum: float,
    clip_grad: float,
) -> dict[str, float]:
    """forward_backward → clip → step → EMA → the logged losses; a non-finite loss raises NonFiniteLossError.

    A step whose (rank-averaged) losses are not all finite changes no student weight. With the fused AdamW and
    no grad scaler that is decided on the device, and the host waits only once, after the EMA, to read the
    losses for logging; otherwise (the fp16 grad scaler, whose step reads its inf flag on the host anyway, or
    a non-fused optimizer) the losses are read before the step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(batch, teacher_temp=teacher_temp)
    scaler = model.fp16_scaler
    if scaler is None and all(group.get("fused") for group in optimizer.param_groups):
        values = step_on_device(model, optimizer, loss_dict, clip_grad=clip_grad, momentum=momentum)
        losses = dict(zip(loss_dict, values.tolist()))
        check_finite(iteration, losses)
        return losses
    losses = reduce_losses(loss_dict)
    check_finite(iteration, losses)
    if scaler is not None:
        if clip_grad:
            scaler.unscale_(optimizer)
            clip_gradients(model, clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad:
            clip_gradients(model, clip_grad)
        optimizer.step()
    model.update_teacher(momentum)
    return losses
