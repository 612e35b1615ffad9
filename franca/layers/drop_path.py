"""Stochastic depth (drop path): each sample's residual branch is dropped with probability ``p`` in training.

Two equivalent-in-expectation forms, as in DINOv2:

* :class:`DropPath`: compute the branch for every sample, multiply sample ``b``'s residual by ``m_b / (1 - p)``
  with ``m_b ~ Bernoulli(1 - p)``;
* :func:`add_residual_on_kept_samples`: compute the branch only on a random subset of
  ``max(int(B·(1 - p)), 1)`` samples per crop batch and add it scaled by ``B / subset`` (cheaper for large ``p``).

Both are the identity map on the residual outside training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from franca.layers.attention import TokenLayout


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


def add_residual_on_kept_samples(
    x: Tensor,
    layout: TokenLayout,
    branch: Callable[[Tensor, TokenLayout], Tensor],
    drop_prob: float,
) -> Tensor:
    """``x + branch(x)`` where the branch runs on a random subset of samples of each crop batch only.

    For a crop batch of ``B`` samples, ``S = max(int(B·(1-drop_prob)), 1)`` samples are drawn without replacement;
    their residual is added with weight ``B / S`` and the other samples pass through unchanged.
    ``x`` is packed ``(T, D)``; ``branch`` receives the packed kept tokens and their layout.
    """
    rows, kept_shapes, weights = [], [], []
    offset = 0
    for batch, n in layout.shapes:
        kept = max(int(batch * (1.0 - drop_prob)), 1)
        samples = torch.randperm(batch, device=x.device)[:kept]
        rows.append((offset + samples[:, None] * n + torch.arange(n, device=x.device)).reshape(-1))
        kept_shapes.append((kept, n))
        weights.append(batch / kept)
        offset += batch * n
    rows = torch.cat(rows)
    kept_layout = TokenLayout(tuple(kept_shapes))
    residual = branch(x.index_select(0, rows), kept_layout).to(x.dtype)
    if len(set(weights)) == 1:
        return x.index_add(0, rows, residual, alpha=weights[0])
    scale = _per_sample([residual.new_full((s,), w) for (s, _), w in zip(kept_shapes, weights)], kept_layout)
    return x.index_add(0, rows, residual * scale)
