#!/usr/bin/env python
"""Check and time the GPU paths on one GPU: ``python scripts/gpu_check.py [--json OUT] [--only CHECK ...]``.

One command (``make gpu-check``), a few minutes on one GPU with only this checkout and pip wheels:

* ``attention``: xFormers vs SDPA on the packed multi-crop pass (2·32 global 257-token and 8·32 local
  50-token sequences, ViT-L width), fp16 and bf16: max |difference| against a tolerance, and each time;
* ``step``: one IN21K ViT-B/14 and ViT-L/14 training iteration (``training_step``: forward_backward, unscale,
  clip, AdamW, EMA) at batch 32 in the shipped precision (fp16 autocast + grad scaler) and in bf16: s/it,
  images/s, achieved TFLOP/s, peak memory, finite losses;
* ``compile``: the ViT-B/14 bf16 iteration with ``train.compile`` off and on: first-call (compile) time,
  s/it, and the difference of the first step's losses;
* ``cuda_graph``: the ViT-B/14 bf16 iteration eager (``training_step``) and recorded once as a CUDA graph
  then replayed (``train.cuda_graph``, :class:`franca.train.static_step.StaticTrainingStep`): s/it, images/s,
  and the difference of the first step's losses (the dry run runs the static step eagerly: no CUDA);
* ``augment``: ``train.batch_augmentation`` (JPEG decode on the GPU + multi-crop rendering) images/s;
* ``knn``: the k-NN classifier on GPU features (faiss-gpu when installed, else torch), queries/s.

It prints a table and writes the rows, with the machine, as JSON (``--json``, default ``gpu_check.json``)
for docs/benchmarks.md. The exit status is 1 when a check fails. ``--dry-run`` runs the same code on the CPU
at tiny shapes (``vit_pico``, 32/16-px crops, SDPA vs the explicit softmax product in place of xFormers),
which is what the CPU test suite exercises.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]

import torch  # noqa: E402
from benchmark import machine_info  # noqa: E402  (scripts/benchmark.py: the machine header of every figure)

from benchmarks.common import median, peak_memory_mb, synchronize, time_fn  # noqa: E402
from benchmarks.step import step_flops  # noqa: E402
from franca.data.synthetic import random_collated_batch  # noqa: E402
from franca.layers.attention import TokenLayout, packed_attention, xformers_failure  # noqa: E402
from franca.train.ssl_meta_arch import SSLMetaArch  # noqa: E402
from franca.train.static_step import StaticTrainingStep  # noqa: E402
from franca.train.train import (  # noqa: E402
    apply_optim_scheduler,
    build_batch_augmentation,
    build_optimizer,
    training_step,
)
from franca.utils.config import load_config_file  # noqa: E402

CHECKS = ("attention", "step", "compile", "cuda_graph", "augment", "knn")
# max |xFormers − SDPA| allowed, relative to max |SDPA output|
ATTENTION_RTOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}
BF16 = [
    f"compute_precision.{net}.{part}.mixed_precision.{key}={value}"
    for net in ("student", "teacher")
    for part in ("backbone", "dino_head", "ibot_head")
    for key, value in (("param_dtype", "bf16"), ("reduce_dtype", "fp32"))
]


@dataclass(frozen=True)
class Sizes:
    """Shapes of every check; ``FULL`` on the GPU, ``DRY`` for the CPU dry run."""

    device: str
    archs: tuple[tuple[str, str], ...]
    arch_overrides: tuple[str, ...]
    batch: int
    warmup: int
    repeats: int
    attention_dim: int
    attention_heads: int
    global_tokens: int
    local_tokens: int
    reference_backend: str  # compared with SDPA
    images: int
    image_size: tuple[int, int]
    knn_train: int
    knn_queries: int
    knn_dim: int
    knn_classes: int
    compile_arch: str = "vitb14"


FULL = Sizes(
    device="cuda",
    archs=(("vitb14", "train/IN21K/vitb14"), ("vitl14", "train/IN21K/vitl14")),
    arch_overrides=(),
    batch=32,
    warmup=2,
    repeats=5,
    attention_dim=1024,
    attention_heads=16,
    global_tokens=257,
    local_tokens=50,
    reference_backend="xformers",
    images=64,
    image_size=(375, 500),
    knn_train=100_000,
    knn_queries=10_000,
    knn_dim=1024,
    knn_classes=1000,
)
DRY = Sizes(
    device="cpu",
    archs=(("vit_pico", "train/IN21K/vitb14"),),
    arch_overrides=(
        "student.arch=vit_pico",
        "student.patch_size=8",
        "student.block_chunks=0",
        "crops.global_crops_size=32",
        "crops.local_crops_size=16",
        "crops.local_crops_number=2",
        "dino.head_n_prototypes=256",
        "dino.head_hidden_dim=64",
        "dino.head_bottleneck_dim=32",
        "ibot.head_n_prototypes=256",
        "ibot.head_hidden_dim=64",
        "ibot.head_bottleneck_dim=32",
        "compute_precision.fp32_on_cpu=false",
    ),
    batch=2,
    warmup=1,
    repeats=1,
    attention_dim=64,
    attention_heads=2,
    global_tokens=17,
    local_tokens=5,
    reference_backend="math",
    images=4,
    image_size=(40, 48),
    knn_train=512,
    knn_queries=64,
    knn_dim=32,
    knn_classes=8,
    compile_arch="vit_pico",
)


def _row(check: str, setting: str, status: str = "ok", **metrics) -> dict:
    return {"check": check, "setting": setting, "status": status, **metrics}


# ---------------------------------------------------------------------------------------------- checks


def check_attention(sizes: Sizes) -> list[dict]:
    """xFormers (dry run: the math path) vs SDPA on one packed multi-crop layout, fp16 and bf16."""
    reference = sizes.reference_backend
    if reference == "xformers":
        reason = xformers_failure(torch.device(sizes.device, torch.cuda.current_device()))
        if reason is not None:
            return [_row("attention", "xformers vs sdpa", "skipped", detail=reason)]
    b = sizes.batch
    layout = TokenLayout(((2 * b, sizes.global_tokens), (8 * b, sizes.local_tokens)))
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        generator = torch.Generator(device=sizes.device).manual_seed(0)
        qkv = torch.randn(
            layout.num_tokens, 3 * sizes.attention_dim, generator=generator, device=sizes.device, dtype=dtype
        )
        timed = {}
        outputs = {}
        for backend in (reference, "sdpa"):
            outputs[backend] = packed_attention(qkv, layout, sizes.attention_heads, backend)
            call = partial(packed_attention, qkv, layout, sizes.attention_heads, backend)
            timed[backend] = median(time_fn(call, warmup=sizes.warmup, repeats=sizes.repeats, device=sizes.device))
        sdpa = outputs["sdpa"].float()
        error = float((outputs[reference].float() - sdpa).abs().max() / sdpa.abs().max())
        rows.append(
            _row(
                "attention",
                f"{reference} vs sdpa {str(dtype).removeprefix('torch.')}",
                "ok" if error <= ATTENTION_RTOL[dtype] else "fail",
                rel_error=error,
                seconds=timed[reference],
                sdpa_seconds=timed["sdpa"],
                tokens=layout.num_tokens,
            )
        )
    return rows


def _step_model(config: str, overrides: list[str], sizes: Sizes, graphed: bool = False):
    cfg = load_config_file(config, [f"train.batch_size_per_gpu={sizes.batch}", *sizes.arch_overrides, *overrides])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).to(sizes.device)
    model.train()
    model.prepare_for_distributed_training()
    optimizer = build_optimizer(cfg, model.get_params_groups(), model.fp16_scaler)
    schedule = dict(lr=1e-4, wd=0.04, momentum=0.994, teacher_temp=0.07, last_layer_lr=1e-4)
    apply_optim_scheduler(optimizer, lr=schedule["lr"], wd=schedule["wd"], last_layer_lr=schedule["last_layer_lr"])
    batch = random_collated_batch(cfg, seed=0)
    losses: list[dict[str, float]] = []
    clip = cfg.optim.clip_grad
    if graphed:
        runner = StaticTrainingStep(model, optimizer, clip, capture=sizes.device == "cuda")

        def step() -> None:
            losses.append(runner(batch, iteration=0, **schedule))

    else:

        def step() -> None:
            teacher = dict(teacher_temp=schedule["teacher_temp"], momentum=schedule["momentum"])
            losses.append(training_step(model, optimizer, batch, iteration=0, clip_grad=clip, **teacher))

    return cfg, model, batch, step, losses


def _time_step(label: str, check: str, config: str, overrides: list[str], sizes: Sizes, graphed: bool = False) -> dict:
    """Time the iteration after its first call and ``sizes.warmup - 1`` more (and, graphed, after the eager
    warm-up iterations and the recording, so that only replays are timed)."""
    if sizes.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg, model, batch, step, losses = _step_model(config, overrides, sizes, graphed)
    start = time.perf_counter()
    step()
    synchronize(sizes.device)
    first = time.perf_counter() - start
    warmup = sizes.warmup - 1 + (StaticTrainingStep.WARMUP + 1 if graphed else 0)
    seconds = median(time_fn(step, warmup=warmup, repeats=sizes.repeats, device=sizes.device))
    finite = all(math.isfinite(v) for values in losses for v in values.values())
    scaler = model.fp16_scaler
    row = _row(
        check,
        label,
        "ok" if finite else "fail",
        seconds=seconds,
        first_call_seconds=first,
        img_per_s=sizes.batch / seconds,
        tflops=step_flops(model, cfg, batch) / seconds / 1e12,
        peak_mem_mb=peak_memory_mb(sizes.device),
        first_losses=losses[0],
        loss_scale=None if scaler is None else float(scaler.get_scale()),
    )
    del model
    if sizes.device == "cuda":
        torch.cuda.empty_cache()
    return row


def check_step(sizes: Sizes) -> list[dict]:
    """One training iteration per architecture in the shipped precision (fp16 + scaler) and in bf16."""
    rows = []
    for arch, config in sizes.archs:
        for precision, overrides in (("shipped fp16", []), ("bf16", BF16)):
            rows.append(_time_step(f"{arch} b{sizes.batch} {precision}", "step", config, overrides, sizes))
    return rows


def _first_loss_difference(rows: list[dict], tolerance: float = 2e-2) -> None:
    """Relative difference of the first step's losses of ``rows[1]`` against ``rows[0]``, into ``rows[1]``; a
    bf16 step whose fused or replayed kernels round differently stays within ``tolerance``, a wrong one is O(1)."""
    reference, other = (row["first_losses"] for row in rows)
    difference = max(abs(other[name] - value) / max(abs(value), 1e-6) for name, value in reference.items())
    rows[1]["rel_loss_difference"] = difference
    if difference > tolerance:
        rows[1]["status"] = "fail"


def check_cuda_graph(sizes: Sizes) -> list[dict]:
    """The bf16 iteration eager and replayed from one CUDA graph (dry run: the static step, eagerly)."""
    config = dict(sizes.archs)[sizes.compile_arch]
    graphed = "cuda_graph" if sizes.device == "cuda" else "static step (no CUDA: eager)"
    rows = [
        _time_step(f"{sizes.compile_arch} bf16 eager", "cuda_graph", config, BF16, sizes),
        _time_step(f"{sizes.compile_arch} bf16 {graphed}", "cuda_graph", config, BF16, sizes, graphed=True),
    ]
    _first_loss_difference(rows)
    return rows


def check_compile(sizes: Sizes) -> list[dict]:
    """``train.compile`` off and on for the bf16 iteration; the first step's losses must agree."""
    config = dict(sizes.archs)[sizes.compile_arch]
    rows = [
        _time_step(
            f"{sizes.compile_arch} bf16 compile={flag}", "compile", config, [*BF16, f"train.compile={flag}"], sizes
        )
        for flag in ("false", "true")
    ]
    _first_loss_difference(rows)
    return rows


def check_augment(sizes: Sizes) -> list[dict]:
    """``train.batch_augmentation``: decode a batch of JPEGs on the device and render the multi-crops."""
    from torchvision.io import encode_jpeg

    from franca.data.batch_augmentations import decode_batch

    config = dict(sizes.archs)[sizes.compile_arch]
    cfg = load_config_file(config, ["train.batch_augmentation=true", *sizes.arch_overrides])
    augmentation = build_batch_augmentation(cfg)
    generator = torch.Generator().manual_seed(0)
    height, width = sizes.image_size
    encoded = [encode_jpeg(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator))]
    encoded = encoded * sizes.images
    sources = [f"image{i}.jpg" for i in range(sizes.images)]
    device = torch.device(sizes.device)

    def render() -> tuple[torch.Tensor, torch.Tensor]:
        return augmentation(decode_batch(encoded, sources, device), torch.bfloat16)

    global_crops, local_crops = render()
    seconds = median(time_fn(render, warmup=sizes.warmup, repeats=sizes.repeats, device=sizes.device))
    shapes_ok = global_crops.shape[0] == 2 * sizes.images and global_crops.device.type == device.type
    return [
        _row(
            "augment",
            f"{sizes.images} JPEGs {width}x{height} -> 2x{cfg.crops.global_crops_size} + "
            f"{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
            "ok" if shapes_ok else "fail",
            seconds=seconds,
            img_per_s=sizes.images / seconds,
            local_crops=int(local_crops.shape[0]),
        )
    ]


def check_knn(sizes: Sizes) -> list[dict]:
    """Weighted k-NN (k = 10, 20) on random unit features on the device."""
    from franca.eval.knn import knn_classify

    generator = torch.Generator(device=sizes.device).manual_seed(0)

    def features(n: int) -> torch.Tensor:
        x = torch.randn(n, sizes.knn_dim, generator=generator, device=sizes.device)
        return torch.nn.functional.normalize(x, dim=1)

    train, queries = features(sizes.knn_train), features(sizes.knn_queries)
    train_labels = torch.randint(0, sizes.knn_classes, (sizes.knn_train,), generator=generator, device=sizes.device)
    query_labels = torch.randint(0, sizes.knn_classes, (sizes.knn_queries,), generator=generator, device=sizes.device)

    def classify() -> dict:
        return knn_classify(train, train_labels, queries, query_labels, [10, 20], 0.07, sizes.knn_classes)

    accuracy = classify()
    seconds = median(time_fn(classify, warmup=0, repeats=sizes.repeats, device=sizes.device))
    chance = 100.0 / sizes.knn_classes
    top1 = accuracy[20]["top-1"]
    return [
        _row(
            "knn",
            f"{sizes.knn_queries} queries x {sizes.knn_train} keys, d={sizes.knn_dim}",
            "ok" if 0.0 <= top1 <= 100.0 else "fail",
            seconds=seconds,
            queries_per_s=sizes.knn_queries / seconds,
            top1_random_features=top1,
            chance=chance,
        )
    ]


CHECK_FUNCTIONS: dict[str, Callable[[Sizes], list[dict]]] = {
    "attention": check_attention,
    "step": check_step,
    "compile": check_compile,
    "cuda_graph": check_cuda_graph,
    "augment": check_augment,
    "knn": check_knn,
}


# ---------------------------------------------------------------------------------------------- report


def machine(sizes: Sizes) -> dict:
    """What the figures were measured on (date, CPU, GPU, torch and CUDA versions)."""
    info = machine_info(sizes.device)
    info["torch_cuda"] = torch.version.cuda
    return info


def run_checks(names: list[str], sizes: Sizes) -> list[dict]:
    """Every check in ``names``; one that raises gives a ``fail`` row with the first line of its error."""
    rows = []
    for name in names:
        try:
            rows += CHECK_FUNCTIONS[name](sizes)
        except Exception as error:  # report and go on with the next check
            first_line = (str(error).strip().splitlines() or [""])[0]
            rows.append(_row(name, "-", "fail", detail=f"{type(error).__name__}: {first_line}"))
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per row: check, setting, status, s/call, throughput, the check's own figure."""
    headers = ["check", "setting", "status", "s/call", "throughput", "figure"]
    lines = []
    for row in rows:
        throughput = next(
            (
                f"{row[key]:,.1f} {unit}"
                for key, unit in (("img_per_s", "img/s"), ("queries_per_s", "q/s"))
                if key in row
            ),
            "",
        )
        figure = next(
            (
                f"{key}={row[key]:.3g}"
                for key in ("rel_error", "rel_loss_difference", "tflops", "top1_random_features")
                if isinstance(row.get(key), float)
            ),
            row.get("detail", ""),
        )
        seconds = f"{row['seconds']:.4g}" if "seconds" in row else ""
        lines.append([row["check"], row["setting"], row["status"], seconds, throughput, figure])
    widths = [max(len(str(cells[i])) for cells in [headers, *lines]) for i in range(len(headers))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [headers, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="gpu_check.json", metavar="OUT", help="where the rows go (JSON)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), metavar="CHECK", help=str(CHECKS))
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"error: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "use --dry-run to exercise the checks on the CPU",
            file=sys.stderr,
        )
        return 2
    sizes = DRY if args.dry_run else FULL
    start = time.perf_counter()
    rows = run_checks(args.only, sizes)
    report = {"machine": machine(sizes), "dry_run": args.dry_run, "seconds": time.perf_counter() - start, "rows": rows}
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows in {report['seconds']:.0f} s on {report['machine'].get('gpu', report['machine']['cpu'])}"
    )
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.json}")
    return 1 if any(row["status"] == "fail" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
