"""Timing helpers shared by the benchmark workloads (``scripts/benchmark.py``).

Every workload returns rows ``{"workload", "seconds", "img_per_s", "gflops", "peak_mem_mb", ...}``;
``gflops`` is the achieved GFLOP/s computed from an analytic FLOP count divided by the median time.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device: str | None = None) -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; return the wall-clock seconds of each run."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory_mb(device: str | torch.device = "cpu") -> float:
    """Peak resident memory of this process (CPU, MiB) or peak allocated CUDA memory (MiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu", repeats: int = 5) -> float:
    """Measured dense matmul throughput (GFLOP/s) of an ``n×n @ n×n`` product: the machine's ceiling."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    seconds = median(time_fn(lambda: a @ b, warmup=2, repeats=repeats, device=device))
    return 2 * n**3 / seconds / 1e9
