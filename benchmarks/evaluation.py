"""Evaluation throughput: feature extraction (images/s) and the k-NN of 10k × 10k features.

Workloads (float32 on CPU; bf16 autocast for the extraction on CUDA):

* ``extract_vits14_224``: :func:`franca.eval.features.extract_features` of ViT-S/14 class tokens at
  224 px (batch 32 on CUDA, 8 on CPU; ``quick``: a 4-block, 192-wide ViT at 112 px);
* ``knn_10k_x_10k_d384_<backend>``: :func:`franca.eval.knn.knn_classify` of 10 000 L2-normalised
  queries against 10 000 train features of dimension 384, 1000 classes, k ∈ {10, 20, 100, 200},
  with the torch chunked-matmul search and with faiss (``IndexFlatIP``; faiss-gpu on CUDA when
  installed). ``quick`` uses 2 000 × 2 000.

``gflops``: extraction = analytic ViT forward FLOPs / time; k-NN = the 2·Q·N·D of the similarity
products / time (the top-k selection and the votes are extra work not counted).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks.backbone import vit_forward_flops
from benchmarks.common import median, peak_memory_mb, time_fn
from franca.eval.features import extract_features
from franca.eval.knn import faiss_module, knn_classify
from franca.models.vision_transformer import DinoVisionTransformer, vit_small

NB_KNN = (10, 20, 100, 200)


def _row(workload: str, seconds: float, images: int, flops: float, device: str, **extra) -> dict:
    return {
        "workload": workload,
        "seconds": seconds,
        "img_per_s": images / seconds,
        "gflops": flops / seconds / 1e9,
        "peak_mem_mb": peak_memory_mb(device),
        **extra,
    }


def bench_extraction(quick: bool, device: str) -> dict:
    """Images/s of the k-NN feature extraction (class token) through ``extract_features``."""
    torch.manual_seed(0)
    if quick:
        model, size, name = (
            DinoVisionTransformer(img_size=112, patch_size=14, embed_dim=192, depth=4, num_heads=3),
            112,
            "extract_vit4x192_112",
        )
    else:
        model, size, name = vit_small(patch_size=14, img_size=224, block_chunks=0), 224, "extract_vits14_224"
    model = model.to(device).eval()
    on_gpu = device.startswith("cuda")
    batch = 32 if on_gpu else 8
    count = batch * (8 if on_gpu else (2 if quick else 4))
    data = TensorDataset(torch.randn(count, 3, size, size), torch.zeros(count, dtype=torch.long))
    dtype = torch.bfloat16 if on_gpu else None
    times = time_fn(
        lambda: extract_features(model, data, batch, device=device, autocast_dtype=dtype),
        warmup=1,
        repeats=2 if quick else 3,
        device=device,
    )
    seconds = median(times)
    return _row(
        name,
        seconds,
        count,
        count * vit_forward_flops(model, size),
        device,
        batch_size=batch,
        dtype=str(dtype or torch.float32),
    )


def bench_knn(quick: bool, device: str, backend: str) -> dict:
    """Seconds of the full weighted k-NN (search + votes + accuracy) for every k in ``NB_KNN``."""
    n, dim, classes = (2000, 384, 1000) if quick else (10_000, 384, 1000)
    g = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    val = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    train_labels = torch.randint(0, classes, (n,), generator=g).to(device)
    val_labels = torch.randint(0, classes, (n,), generator=g).to(device)
    times = time_fn(
        lambda: knn_classify(train, train_labels, val, val_labels, NB_KNN, 0.07, classes, backend=backend),
        warmup=1,
        repeats=2 if quick else 3,
        device=device,
    )
    name = f"knn_{n // 1000}k_x_{n // 1000}k_d{dim}_{backend}" + ("_cuda" if device.startswith("cuda") else "")
    return _row(name, median(times), n, 2.0 * n * n * dim, device, nb_knn=list(NB_KNN))


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    """All evaluation workloads on ``device`` (default: the CPU)."""
    device = device or "cpu"
    backends = ["torch"] + (["faiss"] if faiss_module(on_gpu=device.startswith("cuda")) is not None else [])
    return [bench_extraction(quick, device), *(bench_knn(quick, device, b) for b in backends)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = parser.parse_args()
    for row in run(args.quick, args.device):
        print(json.dumps(row))
