"""Cost of the collectives of one training step with two gloo ranks on CPU (FSDP2 + all-reduced targets).

Workload: the ``train/cpu_tiny`` model (ViT-pico, Matryoshka heads, Sinkhorn-Knopp targets, iBOT, KoLeo)
on synthetic crops through the real collate; one step = ``forward_backward`` → clip → AdamW → EMA.

* ``1 process, batch B``: the per-rank computation with no collective at all;
* ``2 gloo ranks (FSDP), batch B each``: the same per-rank computation plus the FSDP all-gathers /
  reduce-scatters and the Sinkhorn-Knopp all-reduces; ``collective_overhead_s`` is its median step time
  minus the single-process one;
* the two-rank row also reports, for one step, the blocking ``all_reduce`` calls (the Sinkhorn-Knopp row /
  column sums and masked-patch count) — count and seconds spent in them — and the number and bytes
  (full tensors) of the FSDP ``all_gather_single`` / ``reduce_scatter_single`` calls.

Every process computes with one thread.

The two ranks share this machine's cores, so on a small CPU the overhead also contains their competition
for cores. GPU figures (NCCL, one-GPU FSDP vs no FSDP, ViT-L peak memory) need a GPU; none is measured here.

    python -m benchmarks.distributed [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import median, peak_memory_mb
from franca.data.synthetic import random_collated_batch
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config import load_config_file

CONFIG = "train/cpu_tiny"
# FSDP2 calls all_gather_single / reduce_scatter_single (full tensor = the larger of output and input)
_COLLECTIVES = ("all_reduce", "all_gather_single", "reduce_scatter_single")


def _cfg(batch: int):
    return load_config_file(CONFIG, [f"train.batch_size_per_gpu={batch}", "crops.global_crops_size=32"])


def _batch(cfg, seed: int) -> dict:
    return random_collated_batch(cfg, seed)


def _step_fn(cfg, seed: int):
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.train()
    model.prepare_for_distributed_training()
    optimizer = torch.optim.AdamW(model.get_params_groups(), lr=1e-4)
    batch = _batch(cfg, seed)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=0.07)
        for part in model.student.values():
            torch.nn.utils.clip_grad_norm_(part.parameters(), 3.0)
        optimizer.step()
        model.update_teacher(0.99)

    return step


class _CollectiveLog:
    """Wrap ``torch.distributed`` collectives: per name, calls, bytes and seconds inside the call."""

    def __init__(self) -> None:
        self.stats = {name: {"calls": 0, "bytes": 0, "seconds": 0.0} for name in _COLLECTIVES}
        self._originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def __enter__(self) -> _CollectiveLog:
        for name, original in self._originals.items():
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _wrap(self, name, original):
        @functools.wraps(original)
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            entry = self.stats[name]
            entry["seconds"] += time.perf_counter() - start
            entry["calls"] += 1
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            entry["bytes"] += max(t.numel() * t.element_size() for t in tensors)
            return result

        return call


def _rank_worker(rank: int, world_size: int, port: int, batch: int, repeats: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        step = _step_fn(_cfg(batch), seed=rank)
        step()  # warm-up (lazy FSDP init)
        with _CollectiveLog() as log:
            step()
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        slowest = torch.tensor(times)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            record = {"times": slowest.tolist(), "collectives": log.stats, "peak_mem_mb": peak_memory_mb()}
            Path(out).write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_ranks(batch: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        mp.start_processes(
            _rank_worker, args=(2, _free_port(), batch, repeats, str(out)), nprocs=2, start_method="spawn"
        )
        return json.loads(out.read_text())


def _one_process(batch: int, repeats: int) -> list[float]:
    """Step times with one thread, like each of the two ranks (on a shared small CPU more threads thrash)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step = _step_fn(_cfg(batch), seed=0)
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(threads)


def run(quick: bool = False) -> list[dict]:
    batch, repeats = (4, 3) if quick else (16, 8)
    single = median(_one_process(batch, repeats))
    two = _two_ranks(batch, repeats)
    step = median(two["times"])
    sk = two["collectives"]["all_reduce"]
    gathers, scatters = two["collectives"]["all_gather_single"], two["collectives"]["reduce_scatter_single"]
    common = {"gflops": None, "per_rank_batch": batch}
    return [
        {
            "workload": f"cpu_tiny step, 1 process, batch {batch} (no collectives)",
            "seconds": single,
            "img_per_s": batch / single,
            "peak_mem_mb": peak_memory_mb(),
            **common,
        },
        {
            "workload": f"cpu_tiny step, 2 gloo ranks FSDP SHARD_GRAD_OP, batch {batch} each",
            "seconds": step,
            "img_per_s": 2 * batch / step,
            "peak_mem_mb": two["peak_mem_mb"],
            "collective_overhead_s": step - single,
            "sk_all_reduce_calls": sk["calls"],
            "sk_all_reduce_s": sk["seconds"],
            "fsdp_all_gather_calls": gathers["calls"],
            "fsdp_all_gather_mb": gathers["bytes"] / 2**20,
            "fsdp_reduce_scatter_calls": scatters["calls"],
            "fsdp_reduce_scatter_mb": scatters["bytes"] / 2**20,
            **common,
        },
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(quick=parser.parse_args().quick):
        print(json.dumps(row))
