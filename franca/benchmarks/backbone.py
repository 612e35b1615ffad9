"""Backbone throughput: ViT-S/14 forward+backward and the packed multi-crop pass, ours against the official module.

Workloads (float32 on CPU; bf16 autocast on CUDA), each timed after one warm-up run:

* ``vits14_fwd_bwd_224_b8``: ViT-S/14, 224 px, batch 8, forward + backward of the class token;
* ``vits14_multicrop_fwd`` / ``vits14_multicrop_fwd_bwd``: the student's multi-crop pass for a batch of 4 images,
  2×224 px + 8×98 px crops. Ours runs it as one packed list forward (block-diagonal attention, no padding);
  the official list forward needs xFormers, so without it the two crop batches run one after the other.

Both implementations run in fresh interpreters with the same worker script (the official package is also called
``franca``; it runs with ``XFORMERS_DISABLED=1``, i.e. its unfused attention, from ``FRANCA_OFFICIAL_ROOT``),
alternating in rounds so that other load on a shared machine hits both alike. ``gflops`` is the analytic FLOP
count (2 per multiply-add of every matmul and attention product; backward = 2× forward) over the median time;
``best_seconds`` is the fastest run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from franca.benchmarks.common import matmul_gflops, median
from franca.models.vision_transformer import DinoVisionTransformer, vit_small

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFICIAL_ROOT = Path(os.environ.get("FRANCA_OFFICIAL_ROOT", "/work/ref/Franca"))
VITS_KWARGS = {"patch_size": 14, "img_size": 224, "init_values": 1e-5, "block_chunks": 0, "ffn_layer": "mlp"}
GLOBAL_SIZE, LOCAL_SIZE, N_GLOBAL, N_LOCAL = 224, 98, 2, 8
WORKLOADS = {  # name → (images per run, multiple of the forward FLOPs of the run's crops)
    "vits14_fwd_bwd_224_b8": (8, 3),
    "vits14_multicrop_fwd": (4, 1),
    "vits14_multicrop_fwd_bwd": (4, 3),
}

# argv: package root, "packed"|"sequential" list forward, repeats, threads, model kwargs (JSON), device.
# Prints {workload: [seconds of each run], "peak_mem_mb": ...} as JSON.
_WORKER = textwrap.dedent(
    """
    import json, resource, sys, time, warnings
    warnings.simplefilter("ignore")
    root, list_mode, repeats, threads, kwargs, device = sys.argv[1:7]
    sys.path.insert(0, root)
    import torch
    torch.set_num_threads(int(threads))
    import franca.models.vision_transformer as vits
    torch.manual_seed(0)
    model = vits.vit_small(**json.loads(kwargs)).to(device).train()
    half = device.startswith("cuda")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=half)
    x = torch.randn(8, 3, 224, 224, device=device)
    crops = [torch.randn(8, 3, 224, 224, device=device), torch.randn(32, 3, 98, 98, device=device)]
    def features(inputs):
        if list_mode == "packed":
            return model.forward_features(inputs)
        return [model.forward_features(c) for c in inputs]
    def fwd_bwd():
        with autocast:
            loss = model(x).float().square().mean()
        loss.backward()
    def multicrop_fwd():
        with torch.no_grad(), autocast:
            features(crops)
    def multicrop_fwd_bwd():
        with autocast:
            loss = sum(o["x_norm_clstoken"].float().square().mean() for o in features(crops))
        loss.backward()
    def sync():
        if half:
            torch.cuda.synchronize()
    result = {}
    for name, fn in [("vits14_fwd_bwd_224_b8", fwd_bwd), ("vits14_multicrop_fwd", multicrop_fwd),
                     ("vits14_multicrop_fwd_bwd", multicrop_fwd_bwd)]:
        fn(); sync()
        times = []
        for _ in range(int(repeats)):
            start = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - start)
        result[name] = times
    if half:
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    """
)


def vit_forward_flops(model: DinoVisionTransformer, image_size: int) -> float:
    """Analytic forward FLOPs of one ``image_size``² image (patch embed, qkv, attention, proj, FFN)."""
    dim, patch = model.embed_dim, model.patch_size
    patches = (image_size // patch) ** 2
    tokens = patches + 1 + model.num_register_tokens
    block = model.block_list()[0]
    ffn_macs = sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + ffn_macs) + 4 * tokens * tokens * dim
    return 2 * patches * 3 * patch * patch * dim + model.n_blocks * per_block


def _run_worker(root: Path, list_mode: str, repeats: int, device: str, env: dict) -> dict:
    args = [str(root), list_mode, str(repeats), str(torch.get_num_threads()), json.dumps(VITS_KWARGS), device]
    done = subprocess.run([sys.executable, "-c", _WORKER, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, compare_official: bool = True) -> list[dict]:
    """Rows for our backbone (SDPA / auto backend) and, on the CPU when checked out, the official module."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {"ours": (REPO_ROOT, "packed", dict(os.environ))}
    if compare_official and device == "cpu" and (OFFICIAL_ROOT / "franca").is_dir():
        impls["official[no xformers]"] = (OFFICIAL_ROOT, "sequential", {**os.environ, "XFORMERS_DISABLED": "1"})
    rounds, repeats = (1, 2) if quick else (3, 2)
    times = {impl: {w: [] for w in WORKLOADS} for impl in impls}
    peak = {}
    for _ in range(rounds):
        for impl, (root, list_mode, env) in impls.items():
            result = _run_worker(root, list_mode, repeats, device, env)
            peak[impl] = max(peak.get(impl, 0.0), result.pop("peak_mem_mb"))
            for workload, values in result.items():
                times[impl][workload] += values

    model = vit_small(**VITS_KWARGS)
    image_flops = vit_forward_flops(model, GLOBAL_SIZE)
    crop_flops = {
        "vits14_fwd_bwd_224_b8": 8 * image_flops,
        "vits14_multicrop_fwd": 4 * (N_GLOBAL * image_flops + N_LOCAL * vit_forward_flops(model, LOCAL_SIZE)),
    }
    crop_flops["vits14_multicrop_fwd_bwd"] = crop_flops["vits14_multicrop_fwd"]
    ceiling = matmul_gflops(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    rows = []
    for impl, per_workload in times.items():
        for workload, values in per_workload.items():
            images, multiple = WORKLOADS[workload]
            seconds = median(values)
            rows.append(
                {
                    "workload": workload,
                    "impl": impl,
                    "seconds": seconds,
                    "best_seconds": min(values),
                    "img_per_s": images / seconds,
                    "gflops": multiple * crop_flops[workload] / seconds / 1e9,
                    "peak_mem_mb": peak[impl],
                    "matmul_gflops": ceiling,
                    "device": device,
                }
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-official", action="store_true")
    cli = parser.parse_args()
    for row in run(quick=cli.quick, compare_official=not cli.no_official):
        print(json.dumps(row))
