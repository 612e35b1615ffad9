"""Sinkhorn-Knopp teacher targets: the one implementation behind the DINO and the iBOT losses.

For each level, with logits L (B_local × K) and temperature T, start from ``Q = exp(L / T)`` and alternate
``n_iterations`` times (SwAV / DINOv2 order):

* prototype marginals: scale every prototype column so that it sums to 1/K (summed over all ranks);
* sample marginals: scale every sample row so that it sums to 1/B;

and return ``B · Q`` (each row a probability distribution over the K prototypes). B is the number of
samples over all ranks: ``B_local · world_size`` by default (DINO) or the all-reduced ``n_samples`` count
(iBOT: the number of masked patches, while Q may also hold padding rows).

Both scalings are diagonal, so after any number of steps ``Q = diag(v) · E · diag(u)`` with
``E = exp(L / T - c)``. The iterations therefore only update the vectors u (K) and v (B) with two
matrix-vector products each, and the B × K matrix is written once at the end:
``u ← 1 / (K · Σ_ranks Eᵀ v)``, ``v ← 1 / (B · E u)`` (without the B in the last step, which is the final
``· B``). The shift c, like the reference iBOT's initial division of Q by its total, multiplies Q by one
scalar that the first prototype normalisation cancels exactly. It is ``max(0, max(L)/T - 60)`` (the
maximum over all levels' ranks): zero for well-scaled logits, which then get exactly the reference's
``exp(L / T)`` and no extra float32 denormals (several times slower in exp() on CPUs), while larger logits
no longer overflow. Across ranks only the prototype totals (one vector for all levels per iteration),
the maxima and the sample count are all-reduced, so N ranks with b rows each give the rows of 1 rank
with N·b rows. Nothing is communicated unless ``torch.distributed`` is initialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Floor of a row or column total: a prototype (or sample) whose every entry underflowed in exp() keeps
# weight 0 instead of turning 0 · (1/0) into NaN; normal totals are far above it and unchanged.
_TINY = torch.finfo(torch.float32).tiny
# Largest exponent kept: exp(60) summed over 1e12 rows still fits in float32 (max ~3.4e38).
_MAX_EXPONENT = 60.0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_levels(vectors: list[Tensor], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[Tensor]:
    """All-reduce a list of 1-D tensors with a single collective."""
    flat = torch.cat(vectors)
    dist.all_reduce(flat, op=op)
    return list(flat.split([v.numel() for v in vectors]))


@torch.no_grad()
def sinkhorn_knopp(
    logits: Sequence[Tensor],
    temperature: float,
    n_samples: int | Tensor | None = None,
    n_iterations: int = 3,
) -> tuple[Tensor, ...]:
    """Sinkhorn-Knopp assignments, one (B_local × K_j) float32 tensor per level of ``logits``.

    ``n_samples`` is this rank's sample count B_local (summed over ranks to give B); by default the number
    of rows. The logits are not modified.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1, got {n_iterations}")
    levels = [level.float() for level in logits]
    if not levels or any(level.ndim != 2 for level in levels):
        raise ValueError("sinkhorn_knopp: logits must be a non-empty sequence of 2-D (samples × prototypes) tensors")
    distributed = _distributed()
    world_size = dist.get_world_size() if distributed else 1
    device = levels[0].device

    maxima = torch.stack([level.amax() for level in levels])
    if distributed:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    if n_samples is None:
        totals_b: list[float | Tensor] = [float(level.shape[0] * world_size) for level in levels]
    else:
        count = torch.as_tensor(n_samples, device=device).sum().to(torch.float32).reshape(1)
        if distributed:
            dist.all_reduce(count)
        totals_b = [count] * len(levels)

    inv_t = 1.0 / temperature
    shifts = (maxima * inv_t - _MAX_EXPONENT).clamp_(min=0.0)
    exps = [torch.add(-shift, level, alpha=inv_t).exp_() for shift, level in zip(shifts, levels)]
    prototype_scale: list[Tensor] = []
    sample_scale: list[Tensor | None] = [None] * len(levels)
    for iteration in range(n_iterations):
        column_totals = [e.sum(0) if v is None else torch.mv(e.t(), v) for e, v in zip(exps, sample_scale)]
        if distributed:
            column_totals = _all_reduce_levels(column_totals)
        prototype_scale = [t.mul_(e.shape[1]).clamp_(min=_TINY).reciprocal_() for t, e in zip(column_totals, exps)]
        last = iteration == n_iterations - 1
        sample_scale = [
            (row if last else row.mul_(b)).clamp_(min=_TINY).reciprocal_()
            for row, b in ((torch.mv(e, u), b) for e, u, b in zip(exps, prototype_scale, totals_b))
        ]
    return tuple(e.mul_(u).mul_(v.unsqueeze(1)) for e, u, v in zip(exps, prototype_scale, sample_scale))
