"""Stochastic depth (drop path): each sample's residual branch is dropped with probability ``p`` in training.

Two equivalent-in-expectation forms, as in DINOv2:

* per-token scale: compute the branch for every sample and add sample ``b``'s residual times ``m_b / (1 - p)``,
  ``m_b ~ Bernoulli(1 - p)`` (:class:`DropPath`, and :class:`BranchDrop` with a ``token_scale``);
* kept samples: compute the branch only on a random subset of ``max(int(B·(1 - p)), 1)`` samples per crop
  batch and add it scaled by ``B / subset`` (:class:`BranchDrop` with ``rows``; cheaper for large ``p``).

:func:`draw_branch_drops` draws every residual branch of a forward pass at once — one set of random
operators per distinct rate, not per block — and :func:`add_residual` adds a branch output with its
LayerScale and its draw. Both forms are the identity map on the residual outside training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from franca.layers.attention import TokenLayout

# Above this drop rate the residual is computed on the kept samples only (the gather cost then pays off).
SUBSET_DROP_THRESHOLD = 0.1


def _per_sample(values: list[Tensor], layout: TokenLayout) -> Tensor:
    """One value per sample (a ``(B_i,)`` tensor per crop batch) → ``(T, 1)`` column repeating it over its tokens."""
    return torch.cat([v.repeat_interleave(n) for v, (_, n) in zip(values, layout.shapes)]).unsqueeze(-1)


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False, layout: TokenLayout | None = None) -> Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob`` and rescale the kept ones by ``1/(1-drop_prob)``.

    ``x`` is batch-first, or packed ``(T, D)`` tokens described by ``layout`` (one draw per sample).
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    if layout is None:
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    else:
        mask = _per_sample([x.new_empty(b).bernoulli_(keep_prob) for b, _ in layout.shapes], layout)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (active only in training mode)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor, layout: TokenLayout | None = None) -> Tensor:
        return drop_path(x, self.drop_prob, self.training, layout)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


@dataclass(frozen=True)
class BranchDrop:
    """The stochastic-depth draw of one residual branch on a packed layout.

    Either ``token_scale`` (T, 1): ``m_b / (1 - p)`` repeated over sample b's tokens; or ``rows`` (R,): the
    packed rows of the kept samples, laid out as ``kept_layout``, their residual weighted by ``row_scale``
    (a number, or an (R, 1) column when crop batches keep different fractions).
    """

    token_scale: Tensor | None = None
    rows: Tensor | None = None
    kept_layout: TokenLayout | None = None
    row_scale: Tensor | float = 1.0


def _token_scales(layout: TokenLayout, n_branches: int, drop_prob: float, device, dtype) -> list[BranchDrop]:
    """Bernoulli keep masks of every sample for ``n_branches`` branches, one (n_branches, T) draw."""
    keep_prob = 1.0 - drop_prob
    samples = sum(b for b, _ in layout.shapes)
    keep = torch.empty(n_branches, samples, device=device, dtype=dtype).bernoulli_(keep_prob).div_(keep_prob)
    per_run, first = [], 0
    for _, _, run_samples, n in layout.runs:
        run = keep[:, first : first + run_samples, None].expand(n_branches, run_samples, n)
        per_run.append(run.reshape(n_branches, run_samples * n))
        first += run_samples
    scales = per_run[0] if len(per_run) == 1 else torch.cat(per_run, dim=1)
    return [BranchDrop(token_scale=s.unsqueeze(1)) for s in scales.unbind(0)]


def _kept_rows(layout: TokenLayout, n_branches: int, drop_prob: float, device, dtype) -> list[BranchDrop]:
    """For ``n_branches`` branches, ``max(int(B·(1-p)), 1)`` samples of each crop batch drawn without
    replacement (the first of a uniform random order, from one (n_branches, B) draw per crop batch)."""
    rows, kept_shapes, weights, offset = [], [], [], 0
    for batch, n in layout.shapes:
        kept = max(int(batch * (1.0 - drop_prob)), 1)
        order = torch.rand(n_branches, batch, device=device).argsort(dim=1)[:, :kept]
        rows.append((order * n + offset).unsqueeze(-1).add(torch.arange(n, device=device)).view(n_branches, -1))
        kept_shapes.append((kept, n))
        weights.append(batch / kept)
        offset += batch * n
    rows = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)  # (n_branches, R)
    kept_layout = TokenLayout(tuple(kept_shapes))
    if len(set(weights)) == 1:
        row_scale: Tensor | float = weights[0]
    else:
        row_scale = torch.cat(
            [torch.full((s * n, 1), w, device=device, dtype=dtype) for (s, n), w in zip(kept_shapes, weights)]
        )
    return [BranchDrop(rows=r, kept_layout=kept_layout, row_scale=row_scale) for r in rows.unbind(0)]


def draw_branch_drops(
    layout: TokenLayout, rates: Sequence[float], device: torch.device, dtype: torch.dtype
) -> list[BranchDrop | None]:
    """One :class:`BranchDrop` per branch rate (None for rate 0): the per-token form up to
    ``SUBSET_DROP_THRESHOLD``, the kept-samples form above it; branches of equal rate are drawn together."""
    drops: list[BranchDrop | None] = [None] * len(rates)
    for rate in sorted(set(rates)):
        if rate == 0.0:
            continue
        branches = [i for i, r in enumerate(rates) if r == rate]
        draw = _kept_rows if rate > SUBSET_DROP_THRESHOLD else _token_scales
        for i, drop in zip(branches, draw(layout, len(branches), rate, device, dtype)):
            drops[i] = drop
    return drops


def add_residual(
    x: Tensor,
    layout: TokenLayout,
    branch: Callable[[Tensor, TokenLayout], Tensor],
    gamma: Tensor | None = None,
    drop: BranchDrop | None = None,
) -> Tensor:
    """``x + drop(γ ⊙ branch(x))`` on packed ``(T, D)`` tokens (γ: the LayerScale, None for none).

    Without a draw one ``addcmul`` (or add); with a per-token scale the scaled branch goes in through one
    ``addcmul``; with kept rows the branch runs on those rows only and is added back with ``index_add``.
    """
    if drop is None:
        out = branch(x, layout)
        return x + out if gamma is None else torch.addcmul(x, out, gamma)
    if drop.rows is None:
        out = branch(x, layout)
        return torch.addcmul(x, out if gamma is None else out * gamma, drop.token_scale)
    residual = branch(x.index_select(0, drop.rows), drop.kept_layout).to(x.dtype)
    if gamma is not None:
        residual = residual * gamma.to(x.dtype)
    if isinstance(drop.row_scale, Tensor):
        return x.index_add(0, drop.rows, residual * drop.row_scale)
    return x.index_add(0, drop.rows, residual, alpha=drop.row_scale)
