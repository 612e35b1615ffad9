"""Export workload: latency of a ViT-S/14 at 224 px run by onnxruntime (CPU) against PyTorch eager, batch 1 and 8.

The backbone (release settings, random weights) is exported with ``export_backbone`` (ONNX, opset 17, fixed
224² size, verified), then both runtimes compute the same outputs (``cls_token``, ``patch_tokens``) on the same
batch with the same number of intra-op threads — 1, and PyTorch's default — alternating run by run so that other
load on a shared machine hits both alike (on a loaded machine PyTorch's OpenMP threads can wait a scheduler slice
at every operator; the 1-thread rows show the kernels alone). ``gflops`` = analytic forward FLOPs (2 per multiply-add: patch embedding, the block linears, the two
attention products) / median time; ``export_seconds`` is the one-off export + verification time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import median, peak_memory_mb
from franca.export import ExportableBackbone, OnnxRunner, export_backbone
from franca.models.vision_transformer import vit_small

IMG_SIZE = 224
BATCH_SIZES = (1, 8)
VITS_KWARGS = {"patch_size": 14, "img_size": IMG_SIZE, "init_values": 1e-5, "block_chunks": 0, "ffn_layer": "mlp"}


def _forward_flops(model: torch.nn.Module, images: int) -> float:
    """2·(patch-embed MACs + Σ block linear MACs + attention q·kᵀ and a·v MACs) for ``images`` images."""
    patches = (IMG_SIZE // model.patch_size) ** 2
    tokens = patches + 1 + model.num_register_tokens
    linear = sum(p.numel() for n, p in model.blocks.named_parameters() if n.endswith("weight") and p.ndim == 2)
    embed = model.patch_embed.proj.weight.numel()
    attention = 2 * tokens * tokens * model.embed_dim * model.n_blocks
    return 2.0 * images * (embed * patches + linear * tokens + attention)


def _alternate(fns: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Each function once untimed, then ``repeats`` rounds timing every function once per round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _measure(model: torch.nn.Module, onnx_path: Path, threads: int, repeats: int) -> list[dict]:
    """Rows for both runtimes at every batch size, with ``threads`` intra-op threads for both."""
    torch.set_num_threads(threads)
    eager, runner = ExportableBackbone(model), OnnxRunner(onnx_path, threads=threads)
    rows = []
    for batch in BATCH_SIZES:
        images = torch.randn(batch, 3, IMG_SIZE, IMG_SIZE)

        def pytorch_eager(images=images):
            with torch.inference_mode():
                return eager(images)

        times = _alternate({"onnxruntime": lambda images=images: runner(images), "pytorch": pytorch_eager}, repeats)
        flops = _forward_flops(model, batch)
        for runtime, seconds in times.items():
            mid = median(seconds)
            rows.append(
                {
                    "workload": f"export_vits14_224_b{batch}_{runtime}_{threads}t",
                    "seconds": mid,
                    "img_per_s": batch / mid,
                    "gflops": flops / mid / 1e9,
                    "peak_mem_mb": peak_memory_mb(),
                    "best_seconds": min(seconds),
                    "threads": threads,
                }
            )
    return rows


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    repeats = 2 if quick else 7
    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads})
    model = vit_small(**VITS_KWARGS).eval()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = export_backbone(model, Path(tmp) / "vits14.onnx", format="onnx", img_size=IMG_SIZE)
            export_seconds = time.perf_counter() - start
            for threads in thread_counts:
                rows += _measure(model, result.path, threads, repeats)
    finally:
        torch.set_num_threads(default_threads)
    for row in rows:
        row.update(export_seconds=export_seconds, max_relative_error=result.max_error)
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
