"""Head and teacher-target workloads: Matryoshka head forward+backward and Sinkhorn-Knopp over the five levels.

Run ``python -m benchmarks.heads [--quick] [--reference DIR]``. With a checkout of the official code
(``--reference``, env ``FRANCA_REFERENCE_CODE``, or ``/work/ref/Franca`` when present) the official modules
are loaded straight from their files (never vendored), given the same weights and inputs, and timed
interleaved with ours; each row then carries ``official_seconds`` and ``ratio`` (ours / official).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.common import median, peak_memory_mb, time_fn
from franca.layers import MRLDINOHead
from franca.loss import sinkhorn_knopp

_DEFAULT_REFERENCE = Path("/work/ref/Franca")


def _reference_dir(explicit: str | None) -> Path | None:
    for candidate in (explicit, os.environ.get("FRANCA_REFERENCE_CODE"), _DEFAULT_REFERENCE):
        if candidate and (Path(candidate) / "franca" / "layers" / "mrl_dino_head.py").is_file():
            return Path(candidate)
    return None


def _load_official(reference: Path, relative: str) -> ModuleType:
    """Import one official file under a private name (our package is also called ``franca``)."""
    name = "_official_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, reference / relative)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each function once per round, alternating, so machine noise hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        time_fn(fn, warmup=1, repeats=0)
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += time_fn(fn, warmup=0, repeats=1)
    return times


def _head_step(head: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [p for p in head.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        outputs = head(x)
        sum(out.sum() for out in outputs).backward()

    return step


def _head_flops(rows: int, head: MRLDINOHead, hidden: int, bottleneck: int) -> float:
    """Forward + backward (≈ 3× forward) multiply-adds ×2 of every linear layer of the head."""
    in_dim = head.nesting_list[-1]
    per_row = sum(
        in_dim * m + m * hidden + hidden * hidden + hidden * bottleneck + bottleneck * k
        for m, k in zip(head.nesting_list, head.n_prototypes)
    )
    return 3 * 2 * rows * per_row


def run(quick: bool = False, reference: str | None = None) -> list[dict]:
    torch.manual_seed(0)
    in_dim, hidden, bottleneck = 384, 2048, 256
    n_prototypes = 8192 if quick else 65536
    rows = 64
    repeats = 3 if quick else 7
    reference_dir = _reference_dir(reference)
    results = []

    ours = MRLDINOHead(in_dim, n_prototypes, hidden_dim=hidden, bottleneck_dim=bottleneck)
    x = torch.randn(rows, in_dim)
    fns = {"ours": _head_step(ours, x)}
    if reference_dir is not None:
        official_cls = _load_official(reference_dir, "franca/layers/mrl_dino_head.py").MRLDINOHead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            official = official_cls(
                in_dim, n_prototypes, hidden_dim=hidden, bottleneck_dim=bottleneck, nesting_list=ours.nesting_list
            )
        official.load_state_dict(ours.state_dict(), strict=True)
        fns["official"] = _head_step(official, x)
    times = _interleaved(fns, repeats)
    seconds = median(times["ours"])
    row = {
        "workload": f"mrl_head_fwd_bwd_d{in_dim}_K{n_prototypes}_rows{rows}",
        "seconds": seconds,
        "img_per_s": rows / seconds,
        "gflops": _head_flops(rows, ours, hidden, bottleneck) / seconds / 1e9,
        "peak_mem_mb": peak_memory_mb(),
    }
    if "official" in times:
        row["official_seconds"] = median(times["official"])
        row["ratio"] = seconds / row["official_seconds"]
    results.append(row)

    sk_rows = 2 * rows
    levels = [torch.randn(sk_rows, k) for k in ours.n_prototypes]
    teacher_temp = 0.07
    fns = {"ours": lambda: sinkhorn_knopp(levels, teacher_temp)}
    if reference_dir is not None:
        official_loss = _load_official(reference_dir, "franca/loss/mrl_dino_loss.py").MRLDINOLoss(n_prototypes)
        fns["official"] = lambda: official_loss.sinkhorn_knopp_teacher(
            tuple(levels), teacher_temp, n_global_crops_teacher=2
        )
    times = _interleaved(fns, repeats)
    seconds = median(times["ours"])
    row = {
        "workload": f"sinkhorn_knopp_5_levels_K{n_prototypes}_rows{sk_rows}",
        "seconds": seconds,
        "img_per_s": sk_rows / seconds,
        "gflops": None,
        "peak_mem_mb": peak_memory_mb(),
    }
    if "official" in times:
        row["official_seconds"] = median(times["official"])
        row["ratio"] = seconds / row["official_seconds"]
    results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8192 prototypes, fewer repeats")
    parser.add_argument("--reference", default=None, help="checkout of the official valeoai/Franca code")
    args = parser.parse_args(argv)
    for row in run(quick=args.quick, reference=args.reference):
        print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
