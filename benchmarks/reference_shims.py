"""Run-time shims that let the official Franca code run on a CPU inside a benchmark worker.

Nothing in the official checkout is edited: these only add modules to ``sys.modules`` or patch
functions in the worker process that imports the official code.

* :func:`bare_package` registers a package without running its ``__init__`` (the official
  ``franca.data`` and ``franca.train`` packages import torchdata and the whole trainer);
* :func:`install_xformers_stand_in` provides the few ``xformers.ops`` names the official blocks and
  step use, computed with torch's SDPA (so the official backbone gets the same fused attention as
  ours: the comparison measures everything else). ``cross_entropy`` and ``SwiGLU`` are left out, so
  the official code takes its own pure-torch fallbacks;
* :func:`run_cuda_calls_on_cpu` makes ``Tensor.cuda`` the identity and lets ``dist.all_reduce`` be
  the identity when no process group exists (one process: the sum over one rank).

This file is loaded by path (the official package is also called ``franca``), so it imports only
torch and the standard library.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


def bare_package(name: str, directory: Path) -> None:
    """Register package ``name`` at ``directory`` without executing its ``__init__.py``."""
    module = types.ModuleType(name)
    module.__path__ = [str(directory)]
    sys.modules[name] = module


class BlockDiagonalMask:
    """Stand-in for ``xformers.ops.fmha.BlockDiagonalMask``: sequences of ``seqlens`` packed along dim 1."""

    def __init__(self, seqlens: list[int], batch_sizes: list[int] | None = None) -> None:
        self.seqlens = list(seqlens)
        self._batch_sizes = batch_sizes

    @classmethod
    def from_seqlens(cls, seqlens: list[int]) -> BlockDiagonalMask:
        return cls(seqlens)

    @classmethod
    def from_tensor_list(cls, tensors: list[torch.Tensor]) -> tuple[BlockDiagonalMask, torch.Tensor]:
        batch_sizes = [t.shape[0] for t in tensors]
        seqlens = [t.shape[1] for t in tensors for _ in range(t.shape[0])]
        packed = torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)
        return cls(seqlens, batch_sizes), packed

    def runs(self) -> list[tuple[int, int]]:
        """Consecutive equal-length sequences as ``(count, length)`` runs."""
        runs: list[tuple[int, int]] = []
        for n in self.seqlens:
            if runs and runs[-1][1] == n:
                runs[-1] = (runs[-1][0] + 1, n)
            else:
                runs.append((1, n))
        return runs

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Undo the packing: ``(1, Σ b_i·n_i, …)`` → ``[(b_i, n_i, …)]``."""
        batch_sizes = self._batch_sizes or [1] * len(self.seqlens)
        parts, start, index = [], 0, 0
        for b in batch_sizes:
            n = self.seqlens[index]
            parts.append(tensor[:, start : start + b * n].reshape(b, n, *tensor.shape[2:]))
            start, index = start + b * n, index + b
        return parts


def _memory_efficient_attention(q, k, v, attn_bias=None):
    """softmax(q kᵀ / √d) v for ``(B, N, H, D)`` inputs; block-diagonal bias → one SDPA per equal-length run."""
    if attn_bias is None:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    outputs, start = [], 0
    for count, length in attn_bias.runs():
        stop = start + count * length

        def run(t, start=start, stop=stop, count=count, length=length):
            return t[:, start:stop].reshape(count, length, *t.shape[2:]).transpose(1, 2)

        out = F.scaled_dot_product_attention(run(q), run(k), run(v)).transpose(1, 2)
        outputs.append(out.reshape(1, count * length, *out.shape[2:]))
        start = stop
    return torch.cat(outputs, dim=1)


def _index_select_cat(sources: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s[i].flatten() for s, i in zip(sources, indices)])


def _scaled_index_add(x, index, source, scaling=None, alpha=1.0):
    source = source if scaling is None else source * scaling
    return torch.index_add(x, 0, index, source, alpha=alpha)


def install_xformers_stand_in() -> None:
    """Register ``xformers``, ``xformers.ops`` and ``xformers.ops.fmha`` built on torch SDPA."""
    root = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.BlockDiagonalMask = BlockDiagonalMask
    ops.fmha = fmha
    ops.memory_efficient_attention = _memory_efficient_attention
    ops.unbind = torch.unbind
    ops.index_select_cat = _index_select_cat
    ops.scaled_index_add = _scaled_index_add
    root.ops = ops
    sys.modules.update({"xformers": root, "xformers.ops": ops, "xformers.ops.fmha": fmha})


def run_cuda_calls_on_cpu() -> None:
    """``tensor.cuda()`` returns the tensor; ``dist.all_reduce`` without a process group is the identity."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    all_reduce = dist.all_reduce

    def all_reduce_single_process(tensor, *args, **kwargs):
        return all_reduce(tensor, *args, **kwargs) if dist.is_initialized() else None

    dist.all_reduce = all_reduce_single_process
