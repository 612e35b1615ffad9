"""The whole Franca training iteration: ``SSLMetaArch.forward_backward`` + clip + AdamW + EMA.

One timed call is what ``train.py`` does per iteration after the data arrive: zero the gradients,
``forward_backward`` (teacher targets with Sinkhorn-Knopp, one multi-crop student pass, DINO / iBOT /
KoLeo losses, backward), clip the student gradients, the AdamW step and the teacher EMA, on a
batch of random crops collated with CyclicMask masks.

* CPU: ViT-S/14, Franca heads (Matryoshka, separate iBOT head) with 16 384 prototypes, batch 4,
  2×224 + 8×98 crops, float32 (``quick``: the ``vit_pico`` demo network, 48/24 px crops).
* CUDA: ViT-B/14 and ViT-L/14 at batch 32 with the shipped ``IN21K`` heads (131 072 prototypes),
  bf16 autocast.

FLOPs are counted analytically (2 per multiply-add): the teacher backbone forward on the global
crops, the student backbone forward + backward (3× forward) on all crops, and every linear layer of
the heads on the rows they see (teacher: 2B class tokens and ``upperbound`` patch rows; student: the
same × 3 plus the local class tokens). Sinkhorn-Knopp, the losses, the optimizer and the EMA are
element-wise and not counted, so ``gflops`` (and the MFU derived from it) is a lower bound.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.backbone import vit_forward_flops
from benchmarks.common import median, peak_memory_mb, synchronize, time_fn
from franca.data.synthetic import random_collated_batch
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import build_optimizer
from franca.utils.config import load_config_file

TEACHER_TEMP, MOMENTUM = 0.07, 0.994


def mrl_head_macs_per_row(in_dim: int, n_prototypes: int, nlayers: int, hidden: int, bottleneck: int) -> int:
    """Multiply-adds per input row of a Matryoshka head: per level j (m_j = d/16 … d, K_j = ⌊K·m_j/d⌋),
    the projection d → m_j, the MLP m_j → hidden (→ hidden)* → bottleneck and the prototypes bottleneck → K_j."""
    macs = 0
    for m in (in_dim // 16, in_dim // 8, in_dim // 4, in_dim // 2, in_dim):
        widths = [m] + [hidden] * (nlayers - 1) + [bottleneck]
        macs += (
            in_dim * m + sum(a * b for a, b in zip(widths, widths[1:])) + bottleneck * int(n_prototypes * m / in_dim)
        )
    return macs


def step_flops(model: SSLMetaArch, cfg, batch: dict) -> float:
    """Analytic FLOPs of one ``forward_backward`` (see the module docstring)."""
    backbone = model.student.backbone
    n_global = batch["collated_global_crops"].shape[0]
    n_local = batch["collated_local_crops"].shape[0]
    global_f = vit_forward_flops(backbone, cfg.crops.global_crops_size)
    local_f = vit_forward_flops(backbone, cfg.crops.local_crops_size)
    backbone_flops = n_global * global_f + 3 * (n_global * global_f + n_local * local_f)

    def head_macs(head_cfg) -> int:
        return mrl_head_macs_per_row(
            model.embed_dim,
            head_cfg.head_n_prototypes,
            head_cfg.head_nlayers,
            head_cfg.head_hidden_dim,
            head_cfg.head_bottleneck_dim,
        )

    patch_rows = int(batch["upperbound"])
    dino_rows = n_global + 3 * (n_global + n_local)
    ibot_rows = 4 * patch_rows
    head_flops = 2 * (dino_rows * head_macs(cfg.dino) + ibot_rows * head_macs(cfg.ibot))
    return backbone_flops + head_flops


def _settings(device: str, quick: bool) -> list[tuple[str, str | None, int, list[str]]]:
    """(label, config file, batch, overrides) of each measured setting."""
    if device == "cuda":
        bf16 = [
            f"compute_precision.{net}.{part}.mixed_precision.param_dtype=bf16"
            for net in ("student", "teacher")
            for part in ("backbone", "dino_head", "ibot_head")
        ]
        archs = (
            [("vitb14", "train/IN21K/vitb14")]
            if quick
            else [("vitb14", "train/IN21K/vitb14"), ("vitl14", "train/IN21K/vitl14")]
        )
        return [(label, config, 32, ["compute_precision.grad_scaler=false", *bf16]) for label, config in archs]
    if quick:
        return [("vit_pico_p8_48px", "train/cpu_tiny", 4, [])]
    return [
        (
            "vits14",
            None,
            4,
            [
                "compute_precision.grad_scaler=false",
                "student.arch=vit_small",
                "student.patch_size=14",
                "student.drop_path_rate=0.1",
                "student.block_chunks=0",
                "dino.head_n_prototypes=16384",
                "ibot.head_n_prototypes=16384",
                "ibot.separate_head=true",
                "crops.local_crops_size=98",
            ],
        )
    ]


def _measure(label: str, config: str | None, batch_size: int, overrides: list[str], device: str, quick: bool) -> dict:
    cfg = load_config_file(config, overrides)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).to(device)
    model.prepare_for_distributed_training()
    model.train()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    for group in optimizer.param_groups:
        group.update(lr=1e-4, weight_decay=0.04)
    batch = random_collated_batch(cfg, batch_size=batch_size)
    student_params = [p for p in model.student.parameters() if p.requires_grad]

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
        torch.nn.utils.clip_grad_norm_(student_params, cfg.optim.clip_grad)
        optimizer.step()
        model.update_teacher(MOMENTUM)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_fn(iteration, warmup=1 if quick else 2, repeats=2 if quick else 5, device=device)
    synchronize(device)
    seconds = median(times)
    flops = step_flops(model, cfg, batch)
    return {
        "workload": f"train_step_{label}_b{batch_size}",
        "seconds": seconds,
        "best_seconds": min(times),
        "img_per_s": batch_size / seconds,
        "gflops": flops / seconds / 1e9,
        "peak_mem_mb": peak_memory_mb(device),
        "tflop_per_step": flops / 1e12,
        "device": device,
        "arch": cfg.student.arch,
        "crops": f"2x{cfg.crops.global_crops_size} + {cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
        "prototypes": int(cfg.dino.head_n_prototypes),
        "precision": "bf16 autocast" if device == "cuda" else "fp32",
    }


def run(quick: bool = False) -> list[dict]:
    """One row per setting: the full iteration's median time, images/s, achieved GFLOP/s, peak memory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [_measure(*setting, device=device, quick=quick) for setting in _settings(device, quick)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(quick=parser.parse_args().quick):
        print(json.dumps(row))
