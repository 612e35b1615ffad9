"""Matryoshka levels: per-level head outputs as tuples, and the student/teacher pairing the losses check."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def as_levels(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Per-level tensors of a head output: a Matryoshka head gives one tensor per level, a plain head one."""
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def paired_levels(
    student: Tensor | Sequence[Tensor],
    teacher: Tensor | Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """The student and teacher levels as tuples, checked to match: as many levels (and ``weights``, when
    given) and the same prototype count per level."""
    student_levels, teacher_levels = as_levels(student), as_levels(teacher)
    if len(student_levels) != len(teacher_levels):
        raise ValueError(
            f"student has {len(student_levels)} Matryoshka levels but the teacher targets have {len(teacher_levels)}"
        )
    if weights is not None and len(weights) != len(student_levels):
        raise ValueError(f"{len(weights)} relative_importance weights for {len(student_levels)} Matryoshka levels")
    for j, (s, t) in enumerate(zip(student_levels, teacher_levels)):
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"level {j}: student has {s.shape[-1]} prototypes but the teacher {t.shape[-1]}")
    return student_levels, teacher_levels
