"""Soft-target cross-entropy with a temperature, summed over Matryoshka levels, in two passes forward and
two backward per level.

For level j, student logits s_j ((G·R) × K_j: G student chunks of R rows; only the first ``n_rows`` rows
are used when given), soft targets t_j (R × K_j, one row per row of a student chunk), row weights w (R, or
one number) and level weights λ_j (default 1):

``loss = -Σ_j λ_j Σ_g Σ_r w_r Σ_k t_jrk · log_softmax(s_jgr / τ)_k``

with gradient ``∂loss/∂s_jgrk = (λ_j w_r / τ) · (p_jgrk · Σ_k' t_jrk' - t_jrk)``, ``p = softmax(s / τ)``.
Autograd of the composed expression writes each (G·R) × K_j tensor six times (scaling, log-softmax,
product; their three backward passes) and adds a dozen scalar operators per level. Here forward writes
``s / τ`` and the log-softmax per level and reads the per-row dots ``Σ_k t_jrk · log p_jgrk`` off a
batched matrix product; the levels' dots are reduced together. Backward writes the scaled targets
``-(λ_j w_r / τ) · t_j`` and the log-softmax backward (``go - p · Σ_k go``) per level, nothing else; rows
past ``n_rows`` (the iBOT ``upperbound`` padding) get a zero gradient without a slice backward.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor


def _log_probs(student: Tensor, n_rows: int, temperature: float) -> Tensor:
    """``log_softmax(s[:n_rows] / τ)`` in float32."""
    return torch.log_softmax(student[:n_rows].float() / temperature, dim=-1)


def _row_dots(target: Tensor, log_probs: Tensor) -> Tensor:
    """(R, 1, G) dots ``Σ_k t_rk · log p_grk`` of every chunk g, as one (R, 1, K) @ (R, K, G) product."""
    rows, n_prototypes = target.shape
    chunks = log_probs.view(-1, rows, n_prototypes).permute(1, 2, 0)  # (R, K, G), no copy
    return torch.bmm(target.unsqueeze(1), chunks)


def _input_grad(grad_log_probs: Tensor, log_probs: Tensor, student_rows: int, dtype: torch.dtype) -> Tensor:
    """The logits' gradient: the log-softmax backward, written into the used rows of a ``student_rows``-row
    tensor of the logits' dtype whose padding rows are zero."""
    n_rows = log_probs.shape[0]
    if student_rows == n_rows and dtype == torch.float32:
        return torch._log_softmax_backward_data(grad_log_probs, log_probs, -1, torch.float32)
    grad = torch.empty(student_rows, log_probs.shape[1], device=log_probs.device, dtype=dtype)
    if dtype == torch.float32:
        torch._log_softmax_backward_data(grad_log_probs, log_probs, -1, torch.float32, out=grad[:n_rows])
    else:  # the float32 gradient cast to the logits' dtype
        grad[:n_rows].copy_(torch._log_softmax_backward_data(grad_log_probs, log_probs, -1, torch.float32))
    grad[n_rows:].zero_()
    return grad


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, temperature, n_rows, weight, level_weights, n_levels, *tensors):
        students, targets = tensors[:n_levels], tensors[n_levels:]
        log_probs = [_log_probs(s, n_rows, temperature) for s in students]
        dots = torch.stack([_row_dots(t, lp) for t, lp in zip(targets, log_probs)])  # (J, R, 1, G)
        dots = dots.view(n_levels, targets[0].shape[0]) if dots.shape[-1] == 1 else dots.sum((2, 3))  # (J, R)
        if level_weights is not None:
            dots = dots * level_weights.unsqueeze(1)
        ctx.save_for_backward(weight, level_weights, *log_probs, *targets)
        ctx.temperature, ctx.n_levels = temperature, n_levels
        ctx.students = [(s.shape[0], s.dtype) for s in students]
        return -torch.mv(dots, weight.view(-1)).sum() if weight.numel() > 1 else -(dots.sum() * weight.view(()))

    @staticmethod
    def backward(ctx, grad_loss):
        weight, level_weights, *saved = ctx.saved_tensors
        log_probs, targets = saved[: ctx.n_levels], saved[ctx.n_levels :]
        scale = weight * (grad_loss.float() * (-1.0 / ctx.temperature))  # (R, 1) or (1, 1)
        grads = []
        for j, (lp, target, (rows, dtype)) in enumerate(zip(log_probs, targets, ctx.students)):
            level_scale = scale if level_weights is None else scale * level_weights[j]
            groups = lp.shape[0] // target.shape[0]
            grad_lp = torch.mul(target, level_scale.unsqueeze(0).expand(groups, -1, -1))  # (G, R, K_j)
            grads.append(_input_grad(grad_lp.view(-1, target.shape[1]), lp, rows, dtype))
        return None, None, None, None, None, *grads, *([None] * ctx.n_levels)


@functools.lru_cache(maxsize=16)
def _level_weight_tensor(weights: tuple[float, ...], device: torch.device) -> Tensor:
    """The level weights λ_j as a [J] float32 tensor on ``device``, copied there once (no host-to-device copy
    inside a step)."""
    return torch.tensor(weights, dtype=torch.float32).to(device)


def soft_cross_entropy(
    students: Sequence[Tensor],
    targets: Sequence[Tensor],
    temperature: float,
    row_weight: Tensor | float = 1.0,
    n_rows: int | None = None,
    level_weights: Sequence[float] | None = None,
) -> Tensor:
    """``-Σ_j λ_j Σ_g Σ_r w_r Σ_k t_jrk · log_softmax(s_jgr / τ)_k`` (module docstring), a float32 scalar.

    ``students[j]`` (≥ n_rows, K_j) logits of any float dtype, their first ``n_rows`` rows (default: all)
    forming G = n_rows / R chunks of the R rows of ``targets[j]`` (R, K_j); ``row_weight`` (R,) or a number;
    ``level_weights`` λ_j (default 1 each).
    """
    students, targets = tuple(students), tuple(t.float() for t in targets)
    if not students or len(students) != len(targets):
        raise ValueError(f"soft_cross_entropy: {len(students)} student levels for {len(targets)} target levels")
    rows = targets[0].shape[0]
    n_rows = students[0].shape[0] if n_rows is None else int(n_rows)
    for j, (s, t) in enumerate(zip(students, targets)):
        if t.ndim != 2 or s.ndim != 2 or s.shape[1] != t.shape[1] or t.shape[0] != rows:
            raise ValueError(
                f"soft_cross_entropy: level {j}: student {tuple(s.shape)} and target {tuple(t.shape)} must be "
                f"(rows, K) with the same K and {rows} target rows"
            )
        if n_rows > s.shape[0] or rows == 0 or n_rows % rows:
            raise ValueError(
                f"soft_cross_entropy: level {j}: {n_rows} student rows (of {s.shape[0]}) do not form chunks of "
                f"the {rows} target rows"
            )
    device = students[0].device
    if isinstance(row_weight, Tensor):
        if row_weight.numel() not in (1, rows):
            raise ValueError(f"soft_cross_entropy: {row_weight.numel()} row weights for {rows} target rows")
        weight = row_weight.to(device=device, dtype=torch.float32).reshape(-1, 1)
    else:
        weight = torch.full((1, 1), float(row_weight), device=device)
    lambdas = None
    if level_weights is not None:
        if len(level_weights) != len(students):
            raise ValueError(f"soft_cross_entropy: {len(level_weights)} level weights for {len(students)} levels")
        lambdas = _level_weight_tensor(tuple(float(w) for w in level_weights), device)
    return _SoftCrossEntropy.apply(float(temperature), n_rows, weight, lambdas, len(students), *students, *targets)
