"""Multi-head self-attention for one batch of token sequences or several crop batches packed together.

Tokens travel through the blocks *packed*: crop batches of shapes ``(B_i, N_i, D)`` are stored row-wise in one
``(T, D)`` tensor, ``T = Σ_i B_i·N_i`` (a :class:`TokenLayout` records the shapes). Every per-token layer (norms,
``qkv``, ``proj``, MLP) then runs once over all crops, and attention is block diagonal: each sample attends only to
its own ``N_i`` tokens, no padding to a common length.

Attention itself, ``softmax(q kᵀ / √d_head) v`` per head, has three interchangeable backends:

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, one call per run of consecutive crops with the
  same token count (CPU and GPU);
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` over the whole packed sequence with a
  ``BlockDiagonalMask`` (CUDA tensors only);
* ``"math"``: the explicit softmax product, per crop run (reference path for tests).

The default ``"auto"`` picks xFormers for CUDA tensors when it is importable, ``XFORMERS_DISABLED`` is unset and a
one-time tiny kernel call on that device succeeds (an xFormers wheel built for another torch imports fine and
fails at its first kernel with "No operator found"); otherwise SDPA, with one warning saying why. The environment variable ``FRANCA_ATTENTION`` (``auto|sdpa|xformers|math``) sets the default of every
module built without an explicit ``backend``; it is read at call time.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "math")


@functools.cache
def _import_xformers_ops():
    try:
        import xformers.ops as xops
    except ModuleNotFoundError:
        return None
    except Exception as error:  # a build for another torch / CUDA can fail to load its extension
        warnings.warn(f"xformers is installed but does not import ({error}); attention uses SDPA", stacklevel=2)
        return None
    return xops


def xformers_available() -> bool:
    """True when ``xformers.ops`` imports and the ``XFORMERS_DISABLED`` environment variable is not set."""
    return os.environ.get("XFORMERS_DISABLED") is None and _import_xformers_ops() is not None


@functools.cache
def xformers_failure(device: torch.device) -> str | None:
    """Why xFormers cannot run on ``device`` (None when it can): unavailable, or a tiny block-diagonal
    ``memory_efficient_attention`` call there (fp16, two sequences of 2 tokens) raises. Run once per device."""
    if os.environ.get("XFORMERS_DISABLED") is not None:
        return "XFORMERS_DISABLED is set"
    xops = _import_xformers_ops()
    if xops is None:
        return "the xformers package is not installed"
    try:
        q = torch.zeros(1, 4, 1, 8, device=device, dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q, attn_bias=_block_diagonal_mask(((2, 2),), device))
        torch.cuda.synchronize(device)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"xformers {getattr(xops, '__version__', '')} fails on {device} with torch {torch.__version__}: {first_line}"
    return None


@functools.cache
def _warn_sdpa_fallback(device: torch.device, reason: str) -> None:
    warnings.warn(f"attention backend 'auto' uses SDPA on {device}: {reason}", stacklevel=3)


def resolve_attention_backend(requested: str | None, device: torch.device) -> str:
    """Concrete backend (``sdpa``, ``xformers`` or ``math``) for tensors on ``device``.

    ``requested`` None means the ``FRANCA_ATTENTION`` environment variable, or ``auto`` when unset.
    """
    name = (requested or os.environ.get("FRANCA_ATTENTION") or "auto").lower()
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        if device.type != "cuda" or not xformers_available():
            return "sdpa"
        reason = xformers_failure(device)
        if reason is not None:
            _warn_sdpa_fallback(device, reason)
            return "sdpa"
        return "xformers"
    if name == "xformers":
        if not xformers_available():
            raise RuntimeError("attention backend 'xformers' needs the xformers package and XFORMERS_DISABLED unset")
        if device.type != "cuda":
            raise ValueError(f"attention backend 'xformers' needs CUDA tensors, got {device.type}; use 'sdpa'")
        reason = xformers_failure(device)
        if reason is not None:
            raise RuntimeError(f"attention backend 'xformers': {reason}; use 'sdpa' or 'auto'")
    return name


@dataclass(frozen=True)
class TokenLayout:
    """Shapes ``(B_i, N_i)`` of the crop batches packed row-wise, in order, into one ``(Σ B_i·N_i, D)`` tensor."""

    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> TokenLayout:
        """Layout of a list of ``(B_i, N_i, D)`` tensors."""
        if len(tensors) == 0:
            raise ValueError("expected at least one tensor of tokens, got an empty list")
        return cls(tuple((int(t.shape[0]), int(t.shape[1])) for t in tensors))

    @property
    def num_tokens(self) -> int:
        return sum(b * n for b, n in self.shapes)

    def pack(self, tensors: Sequence[Tensor]) -> Tensor:
        """``(B_i, N_i, D)`` tensors → one ``(T, D)`` tensor (a view when there is a single crop batch)."""
        flat = [t.reshape(-1, t.shape[-1]) for t in tensors]
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=0)

    def unpack(self, x: Tensor) -> list[Tensor]:
        """``(T, ...)`` → list of ``(B_i, N_i, ...)`` views."""
        parts = x.split([b * n for b, n in self.shapes], dim=0)
        return [p.view(b, n, *x.shape[1:]) for p, (b, n) in zip(parts, self.shapes)]

    @property
    def runs(self) -> tuple[tuple[int, int, int, int], ...]:
        """Maximal runs of consecutive crops with equal token count: ``(first_row, stop_row, samples, N)``.

        Recomputed at each access (a few integers): ``functools.cached_property`` takes an ``RLock`` on
        Python < 3.12, which Dynamo cannot trace, a graph break in every compiled block (``train.compile``)."""
        runs: list[list[int]] = []
        row = 0
        for b, n in self.shapes:
            if runs and runs[-1][3] == n:
                runs[-1][1] += b * n
                runs[-1][2] += b
            else:
                runs.append([row, row + b * n, b, n])
            row += b * n
        return tuple(tuple(r) for r in runs)


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(shapes: tuple[tuple[int, int], ...], device: torch.device):
    """xFormers' mask of one sequence per sample, its sequence starts built on ``device`` (cached per device:
    a mask built for one GPU is not reused on another)."""
    seqlens = [n for b, n in shapes for _ in range(b)]
    from_seqlens = _import_xformers_ops().fmha.BlockDiagonalMask.from_seqlens
    if "device" in inspect.signature(from_seqlens).parameters:
        return from_seqlens(seqlens, device=device)
    return from_seqlens(seqlens)  # older xformers: it moves the starts to the device at each call


def _per_run(qkv: Tensor, layout: TokenLayout, num_heads: int, attend) -> Tensor:
    """Apply ``attend(q, k, v)`` on ``(S, H, N, d)`` tensors for each run of equal-length crops; return ``(T, D)``.

    The runs are one ``split`` of the rows (backward: one concatenation, not a zero-filled buffer per run),
    and q, k, v are unbound from the ``(S, N, 3, H, d)`` view, so that their gradients stack straight back
    into the ``(T, 3D)`` layout of the projection."""
    dim = qkv.shape[-1] // 3
    runs = layout.runs
    parts = (qkv,) if len(runs) == 1 else qkv.split([stop - start for start, stop, _, _ in runs], dim=0)
    outputs = []
    for part, (_, _, samples, n) in zip(parts, runs):
        q, k, v = part.view(samples, n, 3, num_heads, dim // num_heads).unbind(2)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (S, H, N, d)
        outputs.append(out.transpose(1, 2).reshape(samples * n, dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def _math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return weights.softmax(dim=-1) @ v


def _xformers_attention(qkv: Tensor, layout: TokenLayout, num_heads: int) -> Tensor:
    xops = _import_xformers_ops()
    dim = qkv.shape[-1] // 3
    if len(layout.runs) == 1:
        _, _, samples, n = layout.runs[0]
        q, k, v = qkv.view(samples, n, 3, num_heads, dim // num_heads).unbind(2)
        return xops.memory_efficient_attention(q, k, v).reshape(samples * n, dim)
    q, k, v = qkv.view(1, -1, 3, num_heads, dim // num_heads).unbind(2)
    out = xops.memory_efficient_attention(q, k, v, attn_bias=_block_diagonal_mask(layout.shapes, qkv.device))
    return out.reshape(-1, dim)


def packed_attention(qkv: Tensor, layout: TokenLayout, num_heads: int, backend: str) -> Tensor:
    """Block-diagonal multi-head attention of packed ``(T, 3D)`` projections ``[q | k | v]``; returns ``(T, D)``."""
    if backend == "xformers":
        return _xformers_attention(qkv, layout, num_heads)
    if backend == "math":
        return _per_run(qkv, layout, num_heads, _math_attention)
    return _per_run(qkv, layout, num_heads, F.scaled_dot_product_attention)


class Attention(nn.Module):
    """Multi-head self-attention: ``proj(concat_h softmax(q_h k_hᵀ/√d) v_h)`` with ``[q|k|v] = qkv(x)``.

    ``forward`` takes ``(B, N, D)`` tokens, or packed ``(T, D)`` tokens with their :class:`TokenLayout`.
    ``backend`` is one of ``auto`` (default), ``sdpa``, ``xformers``, ``math``; None defers to ``FRANCA_ATTENTION``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        if backend is not None and backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(ATTENTION_BACKENDS)}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, layout: TokenLayout | None = None) -> Tensor:
        if layout is None:
            batch, n, dim = x.shape
            return self.forward(x.reshape(batch * n, dim), TokenLayout(((batch, n),))).view(batch, n, dim)
        backend = resolve_attention_backend(self.backend, x.device)
        return self.proj(packed_attention(self.qkv(x), layout, self.num_heads, backend))
