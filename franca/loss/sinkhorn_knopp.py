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

import functools
import itertools
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


@functools.lru_cache(maxsize=32)
def _level_indicator(sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One-hot [ΣK_j, J] bool matrix (row k is True in the column of prototype k's level), the [ΣK_j] level
    size K_j of every prototype and a float32 zero; built once per level sizes and device (no host sync and
    no host-to-device copy in the step), from tensors of J numbers (cheap to trace when compiled, where the
    cache is bypassed)."""
    ends = torch.tensor(list(itertools.accumulate(sizes)))  # [J], end of each level's prototypes
    level_of = torch.bucketize(torch.arange(sum(sizes)), ends, right=True)  # [ΣK], level of each prototype
    indicator = level_of.unsqueeze(1) == torch.arange(len(sizes))
    counts = torch.tensor(sizes, dtype=torch.float32)[level_of]
    return indicator.to(device), counts.to(device), torch.zeros((), device=device)


@torch.no_grad()
def sinkhorn_knopp(
    logits: Sequence[Tensor],
    temperature: float | Tensor,
    n_samples: int | Tensor | None = None,
    n_iterations: int = 3,
    valid_rows: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Sinkhorn-Knopp assignments, one (B_local × K_j) float32 tensor per level of ``logits``.

    ``n_samples`` is this rank's sample count B_local (summed over ranks to give B); by default the number
    of rows. ``temperature`` is a float or a 0-d tensor on the logits' device. ``valid_rows`` [B_local] bool
    leaves the other rows out (their exponentials are exactly 0, so they add nothing to any total and get zero
    assignments): the result on the valid rows is that of a call on those rows alone, with shapes that do not
    depend on how many there are. The logits are not modified.

    Levels with the same row count are processed together: their exponentials sit side by side in one
    [B_local, ΣK_j] buffer (the returned tensors are its column blocks), and with the one-hot level indicator
    I [ΣK_j, J] every iteration is two matrix products over all levels, ``Eᵀ V`` [ΣK_j, J] (prototype totals:
    its entries on each prototype's own level) and ``E (u ⊙ I)`` [B_local, J] (sample totals per level), so
    the operator count does not grow with the number of levels. The other levels' entries are selected away
    (not multiplied by 0), so a NaN of one level stays in that level, as with one call per level.
    """
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1, got {n_iterations}")
    if not logits or any(level.ndim != 2 for level in logits):
        raise ValueError("sinkhorn_knopp: logits must be a non-empty sequence of 2-D (samples × prototypes) tensors")
    if len({level.shape[0] for level in logits}) > 1:  # levels of different row counts: one call each
        return tuple(sinkhorn_knopp([level], temperature, n_samples, n_iterations, valid_rows)[0] for level in logits)
    distributed = _distributed()
    world_size = dist.get_world_size() if distributed else 1
    device = logits[0].device
    rows = logits[0].shape[0]
    sizes = tuple(level.shape[1] for level in logits)
    indicator, prototype_counts, zero = _level_indicator(sizes, device)  # [ΣK, J], [ΣK], []

    # Dynamo traces neither _foreach_max nor out= into column blocks: compiled, plain per-level operators (which
    # Inductor fuses); eager, one foreach maximum and every level written straight into its block of E.
    compiling = torch.compiler.is_compiling()
    if compiling:
        maxima = torch.stack([level.amax() for level in logits]).float()  # [J]
    else:
        maxima = torch.stack(torch._foreach_max(list(logits))).float()  # [J]
    if distributed:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    if n_samples is None:
        totals_b: float | Tensor = float(rows * world_size)
    else:
        totals_b = torch.as_tensor(n_samples, device=device).sum().to(torch.float32).reshape(1)
        if distributed:
            dist.all_reduce(totals_b)

    # T as a 0-d float32 tensor: a fill for a float, the caller's tensor (read on the device) otherwise; L / T is
    # then one rounded division, as the reference's exp(L / T), whichever form T came in.
    if isinstance(temperature, Tensor):
        temp = temperature.to(device=device, dtype=torch.float32)
    else:
        temp = maxima.new_full((), temperature)
    shifts = (maxima / temp - _MAX_EXPONENT).clamp_(min=0.0).neg_()  # -c_j, [J]
    if valid_rows is not None:  # -inf on the rows left out: exp() gives them exact zeros
        shifts = torch.where(valid_rows.unsqueeze(1), shifts, -torch.inf)  # [B_local, J]
    scaled = [(level, neg_shift.unsqueeze(-1)) for level, neg_shift in zip(logits, shifts.unbind(-1))]
    if compiling:
        exps = torch.cat([torch.addcdiv(neg_shift, level, temp) for level, neg_shift in scaled], dim=1)
    else:
        exps = torch.empty(rows, sum(sizes), device=device, dtype=torch.float32)  # E, [B_local, ΣK]
        for block, (level, neg_shift) in zip(exps.split(sizes, dim=1), scaled):
            torch.addcdiv(neg_shift, level, temp, out=block)  # L_j / T - c_j
    blocks = exps.split(sizes, dim=1)
    exps.exp_()
    prototype_scale = exps.new_empty(0)
    sample_scale: Tensor | None = None  # V, [B_local, J]
    for iteration in range(n_iterations):
        if sample_scale is None:
            column_totals = exps.sum(0)
        else:
            column_totals = torch.mm(exps.t(), sample_scale).where(indicator, zero).sum(1)  # [ΣK]
        if distributed:
            dist.all_reduce(column_totals)
        prototype_scale = column_totals.mul_(prototype_counts).clamp_(min=_TINY).reciprocal_()  # u, [ΣK]
        row_totals = torch.mm(exps, prototype_scale.unsqueeze(1).where(indicator, zero))  # [B_local, J]
        if iteration < n_iterations - 1:
            row_totals.mul_(totals_b)
        sample_scale = row_totals.clamp_(min=_TINY).reciprocal_()
    exps.mul_(prototype_scale)
    return tuple(block.mul_(v.unsqueeze(1)) for block, v in zip(blocks, sample_scale.unbind(1)))
