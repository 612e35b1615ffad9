"""iBOT masked-patch self-distillation loss summed over Matryoshka levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from franca.loss.centering import CenteringTeacher
from franca.loss.levels import as_levels, paired_levels
from franca.loss.sinkhorn_knopp import sinkhorn_knopp
from franca.loss.soft_cross_entropy import soft_cross_entropy


class MRLiBOTPatchLoss(CenteringTeacher):
    """Per-image weighted cross-entropy on the masked patch tokens, summed over levels.

    With the first n = ``n_masked_patches`` rows of the student logits s and teacher targets t (rows beyond n
    are padding up to ``upperbound``), per-token weights w (``masks_weight``; default 1 / #masked patches of
    the token's image) and I images (``student_masks_flat``: I × N bool):
    ``loss = -(1/I) Σ_i w_i Σ_k t[i, k] · log_softmax(s / τ_s)[i, k]`` per level.
    """

    def __init__(
        self,
        patch_out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_prototypes_per_level: Sequence[int] | None = None,
    ) -> None:
        super().__init__("MRLiBOTPatchLoss", (1, 1), n_prototypes_per_level or [patch_out_dim], center_momentum)
        self.student_temp = student_temp

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teach_out: Tensor | Sequence[Tensor],
        teacher_temp: float | Tensor,
        n_masked_patches_tensor: int | Tensor,
        n_iterations: int = 3,
        valid_rows: Tensor | None = None,
    ):
        """Sinkhorn-Knopp targets per level over all given rows (or only ``valid_rows``, [rows] bool, the others
        getting zero targets), with B = the masked-patch count of all ranks."""
        targets = sinkhorn_knopp(
            as_levels(teach_out),
            teacher_temp,
            n_samples=n_masked_patches_tensor,
            n_iterations=n_iterations,
            valid_rows=valid_rows,
        )
        return targets[0] if isinstance(teach_out, Tensor) else targets

    def forward(
        self,
        student_patch_tokens_masked: Tensor | Sequence[Tensor],
        teacher_patch_tokens_masked: Tensor | Sequence[Tensor],
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        n_tokens = masks_weight.shape[0] if n_masked_patches is None else int(n_masked_patches)
        if masks_weight.shape[0] != n_tokens:
            raise ValueError(f"MRLiBOTPatchLoss: {masks_weight.shape[0]} mask weights for {n_tokens} masked patches")
        row_weight = masks_weight / student_masks_flat.shape[0]

        students, teachers = paired_levels(student_patch_tokens_masked, teacher_patch_tokens_masked)
        for student, teacher in zip(students, teachers):
            if student.shape[0] < n_tokens or teacher.shape[0] < n_tokens:
                raise ValueError(
                    f"MRLiBOTPatchLoss: {n_tokens} masked patches but {student.shape[0]} student / "
                    f"{teacher.shape[0]} teacher rows"
                )
        targets = tuple(t[:n_tokens] for t in teachers)
        return soft_cross_entropy(students, targets, self.student_temp, row_weight, n_rows=n_tokens)
