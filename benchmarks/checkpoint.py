"""Training-checkpoint save / load with 2 gloo ranks on CPU: the full-state file vs DCP (sharded).

Workload: ``SSLMetaArch`` of ``train/IN21K/vitl14`` (ViT-L/14 student and teacher, SwiGLU, Matryoshka DINO
and iBOT heads; the heads shrunk to 4 096 prototypes so that the full-state gather fits the host memory of a
small machine), FSDP2-sharded over 2 gloo ranks, with AdamW moments for every student parameter (initialised,
no step needed). ``--quick``: ViT-S/14, 4 096 prototypes.

* ``full``: ``Checkpointer`` + ``ModelCheckpointState`` / ``OptimizerCheckpointState`` — the full state
  gathered to rank 0, written by rank 0 alone (``model_<it>.pth``); load = every rank reads the file
  (memory-mapped) and keeps its shard;
* ``dcp``: ``ShardedCheckpointer`` — each rank writes its shards (``model_<it>.dcp/``); load = each
  rank reads the shards it needs; ``dcp async``: the part of ``save`` that blocks training (host copy)
  and the time until the checkpoint is published;
* the cost of the preemption check with several ranks (one 1-element all-reduce of the stop flag).

Every phase runs in fresh processes, so a row's peak memory (resident set high-water mark minus the
resident set before the phase, per rank) is that phase's alone. Both ranks share this machine's disk.

    python -m benchmarks.checkpoint [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from franca import fsdp
from franca.train.checkpointing import Checkpointer
from franca.train.preemption import PreemptionHandler
from franca.train.sharded_checkpoint import ShardedCheckpointer
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import build_optimizer
from franca.utils.config import load_config_file

WORLD_SIZE = 2


def _cfg(quick: bool):
    heads = ["dino.head_n_prototypes=4096", "ibot.head_n_prototypes=4096"]
    return load_config_file("train/IN21K/vitl14", heads + (["student.arch=vit_small"] if quick else []))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(cfg):
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.prepare_for_distributed_training()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    get_optimizer_state_dict(model, optimizer)  # creates the AdamW moments (a zero-gradient step at lr 0)
    return model, optimizer


def _checkpointer(kind: str, directory: Path, model, optimizer):
    if kind == "full":
        return Checkpointer(
            directory,
            model=fsdp.ModelCheckpointState(model),
            optimizer=fsdp.OptimizerCheckpointState(model, optimizer),
        )
    return ShardedCheckpointer(directory, model, optimizer, async_save=kind == "dcp async")


def _worker(rank: int, world_size: int, port: int, quick: bool, kind: str, phase: str, directory: str, out: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(hours=1))
    try:
        model, optimizer = _build(_cfg(quick))
        checkpointer = _checkpointer(kind, Path(directory), model, optimizer)
        dist.barrier()
        before = _rss_mb()
        start = time.perf_counter()
        record: dict = {}
        if phase == "save":
            checkpointer.save(0)
            record["blocking_s"] = time.perf_counter() - start
            checkpointer.wait()
        else:
            checkpointer.resume()
        dist.barrier()
        record.update(seconds=time.perf_counter() - start, peak_above_mb=_peak_mb() - before, rss_before_mb=before)
        if rank == 0:
            record["parameters"] = sum(p.numel() for p in model.parameters())
        Path(out, f"{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _stop_flag_worker(rank: int, world_size: int, port: int, calls: int, out: str) -> None:
    """Seconds per ``PreemptionHandler.should_stop`` with several ranks: one 1-element all-reduce (gloo)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        stopper = PreemptionHandler(period=1)
        stopper.should_stop(0)
        start = time.perf_counter()
        for iteration in range(calls):
            stopper.should_stop(iteration)
        Path(out, f"{rank}.json").write_text(json.dumps((time.perf_counter() - start) / calls))
    finally:
        dist.destroy_process_group()


def _stop_flag_seconds(calls: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        args = (WORLD_SIZE, _free_port(), calls, out)
        mp.start_processes(_stop_flag_worker, args=args, nprocs=WORLD_SIZE, start_method="spawn")
        return max(json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(WORLD_SIZE))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _phase(quick: bool, kind: str, phase: str, directory: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        args = (WORLD_SIZE, _free_port(), quick, kind, phase, str(directory), out)
        mp.start_processes(_worker, args=args, nprocs=WORLD_SIZE, start_method="spawn")
        return [json.loads(Path(out, f"{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def run(quick: bool = False) -> list[dict]:
    rows = []
    for kind in ("full", "dcp", "dcp async"):
        directory = Path(tempfile.mkdtemp(prefix="franca-ckpt-bench-"))
        try:
            saved = _phase(quick, kind, "save", directory)
            (checkpoint,) = [p for p in directory.iterdir() if p.name.startswith("model_")]
            size = _size_mb(checkpoint)
            loaded = _phase(quick, kind, "load", directory) if kind != "dcp async" else None
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        arch = "ViT-S/14" if quick else "ViT-L/14"
        common = {"gflops": None, "parameters": saved[0]["parameters"], "checkpoint_mb": size}
        rows.append(
            {
                "workload": f"{arch} student+teacher+AdamW, 2 gloo ranks: save, {kind}",
                "seconds": max(r["seconds"] for r in saved),
                "blocking_s": max(r["blocking_s"] for r in saved),
                "peak_mem_mb": max(r["peak_above_mb"] for r in saved),
                "peak_above_mb_per_rank": [r["peak_above_mb"] for r in saved],
                **common,
            }
        )
        if loaded is not None:
            rows.append(
                {
                    "workload": f"{arch} student+teacher+AdamW, 2 gloo ranks: load, {kind}",
                    "seconds": max(r["seconds"] for r in loaded),
                    "peak_mem_mb": max(r["peak_above_mb"] for r in loaded),
                    "peak_above_mb_per_rank": [r["peak_above_mb"] for r in loaded],
                    **common,
                }
            )
    seconds = _stop_flag_seconds(200 if quick else 2000)
    rows.append({"workload": "stop-flag agreement (should_stop), 2 gloo ranks, per iteration", "seconds": seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(parser.parse_args().quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
