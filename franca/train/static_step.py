"""The training iteration with fixed shapes and no host values, and its replay as a CUDA graph (``train.cuda_graph``).

The eager loop (:func:`franca.train.iteration.training_step`) hands each iteration its schedule values as Python
numbers: every AdamW group's lr and weight decay, the teacher temperature, the EMA momentum. A CUDA graph
replays the kernels it recorded with the arguments they were recorded with, so here those values live in one
device vector ``values`` = (lr, wd, momentum, teacher_temp, last_layer_lr), written once per iteration (one
copy of five numbers) and read by the kernels:

* group lr: ``lr_g = (last_layer_lr if is_last_layer_g else lr) · lr_multiplier_g``, computed on the device
  into the 0-d tensors that the fused AdamW kernel reads as each group's ``lr``;
* weight decay: AdamW's decoupled decay ``p ← p · (1 − lr_g · wd · wd_multiplier_g)`` applied just before the
  AdamW update (one foreach multiply per group with decay; AdamW's own ``weight_decay`` is 0); a skipped step
  (non-finite losses, decided on the device) multiplies by 1;
* teacher temperature into the targets (:meth:`SSLMetaArch.get_teacher_output`), momentum into the EMA
  (:meth:`SSLMetaArch.update_teacher`).

The shapes do not change either: the iBOT rows come padded to ``upperbound`` (:meth:`SSLMetaArch._move_batch`),
and nothing in the iteration reads a device value on the host before the logged losses, after the EMA.

With ``capture`` (CUDA only): the first ``warmup`` iterations run eagerly on a side stream (they create AdamW's
state and the cached constants), the next one is recorded into a :class:`torch.cuda.CUDAGraph` and replayed,
and every later iteration copies its batch into the graph's input tensors, writes ``values`` and replays:
one launch for the whole forward, backward, clipping, AdamW step and EMA. Capture needs one process (FSDP's
collectives are not recorded here), no fp16 grad scaler (its step reads the inf flag on the host), the fused
AdamW and Sinkhorn-Knopp targets (softmax centering keeps its pending centre on the host side):
:func:`capture_blockers` lists what stands in the way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import franca.distributed as distributed
from franca.train.iteration import check_finite, step_on_device
from franca.train.ssl_meta_arch import SSLMetaArch

SCHEDULE = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")


def _step_blockers(model: SSLMetaArch, optimizer: torch.optim.Optimizer) -> list[str]:
    """Why this step cannot run ``model`` and ``optimizer`` at all, recorded or not (empty: it can)."""
    blockers = []
    if model.fp16_scaler is not None:
        blockers.append("the fp16 grad scaler reads its inf flag on the host (compute in bf16)")
    if not all(group.get("fused") for group in optimizer.param_groups):
        blockers.append("it needs the fused AdamW (every parameter a floating-point CPU or CUDA tensor)")
    return blockers


def capture_blockers(model: SSLMetaArch, optimizer: torch.optim.Optimizer) -> list[str]:
    """Why the iteration of ``model`` and ``optimizer`` cannot be recorded as a CUDA graph (empty: it can)."""
    blockers = []
    if model.device.type != "cuda":
        blockers.append(f"it needs a CUDA device (the model is on {model.device.type})")
    if distributed.is_enabled() and distributed.get_world_size() > 1:
        blockers.append(f"it runs in one process (this run has {distributed.get_world_size()} ranks, sharded by FSDP)")
    blockers += _step_blockers(model, optimizer)
    if model.centering != "sinkhorn_knopp":
        blockers.append("softmax centering (train.centering=centering) updates its centre outside the device")
    return blockers


class StaticTrainingStep:
    """forward_backward → clip → AdamW → EMA with the schedule values read on the device; see the module
    docstring. Built after the checkpoint is restored: it takes over ``optimizer``'s lr and weight decay."""

    WARMUP = 3  # eager iterations before the recording (PyTorch's advice for whole-network capture)

    def __init__(
        self,
        model: SSLMetaArch,
        optimizer: torch.optim.Optimizer,
        clip_grad: float,
        capture: bool = False,
        warmup: int = WARMUP,
    ) -> None:
        blockers = capture_blockers(model, optimizer) if capture else _step_blockers(model, optimizer)
        if blockers:
            what = "train.cuda_graph=true cannot capture this run" if capture else "StaticTrainingStep cannot run"
            raise ValueError(f"{what}: " + "; ".join(blockers))
        self.model, self.optimizer, self.clip_grad = model, optimizer, clip_grad
        self.capture, self.warmup = capture, warmup
        device = model.device
        groups = optimizer.param_groups
        self.values = torch.zeros(len(SCHEDULE), device=device)
        self._host_values = torch.zeros(len(SCHEDULE), pin_memory=capture)

        def on_device(key: str) -> Tensor:
            return torch.tensor([float(group[key]) for group in groups]).to(device)

        self._lr_multipliers, self._wd_multipliers = on_device("lr_multiplier"), on_device("wd_multiplier")
        self._last_layer = on_device("is_last_layer").bool()
        self._group_lrs = torch.zeros(len(groups), device=device)
        self._decayed = [(g, group["params"]) for g, group in enumerate(groups) if group["wd_multiplier"] != 0]
        for group, lr in zip(groups, self._group_lrs.unbind(0)):
            group["lr"], group["weight_decay"] = lr, 0.0
        self.inputs: dict[str, Any] | None = None
        self._names: list[str] | None = None
        self._values_out: Tensor | None = None
        self._eager_iterations = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def _iteration(self) -> Tensor:
        """One iteration on ``self.inputs`` and ``self.values``; returns the (rank-averaged) loss vector."""
        model = self.model
        lr, wd, momentum, teacher_temp, last_layer_lr = self.values.unbind(0)
        torch.mul(torch.where(self._last_layer, last_layer_lr, lr), self._lr_multipliers, out=self._group_lrs)
        step = model.forward_on_device(self.inputs, teacher_temp=teacher_temp)
        model.backprop_loss(step.objective)
        self._names = list(step.losses)

        @torch.no_grad()
        def weight_decay(skip: Tensor) -> None:
            decay = torch.mul(self._group_lrs * self._wd_multipliers, wd * (1.0 - skip)).neg_().add_(1.0)  # [G]
            for g, params in self._decayed:
                torch._foreach_mul_(params, decay[g])

        return step_on_device(
            model, self.optimizer, step.losses, clip_grad=self.clip_grad, momentum=momentum, before_step=weight_decay
        )

    def _load_inputs(self, batch: dict) -> None:
        inputs = self.model._move_batch(batch)
        if self.inputs is None or not self.capture:
            self.inputs = inputs
            return
        for key, value in inputs.items():
            static = self.inputs[key]
            if isinstance(value, Tensor) and (value.shape, value.dtype) == (static.shape, static.dtype):
                static.copy_(value, non_blocking=True)
            elif isinstance(value, Tensor) or value != static:
                got = tuple(value.shape) if isinstance(value, Tensor) else value
                want = tuple(static.shape) if isinstance(static, Tensor) else static
                raise ValueError(
                    f"train.cuda_graph: batch '{key}' is {got}, the captured step was recorded with {want}; "
                    "every batch must have the same shapes (train.batch_size_per_gpu, crops, masking ratios)"
                )

    def _run_on_side_stream(self) -> Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.optimizer.zero_grad(set_to_none=True)
            values = self._iteration()
        torch.cuda.current_stream().wait_stream(stream)
        return values

    def _record(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients in its own pool
        for group in self.optimizer.param_groups:
            group["capturable"] = True
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._values_out = self._iteration()

    def __call__(
        self,
        batch: dict,
        *,
        iteration: int,
        lr: float,
        wd: float,
        momentum: float,
        teacher_temp: float,
        last_layer_lr: float,
    ) -> dict[str, float]:
        """Run one iteration on ``batch`` with these schedule values; returns the logged losses (the one host
        read, after the EMA) and raises :class:`~franca.train.iteration.NonFiniteLossError` as ``training_step``."""
        for i, value in enumerate((lr, wd, momentum, teacher_temp, last_layer_lr)):
            self._host_values[i] = value
        self.values.copy_(self._host_values, non_blocking=True)
        self._load_inputs(batch)
        if not self.capture:
            self.optimizer.zero_grad(set_to_none=True)
            values = self._iteration()
        elif self.graph is None and self._eager_iterations < self.warmup:
            self._eager_iterations += 1
            values = self._run_on_side_stream()
        else:
            if self.graph is None:
                self._record()
            self.graph.replay()
            values = self._values_out
        losses = dict(zip(self._names, values.tolist()))
        check_finite(iteration, losses)
        return losses
