"""The GPU precision paths on CPU: ``compute_precision.fp32_on_cpu=false`` runs CPU autocast, FSDP2 in the
configured dtypes and the fp16 grad scaler, with real gloo processes.

* The shipped policy (fp16 parameters, fp16 backbone / fp32 head gradient reduction, as in the IN21K configs)
  and a bf16 policy train 3 steps through ``franca.train.iteration.training_step`` with finite losses, the
  blocks computing in the low-precision dtype.
* fp16: an inf written into one gradient shard of rank 1 only, at the second step, makes *every* rank skip
  that optimizer step and halve its loss scale (FSDP's sharded scaler all-reduces the inf flag); the steps
  before and after update the weights.
* The teacher's root FSDP unit (patch embedding, tokens, final norm) reshards after its forward: once the
  EMA update changes the teacher, its next forward uses the new weights (FSDP2 before torch 2.8 kept a root
  unit gathered and computed with the pre-EMA weights).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from test_fsdp import BATCH, _init, rank_batch, run_ranks
from tiny_ssl import tiny_ssl_cfg

from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import apply_optim_scheduler, build_optimizer, training_step

STEPS, INF_STEP, INF_RANK = 3, 1, 1
LR, CLIP, INIT_SCALE = 1e-3, 3.0, 2.0**10

POLICIES = {
    "fp16-shipped": (),
    "bf16": tuple(
        f"compute_precision.{role}.{part}.mixed_precision={{param_dtype: bf16, reduce_dtype: fp32, buffer_dtype: fp32}}"
        for role in ("student", "teacher")
        for part in ("backbone", "dino_head", "ibot_head")
    ),
}
BLOCK_DTYPES = {"fp16-shipped": torch.float16, "bf16": torch.bfloat16}


def mixed_cfg(*overrides: str):
    return tiny_ssl_cfg(BATCH, "compute_precision.fp32_on_cpu=false", "student.block_chunks=2", *overrides)


def _build(cfg) -> SSLMetaArch:
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.train()
    model.prepare_for_distributed_training()
    return model


def _local_checksum(model: SSLMetaArch) -> float:
    """Sum of this rank's student parameter shards (changes iff an optimizer step was applied)."""
    with torch.no_grad():
        return sum(float(p.to_local().double().sum()) for p in model.student.parameters())


def _force_inf(model: SSLMetaArch) -> None:
    """Write inf into the first non-empty local gradient shard of this rank."""
    with torch.no_grad():
        grad = next(p.grad.to_local() for p in model.student.parameters() if p.grad.to_local().numel() > 0)
        grad.view(-1)[0] = math.inf


@torch.no_grad()
def _teacher_after_ema(model: SSLMetaArch, images: torch.Tensor) -> dict[str, float]:
    """Teacher forward, then a very different student copied into the teacher (EMA with momentum 0), then the
    teacher forward again: it must now compute what the student computes (root unit resharded, weights
    gathered anew), not what it computed before."""

    def cls(backbone) -> torch.Tensor:
        return backbone.forward_features(images)["x_norm_clstoken"].float()

    before = cls(model.teacher.backbone)
    for param in model.student.parameters():
        param.mul_(-1.0)
    model.update_teacher(0.0)
    after, student = cls(model.teacher.backbone), cls(model.student.backbone)
    return {
        "ema_change": float((after - before).abs().max()),
        "teacher_vs_student": float((after - student).abs().max()),
    }


def _train_worker(rank: int, world_size: int, port: int, overrides: tuple, out: str) -> None:
    _init(rank, world_size, port)
    try:
        cfg = mixed_cfg(*overrides)
        model = _build(cfg)
        if model.fp16_scaler is not None:
            # the default start (2^16) overflows the fp16 backward of the untrained tiny model for its first
            # steps, which the scaler then skips as designed; from 2^10 only the forced inf is skipped
            model.fp16_scaler = type(model.fp16_scaler)("cpu", init_scale=INIT_SCALE)
        optimizer = build_optimizer(cfg, model.get_params_groups(), model.fp16_scaler)
        apply_optim_scheduler(optimizer, lr=LR, wd=0.04, last_layer_lr=LR)
        block_dtypes = []
        model.student.backbone.blocks[0].register_forward_hook(lambda m, i, o: block_dtypes.append(o.dtype))
        forward_backward = model.forward_backward
        steps = []
        for step in range(STEPS):

            def inject(batch, teacher_temp, step=step):
                losses = forward_backward(batch, teacher_temp)
                if step == INF_STEP and rank == INF_RANK and model.fp16_scaler is not None:
                    _force_inf(model)
                return losses

            model.forward_backward = inject
            before = _local_checksum(model)
            scaler = model.fp16_scaler
            losses = training_step(
                model,
                optimizer,
                rank_batch(cfg, 10 * step + rank),
                iteration=step,
                teacher_temp=0.05,
                momentum=0.9,
                clip_grad=CLIP,
            )
            steps.append(
                {
                    "losses": losses,
                    "updated": _local_checksum(model) != before,
                    "scale": None if scaler is None else float(scaler.get_scale()),
                }
            )
        result = {
            "steps": steps,
            "scaler": type(model.fp16_scaler).__name__,
            "block_dtypes": block_dtypes,
            **_teacher_after_ema(model, rank_batch(cfg, 100 + rank)["collated_global_crops"]),
        }
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "policy", ["fp16-shipped", pytest.param("bf16", marks=pytest.mark.slow)]
)  # ~20 s each on a shared 2-core machine
def test_two_ranks_train_in_low_precision_and_skip_an_inf_step_together(policy, tmp_path):
    out = str(tmp_path / "result")
    run_ranks(_train_worker, POLICIES[policy], out)
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for result in results:
        assert set(result["block_dtypes"]) == {BLOCK_DTYPES[policy]}  # not silently fp32
        for step in result["steps"]:
            assert step["losses"] and all(math.isfinite(v) for v in step["losses"].values())
    assert [s["losses"] for s in results[0]["steps"]] == [s["losses"] for s in results[1]["steps"]]  # all-reduced
    for result in results:
        assert result["ema_change"] > 0.1 and result["teacher_vs_student"] == 0.0
    if policy == "bf16":
        assert results[0]["scaler"] == "NoneType"
        assert all(step["updated"] for result in results for step in result["steps"])
        return
    for result in results:
        assert result["scaler"] == "ShardedGradScaler"
        updated = [step["updated"] for step in result["steps"]]
        assert updated == [step != INF_STEP for step in range(STEPS)]
        scales = [step["scale"] for step in result["steps"]]
        assert scales[INF_STEP] == scales[INF_STEP - 1] / 2 and scales[INF_STEP + 1] == scales[INF_STEP]
    assert [s["scale"] for s in results[0]["steps"]] == [s["scale"] for s in results[1]["steps"]]


def test_one_process_grad_scaler_follows_fp32_on_cpu():
    assert _build(tiny_ssl_cfg(BATCH)).fp16_scaler is None  # default: fp32 on CPU, nothing to scale
    scaler = _build(mixed_cfg()).fp16_scaler
    assert type(scaler) is torch.amp.GradScaler and scaler.is_enabled()
    bf16 = "compute_precision.student.backbone.mixed_precision.param_dtype=bf16"
    assert _build(mixed_cfg(bf16)).fp16_scaler is None
