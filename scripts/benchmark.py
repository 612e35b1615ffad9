#!/usr/bin/env python
"""Throughput of the Franca workloads: a table on stdout and, with ``--json``, a JSON file.

    python scripts/benchmark.py [--quick] [--only NAME ...] [--json OUT.json] [--device cpu|cuda]
                                [--compare-reference DIR [--compare-only W ...] [--repeats N] [--threads N] [--profile]]
    python scripts/benchmark.py --count-ops [--compare-reference DIR] [--quick] [--json OUT.json]

Every workload module (``benchmarks/<module>.py`` at the repository root, outside the installed package, ``run(quick) -> rows``) runs in its own
Python process, so the peak memory of a row is that workload's alone. Rows report seconds per call,
images/s, achieved GFLOP/s (analytic FLOPs / median time), the share of the machine's measured
matmul throughput that is, on a GPU the model-FLOPs utilisation against the device's dense bf16
peak, and peak memory (CPU: resident set; GPU: allocated). The header names the machine: CPU
model, cores, load, torch version and threads, GPU, and the matmul ceiling measured in the same run.

``--compare-reference DIR`` also times the same workloads on a checkout of the official
valeoai/Franca code against ours (see :mod:`benchmarks.compare_reference`) and prints the
ratios ours / official with their targets.

``--count-ops`` counts instead of timing (:mod:`benchmarks.dispatch`): the ATen operators, the bytes written
by element-wise operators and the host syncs of one training iteration at the IN21K ViT-B/14 and ViT-L/14
shapes, per region, next to the official step's when ``--compare-reference DIR`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

WORKLOADS = {
    "augment": "multi-crop augmentation (+ collate with CyclicMask), images/s per core",
    "backbone": "ViT-S/14 forward+backward, single crop and multi-crop",
    "heads": "Matryoshka head forward+backward, Sinkhorn-Knopp over the five levels",
    "step": "whole training iteration (SSLMetaArch.forward_backward + clip + AdamW + EMA)",
    "rasa": "RASA iteration and folding",
    "train_loop": "the trainer on the demo images (data loading included)",
    "eval": "feature extraction and k-NN",
    "export": "ONNX Runtime vs PyTorch eager latency",
    "interop": "transformers / timm output gap vs ours at non-native image sizes",
    "checkpoint": "training checkpoint save/load, full-state file vs DCP, 2 gloo ranks",
    "dispatch": "ATen operators, element-wise bytes and host syncs of one iteration (fake tensors, IN21K shapes)",
}
DEFAULT_WORKLOADS = ["augment", "backbone", "heads", "step", "rasa"]
# workload name → module of benchmarks/ (modules are not named after the packages they measure)
MODULES = {"rasa": "rasa_posttrain", "eval": "evaluation"}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by device-name fragment; first match wins.
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0)]


def device_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (H100/H200/A100), or None when unknown."""
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment.lower() in name.lower():
            return peak
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """Machine description and the measured matmul ceiling (run inside a worker: imports torch)."""
    import torch

    from benchmarks.common import matmul_gflops

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "matmul_gflops_fp32_cpu": matmul_gflops(device="cpu", dtype=torch.float32),
    }
    if device == "cuda":
        name = torch.cuda.get_device_name()
        info.update(
            gpu=name,
            gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            peak_bf16_tflops=device_peak_tflops(name),
            matmul_gflops_bf16_cuda=matmul_gflops(n=8192, device="cuda", dtype=torch.bfloat16),
        )
    return info


def _worker(name: str, quick: bool, device: str, out: Path) -> None:
    """Child-process entry: the machine description or one workload module's rows, written to ``out``."""
    if name == "machine":
        result = machine_info(device)
    else:
        result = importlib.import_module(f"benchmarks.{MODULES.get(name, name)}").run(quick=quick)
    out.write_text(json.dumps(result, default=float))


def _in_subprocess(name: str, quick: bool, device: str) -> dict | list:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="franca_bench_") as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, "--worker", name, "--worker-out", str(out), "--device", device]
        result = subprocess.run(command + (["--quick"] if quick else []), env=env, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"workload {name!r} failed (exit {result.returncode}):\n{tail}")
        return json.loads(out.read_text())


def _annotate(row: dict, machine: dict) -> dict:
    """Add the share of the measured matmul ceiling and, on a GPU, the MFU against the device peak."""
    gflops = row.get("gflops")
    if not gflops:
        return row
    if machine["device"] == "cuda" and row.get("device", "cuda") == "cuda":
        row["pct_of_matmul"] = 100 * gflops / machine["matmul_gflops_bf16_cuda"]
        if machine.get("peak_bf16_tflops"):
            row["mfu_pct"] = 100 * gflops / (machine["peak_bf16_tflops"] * 1000)
    else:
        row["pct_of_matmul"] = 100 * gflops / machine["matmul_gflops_fp32_cpu"]
    return row


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _table(headers: list[str], lines: list[list]) -> str:
    cells = [headers] + [[_fmt(v) for v in line] for line in lines]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _print_report(machine: dict, rows: list[dict], compare_rows: list[dict]) -> None:
    load = ", ".join(f"{x:.2f}" for x in machine["load_average"])
    print(f"\nmachine: {machine['cpu']}, {machine['usable_cores']} usable cores, load {load}")
    print(f"torch {machine['torch']} ({machine['torch_threads']} threads), {machine['date']}")
    print(f"measured matmul ceiling: {machine['matmul_gflops_fp32_cpu']:.1f} GFLOP/s fp32 CPU", end="")
    if machine["device"] == "cuda":
        print(
            f"; {machine['gpu']}: {machine['matmul_gflops_bf16_cuda'] / 1000:.0f} TFLOP/s bf16 "
            f"(dense peak {_fmt(machine.get('peak_bf16_tflops'))} TFLOP/s)",
            end="",
        )
    print("\n")
    counted = [r for r in rows if "region" in r]  # the dispatch workload: counts, not timings
    rows = [r for r in rows if "region" not in r]
    if counted:
        from benchmarks.dispatch import format_table

        print(format_table(counted) + "\n")
    if rows:
        _print_table(
            ["module", "workload", "impl", "seconds", "img/s", "GFLOP/s", "% matmul", "MFU %", "peak MB"],
            rows,
            lambda r: [
                r["module"],
                r["workload"],
                r.get("impl", ""),
                r.get("seconds"),
                r.get("img_per_s"),
                r.get("gflops"),
                r.get("pct_of_matmul"),
                r.get("mfu_pct"),
                r.get("peak_mem_mb"),
            ],
            name_key="module",
        )
    if compare_rows:
        print("\nours vs official (medians of interleaved runs in separate processes)\n")
        _print_table(
            [
                "workload",
                "ours s",
                "official s",
                "ratio",
                "paired",
                "best",
                "target",
                "met",
                "GFLOP/s",
                "% matmul",
                "ours MB",
                "official MB",
            ],
            compare_rows,
            lambda r: [
                r["workload"],
                r["seconds"],
                r["official_seconds"],
                r["ratio"],
                r["paired_ratio"],
                r["best_ratio"],
                r["target"],
                {True: "yes", False: "NO", None: "–"}[r["meets_target"]],
                r["gflops"],
                r.get("pct_of_matmul"),
                r["peak_mem_mb"],
                r["official_peak_mem_mb"],
            ],
            name_key="workload",
        )


def _print_table(headers: list[str], rows: list[dict], cells, name_key: str) -> None:
    """The rows without an ``error`` as a table (``cells(row)`` gives a line), then each error under its name."""
    print(_table(headers, [cells(r) for r in rows if "error" not in r]))
    for r in rows:
        if "error" in r:
            print(f"\n{r[name_key]}: {r['error']}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"workloads to run (default: {DEFAULT_WORKLOADS}); any of {list(WORKLOADS)}; none with --only none",
    )
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write machine, rows and comparison here")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    parser.add_argument("--compare-reference", metavar="DIR", help="checkout of the official valeoai/Franca code")
    parser.add_argument("--compare-only", nargs="+", metavar="W", help="comparison workloads to run (default: all)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per comparison (default 7)")
    parser.add_argument(
        "--threads", type=int, help="torch threads of both sides of a comparison (default: usable cores)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="print each comparison side's top torch.profiler operators"
    )
    parser.add_argument(
        "--count-ops",
        action="store_true",
        help="count the operators, element-wise bytes and host syncs of one iteration (with the official step's "
        "when --compare-reference is given) instead of timing",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _count_ops(args: argparse.Namespace, reference: Path | None) -> int:
    """``--count-ops``: the dispatch table, ours and (with a reference checkout) official, with the ratios."""
    from benchmarks import dispatch

    rows = dispatch.run(quick=args.quick, reference=reference)
    print(dispatch.format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count_ops": rows}, indent=1, default=float))
        print(f"\nwrote {args.json}")
    return 0


def _default_device() -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"], capture_output=True, text=True
    )
    return "cuda" if probe.stdout.strip() == "1" else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        _worker(args.worker, args.quick, args.device, args.worker_out)
        return 0
    names = [] if args.only == ["none"] else (args.only or DEFAULT_WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        sys.exit(f"benchmark.py: error: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    if args.repeats < 1:
        sys.exit(f"benchmark.py: error: --repeats must be >= 1, got {args.repeats}")
    if args.compare_reference is not None:
        from benchmarks.compare_reference import check_reference_dir

        try:
            reference = check_reference_dir(args.compare_reference)
        except FileNotFoundError as error:
            sys.exit(f"benchmark.py: error: {error}")
    if args.count_ops:
        return _count_ops(args, reference if args.compare_reference is not None else None)
    device = args.device or _default_device()
    if device == "cuda" and _default_device() != "cuda":
        sys.exit("benchmark.py: error: --device cuda but torch sees no CUDA device")

    machine = _in_subprocess("machine", args.quick, device)
    print(f"machine: {machine['cpu']}, load {machine['load_average'][0]:.2f}; workloads: {names}", flush=True)
    rows = []
    for name in names:
        print(f"running {name}: {WORKLOADS[name]}", flush=True)
        try:
            module_rows = _in_subprocess(name, args.quick, device)
        except RuntimeError as error:
            rows.append({"module": name, "workload": name, "error": str(error)})
            continue
        rows += [_annotate({"module": name, **row}, machine) for row in module_rows]

    compare_rows = []
    if args.compare_reference is not None:
        from benchmarks.compare_reference import compare

        try:
            compare_rows = compare(
                reference,
                only=args.compare_only,
                repeats=args.repeats,
                threads=args.threads,
                quick=args.quick,
                profile=args.profile,
            )
        except KeyError as error:
            sys.exit(f"benchmark.py: error: {error.args[0]}")

    _print_report(machine, rows, compare_rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine, "rows": rows, "compare_reference": compare_rows}, indent=1, default=float)
        )
        print(f"\nwrote {args.json}")
    failed = [r for r in rows + compare_rows if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
