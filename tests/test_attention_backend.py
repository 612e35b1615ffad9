"""``attn_backend: auto`` on CUDA: xFormers only after a tiny kernel call on that device works, else SDPA with one
warning; the block-diagonal mask is built and cached per device.

No GPU or xFormers is needed: a stand-in ``xformers.ops`` records its calls, and the CUDA tensors of the probe
are fake ones (``FakeTensorMode`` works on a CPU-only torch build).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from franca.layers import attention

GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)


class _Mask:
    def __init__(self, seqlens, device):
        self.seqlens, self.device = seqlens, device

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
        return cls(list(q_seqlen), device)


def _xformers_stub(error: Exception | None):
    """An ``xformers.ops`` whose kernel raises ``error`` (or returns its query) and records the masks it gets."""
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None):
        calls.append(attn_bias)
        if error is not None:
            raise error
        return q

    stub = types.SimpleNamespace(
        __version__="0.0.0-stub",
        memory_efficient_attention=memory_efficient_attention,
        fmha=types.SimpleNamespace(BlockDiagonalMask=_Mask),
    )
    return stub, calls


@pytest.fixture
def stub_xformers(monkeypatch):
    """Install a stub built by ``_xformers_stub``; the per-device caches start empty and end empty."""
    monkeypatch.delenv("XFORMERS_DISABLED", raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    caches = (attention._import_xformers_ops, attention.xformers_failure, attention._warn_sdpa_fallback)
    caches += (attention._block_diagonal_mask,)

    def install(error: Exception | None):
        stub, calls = _xformers_stub(error)
        for cache in caches:
            cache.cache_clear()
        monkeypatch.setattr(attention, "_import_xformers_ops", lambda: stub)
        return calls

    yield install
    for cache in caches:
        cache.cache_clear()


def _resolve_twice(device: torch.device) -> tuple[list[str], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught, FakeTensorMode():
        warnings.simplefilter("always")
        backends = [attention.resolve_attention_backend("auto", device) for _ in range(2)]
    return backends, caught


def test_auto_uses_xformers_after_a_working_probe(stub_xformers):
    calls = stub_xformers(None)
    backends, caught = _resolve_twice(GPU0)
    assert backends == ["xformers", "xformers"] and not caught
    assert len(calls) == 1 and calls[0].seqlens == [2, 2] and calls[0].device == GPU0  # probed once


def test_auto_falls_back_to_sdpa_with_one_warning_when_the_kernel_fails(stub_xformers):
    error = NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n  query ...")
    calls = stub_xformers(error)
    backends, caught = _resolve_twice(GPU0)
    assert backends == ["sdpa", "sdpa"] and len(calls) == 1
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "uses SDPA on cuda:0" in message and "No operator found" in message and torch.__version__ in message
    with FakeTensorMode(), pytest.raises(RuntimeError, match="'xformers': xformers 0.0.0-stub fails on cuda:0"):
        attention.resolve_attention_backend("xformers", GPU0)


def test_cpu_tensors_never_probe(stub_xformers):
    calls = stub_xformers(None)
    assert attention.resolve_attention_backend("auto", torch.device("cpu")) == "sdpa" and not calls


def test_block_diagonal_mask_is_built_per_device(stub_xformers):
    stub_xformers(None)
    shapes = ((2, 5), (4, 3))
    first, second = attention._block_diagonal_mask(shapes, GPU0), attention._block_diagonal_mask(shapes, GPU1)
    assert first.seqlens == second.seqlens == [5, 5, 3, 3, 3, 3]
    assert (first.device, second.device) == (GPU0, GPU1)
    assert attention._block_diagonal_mask(shapes, GPU0) is first  # cached per (layout, device)
