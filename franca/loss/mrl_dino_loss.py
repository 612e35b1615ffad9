"""DINO (class-token) self-distillation loss summed over Matryoshka levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from franca.loss.centering import CenteringTeacher
from franca.loss.levels import as_levels, paired_levels
from franca.loss.sinkhorn_knopp import sinkhorn_knopp
from franca.loss.soft_cross_entropy import soft_cross_entropy


def _crop_sum(x: Tensor, n_crops: int) -> Tensor:
    """(n_crops·R × K) → (R × K): the sum over the crop chunks (the teacher side; each student chunk meets it)."""
    x = x.reshape(n_crops, -1, x.shape[-1])
    return x[0] if n_crops == 1 else x.sum(0)


class MRLDINOLoss(CenteringTeacher):
    """Cross-entropy between teacher targets and student class-token logits, per level, summed over levels.

    For one level with student chunks s_1..s_S (each R × K) and teacher chunks t_1..t_T (each R × K):
    ``loss = -Σ_s Σ_t mean_r Σ_k t[r, k] · log_softmax(s / τ_s)[r, k]``
    (``teacher_global=False``, ``n_crops=(S, T)``: every local crop against both teacher globals), or, with
    ``teacher_global=True``, one chunk each: the 2B global-crop rows against the (already crop-swapped)
    teacher rows. Levels are weighted by ``relative_importance`` (default 1 each). The official caller divides
    by the number of loss terms. Teacher targets come from ``sinkhorn_knopp_teacher`` (Franca) or
    ``softmax_center_teacher`` (EMA centre of ``n_prototypes_per_level``, default ``[out_dim]``).
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        relative_importance: Sequence[float] | None = None,
        n_prototypes_per_level: Sequence[int] | None = None,
    ) -> None:
        super().__init__("MRLDINOLoss", (1,), n_prototypes_per_level or [out_dim], center_momentum)
        self.student_temp = student_temp
        self.relative_importance = None if relative_importance is None else [float(w) for w in relative_importance]

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor | Sequence[Tensor],
        teacher_temp: float | Tensor,
        n_global_crops_teacher: int = 2,
        n_iterations: int = 3,
    ):
        """Sinkhorn-Knopp targets per level (rows = ``n_global_crops_teacher`` crops × batch; B = all rows)."""
        levels = as_levels(teacher_output)
        for t in levels:
            if t.shape[0] % n_global_crops_teacher:
                raise ValueError(
                    f"MRLDINOLoss: {t.shape[0]} teacher rows do not split into {n_global_crops_teacher} global crops"
                )
        targets = sinkhorn_knopp(levels, teacher_temp, n_iterations=n_iterations)
        return targets[0] if isinstance(teacher_output, Tensor) else targets

    def forward(
        self,
        student_output_list: Tensor | Sequence[Tensor],
        teacher_out_softmaxed_centered_list: Tensor | Sequence[Tensor],
        n_crops: int | tuple[int, int],
        teacher_global: bool = False,
    ) -> Tensor:
        if teacher_global:
            n_student, n_teacher = 1, 1
        elif isinstance(n_crops, int):
            raise ValueError("MRLDINOLoss: teacher_global=False needs n_crops=(n_student_crops, n_teacher_crops)")
        else:
            n_student, n_teacher = n_crops

        students, teachers = paired_levels(
            student_output_list, teacher_out_softmaxed_centered_list, self.relative_importance
        )
        teachers = tuple(t.reshape(-1, t.shape[-1]) for t in teachers)
        rows = teachers[0].shape[0] // n_teacher
        for student, teacher in zip(students, teachers):
            if teacher.shape[0] != rows * n_teacher or student.shape[0] != rows * n_student:
                raise ValueError(
                    f"MRLDINOLoss: {student.shape[0]} student rows / {teacher.shape[0]} teacher rows do not form "
                    f"{n_student} student and {n_teacher} teacher crops of the same batch"
                )
        targets = tuple(_crop_sum(t, n_teacher) for t in teachers)
        return soft_cross_entropy(
            students, targets, self.student_temp, 1.0 / rows, level_weights=self.relative_importance
        )
