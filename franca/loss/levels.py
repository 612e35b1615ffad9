"""Matryoshka levels: the one loop that sums a loss term over the per-level head outputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor


def as_levels(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Per-level tensors of a head output: a Matryoshka head gives one tensor per level, a plain head one."""
    return (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)


def sum_over_levels(
    term: Callable[[Tensor, Tensor], Tensor],
    student: Tensor | Sequence[Tensor],
    teacher: Tensor | Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """``Σ_j w_j · term(student_j, teacher_j)`` over the levels (``w_j = 1`` unless ``weights`` is given)."""
    student_levels, teacher_levels = as_levels(student), as_levels(teacher)
    if len(student_levels) != len(teacher_levels):
        raise ValueError(
            f"student has {len(student_levels)} Matryoshka levels but the teacher targets have {len(teacher_levels)}"
        )
    if weights is not None and len(weights) != len(student_levels):
        raise ValueError(f"{len(weights)} relative_importance weights for {len(student_levels)} Matryoshka levels")
    total = None
    for j, (s, t) in enumerate(zip(student_levels, teacher_levels)):
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(f"level {j}: student has {s.shape[-1]} prototypes but the teacher {t.shape[-1]}")
        value = term(s, t)
        if weights is not None:
            value = value * weights[j]
        total = value if total is None else total + value
    return total
