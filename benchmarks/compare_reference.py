"""Side-by-side timing of our modules against a checkout of the official Franca code.

For each workload two worker processes are started (:mod:`benchmarks.reference_worker`):
one imports this repository's ``franca``, the other the official checkout's (never vendored, never
edited; CPU shims are applied inside its worker). Our worker builds the weights and inputs and
shares them through a temporary folder, so both sides compute on the same tensors. After one
untimed warm-up each, the two are timed alternately, one run at a time (the order flipped every
round: A B, B A, …), so load from other processes on a shared machine hits both alike, and only
one side computes at any moment. Both pin torch to the same number of threads.

Reported per workload: the medians of each side, ``ratio`` = median(ours) / median(official),
``paired_ratio`` = the median over rounds of ours / official within the round, ``best_ratio`` = the
fastest run of ours / the fastest of official (load from other processes only ever adds time, so on
a busy machine the minima are the least disturbed estimate), images/s, achieved
GFLOP/s (analytic FLOPs / median time, where counted) with its share of the fp32 matmul
throughput measured in our worker after every round (``matmul_gflops``: the ceiling under the same
load), and each worker's peak resident memory (``VmHWM``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "reference_worker.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_FILE = Path("franca") / "train" / "ssl_meta_arch.py"


def _print_now(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Workload:
    """One comparison: what a call processes and the target ratio ours / official (None: no target)."""

    name: str
    description: str
    images: int
    target: float | None
    threads: int | None = None  # None: the common thread count
    min_pct_of_matmul: float | None = None  # second target: achieved GFLOP/s as a share of the ceiling


def workloads(quick: bool) -> list[Workload]:
    from benchmarks import reference_worker as w

    aug_images = w.AUGMENT_IMAGES[quick]
    batch = w.STEP_BATCH[quick]
    k = w.HEAD["prototypes"][quick]
    return [
        Workload("augment", f"multi-crop augmentation 2×224 + 8×98, {aug_images} JPEGs, 1 thread", aug_images, 0.5, 1),
        Workload(
            "augment_collate",
            f"augmentation + collate with CyclicMask, {aug_images} JPEGs, 1 thread",
            aug_images,
            0.5,
            1,
        ),
        Workload("backbone_single", "ViT-S/14 fwd+bwd, 224 px, batch 8", 8, 0.95, min_pct_of_matmul=85.0),
        Workload("backbone_multicrop", "ViT-S/14 fwd+bwd, 4 images × (2×224 + 8×98)", 4, 0.95, min_pct_of_matmul=85.0),
        Workload("mrl_head", f"MRL head fwd+bwd, in 384, K {k}, {w.HEAD['rows']} rows", w.HEAD["rows"], 0.6),
        Workload("sinkhorn", f"Sinkhorn-Knopp, 5 levels, K {k}, {2 * w.HEAD['rows']} rows", 2 * w.HEAD["rows"], 0.7),
        Workload(
            "train_step",
            f"SSLMetaArch.forward_backward, ViT-S/14, batch {batch}, K {w.STEP_PROTOTYPES[quick]}",
            batch,
            None,
        ),
    ]


def check_reference_dir(reference: str | os.PathLike) -> Path:
    """The official checkout as an absolute path; FileNotFoundError naming what is missing otherwise."""
    path = Path(reference).expanduser().resolve()
    if not (path / REQUIRED_FILE).is_file():
        raise FileNotFoundError(
            f"--compare-reference: {reference} is not a checkout of the official Franca code "
            f"(no {REQUIRED_FILE}); clone https://github.com/valeoai/Franca and pass its folder"
        )
    return path


def workload_flops(name: str, quick: bool) -> float | None:
    """Analytic FLOPs of one call (2 per multiply-add; backward = 2× forward), or None where not counted."""
    from benchmarks import reference_worker as w
    from benchmarks.backbone import vit_forward_flops
    from franca.models.vision_transformer import vit_small

    model = vit_small(**w.VITS_KWARGS)
    if name == "backbone_single":
        return 3 * 8 * vit_forward_flops(model, w.GLOBAL_SIZE)
    if name == "backbone_multicrop":
        return (
            3 * 4 * (2 * vit_forward_flops(model, w.GLOBAL_SIZE) + w.N_LOCAL * vit_forward_flops(model, w.LOCAL_SIZE))
        )
    if name == "mrl_head":
        from benchmarks.step import mrl_head_macs_per_row

        d = w.HEAD["in_dim"]
        macs = mrl_head_macs_per_row(d, w.HEAD["prototypes"][quick], 3, w.HEAD["hidden_dim"], w.HEAD["bottleneck_dim"])
        return 3 * 2 * w.HEAD["rows"] * macs
    return None


class _Worker:
    """A running worker process and its line protocol."""

    def __init__(self, side: str, workload: Workload, shared: Path, threads: int, quick: bool, root: Path) -> None:
        self.side = side
        self.log = open(shared / f"{side}.log", "w+")  # noqa: SIM115 (closed in close())
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
        env.pop("XFORMERS_DISABLED", None)
        command = [sys.executable, str(WORKER), "--side", side, "--workload", workload.name]
        command += ["--shared", str(shared), "--threads", str(threads)] + (["--quick"] if quick else [])
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=shared, env=env
        )
        self.ready = self._receive()

    def _receive(self) -> dict:
        line = self.process.stdout.readline()
        message = json.loads(line) if line.strip() else {"error": "worker exited without answering"}
        if "error" in message:
            self.process.kill()
            self.log.seek(0)
            tail = "\n".join(self.log.read().strip().splitlines()[-15:])
            raise RuntimeError(f"{self.side} worker failed: {message['error'].strip()}\n--- worker log ---\n{tail}")
        return message

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._receive()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def compare_workload(
    workload: Workload,
    reference: Path,
    repeats: int,
    threads: int,
    quick: bool,
    flops: float | None = None,
    profile: bool = False,
) -> dict:
    """Time one workload on both sides, interleaved; returns its row (with ``profile``: each side's top operators)."""
    threads = workload.threads or threads
    with tempfile.TemporaryDirectory(prefix=f"franca_compare_{workload.name}_") as tmp:
        shared = Path(tmp)
        if workload.name.startswith("augment"):
            from benchmarks.augment import synthetic_jpeg

            (shared / "image.jpg").write_bytes(synthetic_jpeg())
        workers: dict[str, _Worker] = {}
        try:
            workers["ours"] = _Worker("ours", workload, shared, threads, quick, REPO_ROOT)
            workers["official"] = _Worker("official", workload, shared, threads, quick, reference)
            times: dict[str, list[float]] = {"ours": [], "official": []}
            ceiling = []
            for round_index in range(repeats):
                order = ("ours", "official") if round_index % 2 == 0 else ("official", "ours")
                for side in order:
                    times[side].append(workers[side].ask("run")["seconds"])
                if flops:
                    ceiling.append(workers["ours"].ask("matmul")["gflops"])
            tables = {side: worker.ask("profile")["table"] for side, worker in workers.items()} if profile else {}
            memory = {side: worker.ask("finish")["peak_mem_mb"] for side, worker in workers.items()}
        finally:
            for worker in workers.values():
                worker.close()
    ours, official = statistics.median(times["ours"]), statistics.median(times["official"])
    row = {
        "workload": f"compare/{workload.name}",
        "description": workload.description,
        "seconds": ours,
        "official_seconds": official,
        "ratio": ours / official,
        "paired_ratio": statistics.median([a / b for a, b in zip(times["ours"], times["official"])]),
        "best_ratio": min(times["ours"]) / min(times["official"]),
        "target": workload.target,
        "meets_target": None if workload.target is None else ours / official <= workload.target,
        "min_pct_of_matmul": workload.min_pct_of_matmul,
        "img_per_s": workload.images / ours,
        "official_img_per_s": workload.images / official,
        "gflops": flops / ours / 1e9 if flops else None,
        "official_gflops": flops / official / 1e9 if flops else None,
        "matmul_gflops": statistics.median(ceiling) if ceiling else None,
        "pct_of_matmul": 100 * flops / ours / 1e9 / statistics.median(ceiling) if ceiling else None,
        "official_pct_of_matmul": 100 * flops / official / 1e9 / statistics.median(ceiling) if ceiling else None,
        "peak_mem_mb": memory["ours"],
        "official_peak_mem_mb": memory["official"],
        "threads": threads,
        "repeats": repeats,
        "times": times,
    }
    if profile:
        row["profile"] = tables
    if workload.min_pct_of_matmul is not None and row["pct_of_matmul"] is not None:
        row["meets_target"] = row["meets_target"] and row["pct_of_matmul"] >= workload.min_pct_of_matmul
    return row


def compare(
    reference: str | os.PathLike,
    only: list[str] | None = None,
    repeats: int = 7,
    threads: int | None = None,
    quick: bool = False,
    profile: bool = False,
    log: Callable[[str], None] = _print_now,
) -> list[dict]:
    """Rows ours vs official for every workload (or those named in ``only``); ``threads`` defaults to the usable cores."""
    root = check_reference_dir(reference)
    threads = threads or len(os.sched_getaffinity(0))
    selected = workloads(quick)
    known = [w.name for w in selected]
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise KeyError(f"--compare-reference: unknown workload(s) {unknown}; choose from {known}")
    rows = []
    for workload in selected:
        if only and workload.name not in only:
            continue
        log(f"compare {workload.name}: {workload.description} ({repeats} interleaved rounds)")
        try:
            flops = workload_flops(workload.name, quick)
            row = compare_workload(workload, root, repeats, threads, quick, flops, profile)
        except RuntimeError as error:
            log(f"  {error}")
            row = {"workload": f"compare/{workload.name}", "description": workload.description, "error": str(error)}
        else:
            log(f"  ours {row['seconds']:.4f} s, official {row['official_seconds']:.4f} s, ratio {row['ratio']:.3f}")
            for side, table in row.get("profile", {}).items():
                log(f"  top operators, {side}:\n{table}")
        rows.append(row)
    return rows
