"""Backbone throughput: ViT-S/14 forward+backward and the packed multi-crop forward, on the CPU (or a GPU).

Workloads (float32 on CPU; bf16 autocast on CUDA):

* ``vits14_fwd_bwd_224_b8``: ViT-S/14, 224 px, batch 8, forward + backward of the class token;
* ``vits14_multicrop_fwd`` / ``..._fwd_bwd``: the student's multi-crop pass, 2×224 px + 8×98 px crops for a
  batch of 4 images, as one packed list forward (block-diagonal attention, no padding);
* with ``compare_official``: the same workloads with the official module (``/work/ref/Franca``, run in a
  subprocess with ``XFORMERS_DISABLED=1``, so with its unfused attention; its list forward needs xFormers,
  so its multi-crop figure runs the two crop batches one after the other).

``gflops`` is the analytic FLOP count (2 per multiply-add of every matmul and attention product; backward = 2×
forward) divided by the median time; ``best_seconds`` (the fastest run) is less sensitive to other load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import torch

from franca.benchmarks.common import matmul_gflops, median, peak_memory_mb, time_fn
from franca.models.vision_transformer import DinoVisionTransformer, vit_small

OFFICIAL_ROOT = os.environ.get("FRANCA_OFFICIAL_ROOT", "/work/ref/Franca")
_VITS_KWARGS = {"patch_size": 14, "img_size": 224, "init_values": 1e-5, "block_chunks": 0, "ffn_layer": "mlp"}
GLOBAL_SIZE, LOCAL_SIZE, N_GLOBAL, N_LOCAL = 224, 98, 2, 8


def vit_forward_flops(model: DinoVisionTransformer, image_size: int) -> float:
    """Analytic forward FLOPs of one ``image_size``² image (patch embed, qkv, attention, proj, MLP)."""
    dim, patch = model.embed_dim, model.patch_size
    patches = (image_size // patch) ** 2
    tokens = patches + 1 + model.num_register_tokens
    block = model.block_list()[0]
    ffn_macs = sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, torch.nn.Linear))
    per_block = 2 * tokens * (3 * dim * dim + dim * dim + ffn_macs) + 4 * tokens * tokens * dim
    return 2 * patches * 3 * patch * patch * dim + model.n_blocks * per_block


def _crops(batch: int, device: str) -> list[torch.Tensor]:
    return [
        torch.randn(N_GLOBAL * batch, 3, GLOBAL_SIZE, GLOBAL_SIZE, device=device),
        torch.randn(N_LOCAL * batch, 3, LOCAL_SIZE, LOCAL_SIZE, device=device),
    ]


def _row(workload: str, times: list[float], images: int, flops: float, device: str, **extra) -> dict:
    seconds = median(times)
    return {
        "workload": workload,
        "seconds": seconds,
        "best_seconds": min(times),
        "img_per_s": images / seconds,
        "gflops": flops / seconds / 1e9,
        "peak_mem_mb": peak_memory_mb(device),
        **extra,
    }


def run_ours(quick: bool = False, device: str = "cpu", attn_backend: str | None = None) -> list[dict]:
    """Time our backbone on the three workloads."""
    repeats = 2 if quick else 5
    torch.manual_seed(0)
    model = vit_small(**_VITS_KWARGS, attn_backend=attn_backend).to(device).train()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    image_flops = vit_forward_flops(model, GLOBAL_SIZE)
    crop_flops = N_GLOBAL * image_flops + N_LOCAL * vit_forward_flops(model, LOCAL_SIZE)
    x = torch.randn(8, 3, GLOBAL_SIZE, GLOBAL_SIZE, device=device)
    crops = _crops(4, device)

    def fwd_bwd():
        with autocast:
            loss = model(x).float().square().mean()
        loss.backward()

    def multicrop_fwd():
        with torch.no_grad(), autocast:
            model.forward_features(crops)

    def multicrop_fwd_bwd():
        with autocast:
            outs = model.forward_features(crops)
            loss = sum(o["x_norm_clstoken"].float().square().mean() for o in outs)
        loss.backward()

    tag = f"ours[{attn_backend or 'auto'}]"
    return [
        _row(
            "vits14_fwd_bwd_224_b8",
            time_fn(fwd_bwd, repeats=repeats, device=device),
            8,
            3 * 8 * image_flops,
            device,
            impl=tag,
        ),
        _row(
            "vits14_multicrop_fwd",
            time_fn(multicrop_fwd, repeats=repeats, device=device),
            4,
            4 * crop_flops,
            device,
            impl=tag,
        ),
        _row(
            "vits14_multicrop_fwd_bwd",
            time_fn(multicrop_fwd_bwd, repeats=repeats, device=device),
            4,
            3 * 4 * crop_flops,
            device,
            impl=tag,
        ),
    ]


# Runs in a separate interpreter (the official package is also called ``franca``); prints the seconds of each run.
_OFFICIAL_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    import franca.models.vision_transformer as vits
    repeats = int(sys.argv[2])
    torch.manual_seed(0)
    model = vits.vit_small(**json.loads(sys.argv[4])).train()
    x = torch.randn(8, 3, 224, 224)
    crops = [torch.randn(8, 3, 224, 224), torch.randn(32, 3, 98, 98)]
    def fwd_bwd():
        model(x).square().mean().backward()
    def multicrop_fwd():
        with torch.no_grad():
            [model.forward_features(c) for c in crops]
    def multicrop_fwd_bwd():
        sum(model.forward_features(c)["x_norm_clstoken"].square().mean() for c in crops).backward()
    result = {}
    for name, fn in [("fwd_bwd", fwd_bwd), ("multicrop_fwd", multicrop_fwd), ("multicrop_fwd_bwd", multicrop_fwd_bwd)]:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
        result[name] = times
    print(json.dumps(result))
    """
)


def run_official(quick: bool = False) -> list[dict]:
    """Time the official module (CPU, no xFormers) on the same workloads; empty when it is not checked out."""
    if not os.path.isdir(os.path.join(OFFICIAL_ROOT, "franca")):
        return []
    env = {**os.environ, "XFORMERS_DISABLED": "1"}
    args = [OFFICIAL_ROOT, str(2 if quick else 5), str(torch.get_num_threads()), json.dumps(_VITS_KWARGS)]
    done = subprocess.run(
        [sys.executable, "-c", _OFFICIAL_SCRIPT, *args], env=env, capture_output=True, text=True, check=True
    )
    times = json.loads(done.stdout.strip().splitlines()[-1])
    model = vit_small(**_VITS_KWARGS)
    image_flops = vit_forward_flops(model, GLOBAL_SIZE)
    crop_flops = N_GLOBAL * image_flops + N_LOCAL * vit_forward_flops(model, LOCAL_SIZE)
    rows = []
    for workload, key, images, flops in [
        ("vits14_fwd_bwd_224_b8", "fwd_bwd", 8, 3 * 8 * image_flops),
        ("vits14_multicrop_fwd", "multicrop_fwd", 4, 4 * crop_flops),
        ("vits14_multicrop_fwd_bwd", "multicrop_fwd_bwd", 4, 3 * 4 * crop_flops),
    ]:
        rows.append(_row(workload, times[key], images, flops, "cpu", impl="official[no xformers]"))
        rows[-1]["peak_mem_mb"] = None
    return rows


def run(quick: bool = False, compare_official: bool = True) -> list[dict]:
    """Our backbone (SDPA) and, when available, the official module; every row carries ``matmul_gflops``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ceiling = matmul_gflops(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    rows = run_ours(quick, device=device, attn_backend="sdpa")
    if compare_official and device == "cpu":
        rows += run_official(quick)
    for row in rows:
        row["matmul_gflops"] = ceiling
        row["device"] = device
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-official", action="store_true")
    cli = parser.parse_args()
    for result in run(quick=cli.quick, compare_official=not cli.no_official):
        print(json.dumps(result))
