"""Position-embedding resize written as two matrix products, so exported graphs keep it for any image size.

The backbone resizes its stored ``M×M`` position table with ``F.interpolate(mode="bicubic")`` given scale factors
``(rows + ε) / M`` (``interpolate_offset`` ε, or the output size when ε = 0). Traced graphs cannot keep that call
shape-polymorphic (the factors become constants and the size check a Python branch), so here the same resize is
``out = R_rows · T · R_colsᵀ`` per channel, with ``R`` an ``(n × M)`` matrix built from ``arange(n)`` by tensor ops:

* bicubic (``antialias=False``): source coordinate ``s_i = (i + ½)·M/(n + ε) − ½``, taps ``⌊s_i⌋ − 1 … ⌊s_i⌋ + 2``
  clamped to ``[0, M−1]``, Keys cubic weights with ``a = −0.75`` of ``t = s_i − ⌊s_i⌋`` (PyTorch's kernel);
* antialiased (``antialias=True``): with ``σ = M/(n + ε)`` and ``κ = 1/max(σ, 1)``, ``R[i, j] ∝ c_{−½}((j + ½ −
  σ(i + ½))·κ)``, rows normalised to sum 1 (PyTorch's separable anti-aliasing filter, ``a = −0.5``).

A grid equal to the stored one (``rows = cols = M``) uses the table unchanged, as the backbone does; that choice
is a ``where`` on tensors so it too stays in the graph. Every size is read as a 0-d tensor (``ones(n).sum()``),
which keeps it symbolic under both the TorchScript ONNX tracer and ``torch.export``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_BICUBIC_A = -0.75
_ANTIALIAS_A = -0.5


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys cubic convolution kernel ``c_a(x)`` (zero for ``|x| ≥ 2``)."""
    x = x.abs()
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, inner, torch.where(x < 2, outer, torch.zeros_like(x)))


def _bicubic_matrix(positions: Tensor, step: Tensor, grid: int) -> Tensor:
    """``(n, M)`` bicubic weights: output ``i`` reads source coordinate ``(i + ½)·step − ½`` (border taps clamped)."""
    source = (positions + 0.5) * step - 0.5
    base = source.floor().clamp(max=grid - 1)
    frac = (source - base).clamp(0, 1)
    offsets = torch.arange(-1, 3, dtype=positions.dtype)
    weights = _cubic(frac[:, None] - offsets, _BICUBIC_A)
    taps = (base[:, None] + offsets).clamp(0, grid - 1)
    columns = torch.arange(grid, dtype=positions.dtype)
    return (weights[:, :, None] * (taps[:, :, None] == columns).to(positions.dtype)).sum(dim=1)


def _antialias_matrix(positions: Tensor, step: Tensor, grid: int) -> Tensor:
    """``(n, M)`` anti-aliased bicubic weights (filter widened by ``max(step, 1)``, rows normalised)."""
    centers = (positions + 0.5) * step
    shrink = 1 / step.clamp(min=1)
    columns = torch.arange(grid, dtype=positions.dtype)
    weights = _cubic((columns + 0.5 - centers[:, None]) * shrink, _ANTIALIAS_A)
    return weights / weights.sum(dim=1, keepdim=True)


def _identity(size: int | Tensor, grid: int) -> Tensor:
    """``(n, M)`` matrix with ones on the diagonal (the identity when ``n = M``)."""
    return (torch.arange(size)[:, None] == torch.arange(grid)).float()


def resize_matrix(size: int | Tensor, grid: int, offset: float, antialias: bool) -> tuple[Tensor, Tensor]:
    """``(R, n)``: the ``(n × M)`` resize matrix for ``size`` = n outputs, and ``n == M`` as a 0-d bool tensor.

    The step ``M/(n + ε)`` is formed in float64 and rounded once, like PyTorch's kernel; the anti-aliased resize
    leaves an axis whose length does not change untouched (PyTorch skips it).
    """
    positions = torch.arange(size, dtype=torch.float32)
    count = torch.ones_like(positions, dtype=torch.float64).sum()
    step = (grid / (count + offset)).float()
    same = count == grid
    if not antialias:
        return _bicubic_matrix(positions, step, grid), same
    return torch.where(same, _identity(size, grid), _antialias_matrix(positions, step, grid)), same


def interpolate_pos_embed(
    pos_embed: Tensor, rows: int | Tensor, cols: int | Tensor, offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """``(1, 1 + M², D)`` class + patch position embedding → ``(1, 1 + rows·cols, D)`` for a ``rows × cols`` grid.

    Equals ``DinoVisionTransformer.interpolate_pos_encoding`` (float32), including the unchanged table when
    ``rows = cols = M``.
    """
    stored = pos_embed.shape[1] - 1
    grid = math.isqrt(stored)
    if grid * grid != stored:
        raise ValueError(f"cannot interpolate a position embedding of {stored} patches: not a square grid")
    dim = pos_embed.shape[-1]
    pos_embed = pos_embed.float()
    table = pos_embed[0, 1:].reshape(grid, grid, dim)
    row_matrix, same_rows = resize_matrix(rows, grid, offset, antialias)
    col_matrix, same_cols = resize_matrix(cols, grid, offset, antialias)
    unchanged = same_rows & same_cols
    row_matrix = torch.where(unchanged, _identity(rows, grid), row_matrix)
    col_matrix = torch.where(unchanged, _identity(cols, grid), col_matrix)
    # (n_r, M) @ (M, M·D) → (n_r, M, D); then contract the column axis: (n_r, D, M) @ (M, n_c) → (n_r, D, n_c).
    resized = (row_matrix @ table.reshape(grid, grid * dim)).reshape(-1, grid, dim)
    resized = (resized.transpose(1, 2) @ col_matrix.T).permute(0, 2, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], resized), dim=1)
