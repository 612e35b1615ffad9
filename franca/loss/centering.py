"""Softmax-centering teacher targets (DINO / iBOT ``train.centering: centering``) with an EMA centre per level.

``target = softmax((t - c) / T)`` with the centre c updated after each step as
``c ← m · c + (1 - m) · mean(teacher logits)``; the batch mean is the mean over this call's rows, averaged
over ranks (all-reduced asynchronously in ``update_center`` and applied at the next
``softmax_center_teacher``, as in DINOv2). With Matryoshka outputs every level has its own centre; the
``center`` buffer holds them side by side, (…, Σ_j K_j), a single level being the DINOv2 layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from franca.loss.levels import as_levels


class CenteringTeacher(nn.Module):
    """Base of the DINO and iBOT losses: the ``center`` buffer and its softmax-centering methods."""

    def __init__(
        self,
        loss_name: str,
        center_shape: tuple[int, ...],
        n_prototypes_per_level: Sequence[int],
        center_momentum: float,
    ) -> None:
        super().__init__()
        self._loss_name = loss_name
        self.n_prototypes_per_level = tuple(int(k) for k in n_prototypes_per_level)
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape, sum(self.n_prototypes_per_level)))
        self._pending_center: Tensor | None = None
        self._pending_handle = None

    def _check_levels(self, levels: tuple[Tensor, ...]) -> None:
        sizes = tuple(t.shape[-1] for t in levels)
        if sizes != self.n_prototypes_per_level:
            raise ValueError(
                f"{self._loss_name}: centering got levels with {list(sizes)} prototypes but the centre was built for "
                f"{list(self.n_prototypes_per_level)}; pass n_prototypes_per_level={list(sizes)}"
            )

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor | Sequence[Tensor], teacher_temp: float | Tensor):
        """``softmax((t - c_j) / T)`` per level, same shapes (and tensor/tuple kind) as ``teacher_output``."""
        self.apply_center_update()
        levels = as_levels(teacher_output)
        self._check_levels(levels)
        centres = self.center.reshape(-1).split(self.n_prototypes_per_level)
        targets = tuple(F.softmax(torch.sub(t, c).mul_(1.0 / teacher_temp), dim=-1) for t, c in zip(levels, centres))
        return targets[0] if isinstance(teacher_output, Tensor) else targets

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor | Sequence[Tensor], rows: Tensor | None = None) -> None:
        """Start the centre update from these teacher logits (row mean per level, over the rows where ``rows``
        [n_rows] bool is True when given; all-reduced when distributed)."""
        levels = as_levels(teacher_output)
        self._check_levels(levels)
        flat = [t.reshape(-1, t.shape[-1]).float() for t in levels]
        if rows is None:
            means = torch.cat([t.mean(0) for t in flat])
        else:
            weights = rows.float() / rows.sum().clamp(min=1)  # [n_rows], 1 / #rows kept on the kept rows
            means = torch.cat([weights @ t for t in flat])
        self._pending_handle = None
        if dist.is_available() and dist.is_initialized():
            self._pending_handle = dist.all_reduce(means, async_op=True)
        self._pending_center = means

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a pending update: ``c ← m · c + (1 - m) · batch_mean``."""
        if self._pending_center is None:
            return
        batch_mean = self._pending_center
        if self._pending_handle is not None:
            self._pending_handle.wait()
            batch_mean = batch_mean / dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(
            batch_mean.view_as(self.center).to(self.center.dtype), alpha=1 - self.center_momentum
        )
        self._pending_center = None
        self._pending_handle = None
