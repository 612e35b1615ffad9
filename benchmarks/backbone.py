"""Backbone throughput: ViT-S/14 forward+backward and the packed multi-crop pass, ours against the official module.

Workloads (float32 on CPU; bf16 autocast on CUDA):

* ``vits14_fwd_bwd_224_b8``: ViT-S/14, 224 px, batch 8, forward + backward of the class token;
* ``vits14_multicrop_fwd`` / ``vits14_multicrop_fwd_bwd``: the student's multi-crop pass for a batch of 4 images,
  2×224 px + 8×98 px crops. Ours runs it as one packed list forward (block-diagonal attention, no padding);
  the official list forward needs xFormers, so without it the two crop batches run one after the other.

The official module (``FRANCA_OFFICIAL_ROOT``, default ``/work/ref/Franca``) is imported on the side under
``XFORMERS_DISABLED=1`` (its unfused attention) and timed in the same process, its runs alternating with ours so
that other load on a shared machine hits both alike. ``gflops`` is the analytic FLOP count (2 per multiply-add of
every matmul and attention product; backward = 2× forward) over the median time; ``best_seconds`` is the fastest run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from benchmarks.common import matmul_gflops, median, peak_memory_mb, synchronize
from franca.models import vision_transformer as ours
from franca.models.vision_transformer import DinoVisionTransformer

OFFICIAL_ROOT = Path(os.environ.get("FRANCA_OFFICIAL_ROOT", "/work/ref/Franca"))
VITS_KWARGS = {"patch_size": 14, "img_size": 224, "init_values": 1e-5, "block_chunks": 0, "ffn_layer": "mlp"}
GLOBAL_SIZE, LOCAL_SIZE, N_GLOBAL, N_LOCAL = 224, 98, 2, 8


def vit_forward_flops(model: DinoVisionTransformer, image_size: int) -> float:
    """Analytic forward FLOPs of one ``image_size``² image (patch embed, qkv, attention, proj, FFN)."""
    dim, patch = model.embed_dim, model.patch_size
    patches = (image_size // patch) ** 2
    tokens = patches + 1 + model.num_register_tokens
    block = model.block_list()[0]
    ffn_macs = sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + ffn_macs) + 4 * tokens * tokens * dim
    return 2 * patches * 3 * patch * patch * dim + model.n_blocks * per_block


def import_official(root: Path) -> ModuleType | None:
    """The official ``franca.models.vision_transformer`` (without xFormers), imported beside ours; None if absent."""
    if not (root / "franca").is_dir():
        return None

    def franca_modules() -> list[str]:
        return [name for name in sys.modules if name == "franca" or name.startswith("franca.")]

    saved = {name: sys.modules.pop(name) for name in franca_modules()}
    previous_flag = os.environ.get("XFORMERS_DISABLED")
    os.environ["XFORMERS_DISABLED"] = "1"
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("franca.models.vision_transformer")
    finally:
        sys.path.remove(str(root))
        for name in franca_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        if previous_flag is None:
            del os.environ["XFORMERS_DISABLED"]
        else:
            os.environ["XFORMERS_DISABLED"] = previous_flag


def _workloads(module: ModuleType, device: str, packed: bool, compiled: bool = False) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    model = module.vit_small(**VITS_KWARGS).to(device).train()
    if compiled:  # what train.compile does (the warm-up call compiles)
        model.compile_blocks()
    half = device == "cuda"
    x = torch.randn(8, 3, GLOBAL_SIZE, GLOBAL_SIZE, device=device)
    crops = [
        torch.randn(N_GLOBAL * 4, 3, GLOBAL_SIZE, GLOBAL_SIZE, device=device),
        torch.randn(N_LOCAL * 4, 3, LOCAL_SIZE, LOCAL_SIZE, device=device),
    ]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if half else contextlib.nullcontext()

    def features(inputs):
        return model.forward_features(inputs) if packed else [model.forward_features(c) for c in inputs]

    def fwd_bwd():
        with autocast():
            loss = model(x).float().square().mean()
        loss.backward()

    def multicrop_fwd():
        with torch.no_grad(), autocast():
            features(crops)

    def multicrop_fwd_bwd():
        with autocast():
            loss = sum(o["x_norm_clstoken"].float().square().mean() for o in features(crops))
        loss.backward()

    return {
        "vits14_fwd_bwd_224_b8": fwd_bwd,
        "vits14_multicrop_fwd": multicrop_fwd,
        "vits14_multicrop_fwd_bwd": multicrop_fwd_bwd,
    }


def run(quick: bool = False, compare_official: bool = True) -> list[dict]:
    """Rows for our backbone (auto attention backend: SDPA on CPU) and, when checked out, the official module."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impls = {"ours": _workloads(ours, device, packed=True)}
    if not quick:
        impls["ours[train.compile]"] = _workloads(ours, device, packed=True, compiled=True)
    official = import_official(OFFICIAL_ROOT) if compare_official and device == "cpu" else None
    if official is not None:
        impls["official[no xformers]"] = _workloads(official, device, packed=False)
    repeats = 2 if quick else 5

    model = ours.vit_small(**VITS_KWARGS)
    image_flops = vit_forward_flops(model, GLOBAL_SIZE)
    crop_flops = 4 * (N_GLOBAL * image_flops + N_LOCAL * vit_forward_flops(model, LOCAL_SIZE))
    flops = {
        "vits14_fwd_bwd_224_b8": (8, 3 * 8 * image_flops),
        "vits14_multicrop_fwd": (4, crop_flops),
        "vits14_multicrop_fwd_bwd": (4, 3 * crop_flops),
    }
    ceiling = matmul_gflops(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    rows = []
    for workload, (images, workload_flops) in flops.items():
        times = {impl: [] for impl in impls}
        for impl in impls:  # warm-up
            impls[impl][workload]()
        for _ in range(repeats):
            for impl, fns in impls.items():
                synchronize(device)
                start = time.perf_counter()
                fns[workload]()
                synchronize(device)
                times[impl].append(time.perf_counter() - start)
        for impl, values in times.items():
            seconds = median(values)
            rows.append(
                {
                    "workload": workload,
                    "impl": impl,
                    "seconds": seconds,
                    "best_seconds": min(values),
                    "img_per_s": images / seconds,
                    "gflops": workload_flops / seconds / 1e9,
                    "peak_mem_mb": peak_memory_mb(device),
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
