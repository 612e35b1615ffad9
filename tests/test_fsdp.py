"""FSDP2 sharding with real gloo processes on CPU.

* Two ranks, each with half of a batch built by the real collate, give the same losses, the same
  (clipped) gradients and, after one optimizer step and the EMA update, the same full student and teacher
  parameters as one process on the concatenated batch. The parameter comparison uses SGD: AdamW's first
  update is lr·g/(|g|+eps) ≈ lr·sign(g), so an entry whose gradient is rounding noise moves by ±lr on
  either side of the comparison; SGD's update is linear in the gradient, so the parameters inherit the
  gradients' tolerance. The Sinkhorn-Knopp targets are all-reduced across
  ranks and FSDP averages the gradients, so the two computations are the same sums in another order.
  KoLeo is left out (weight 0): its nearest neighbours are taken within each rank's batch (as in
  DINOv2), so it is not a function of the concatenated batch.
* A checkpoint saved by two ranks resumes in one process (full state dict gathered on rank 0, optimizer
  state keyed by parameter name), and the exported teacher is the release format.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_ssl import N_LOCAL, tiny_ssl_cfg

from franca import fsdp
from franca.data.synthetic import random_collated_batch
from franca.fsdp.policy import sharding_plan
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config import load_config_file

WORLD_SIZE = 2
BATCH = 2  # images per rank
TEACHER_TEMP, MOMENTUM, LR = 0.05, 0.9, 1e-3
SGD_LR = 1.0  # the update is the clipped gradient itself (max ~5e-3): a wrong average shows at 1e-3
CLIP = 5e-3  # below the first-step gradient norm of every part (backbone ~7e-3), so clipping is active
TIMEOUT_S = 120
# At initialisation the head outputs are nearly uniform over the prototypes and a gradient is the small
# difference of two nearly equal distributions (student softmax minus target), which turns float32 rounding
# of a different summation order into ~1e-4 relative differences. Scaling the prototype layers' weight_g
# moves the outputs away from uniform; a missing rank, a wrong average or an unreduced target is O(1).
PROTOTYPE_SCALE = 20.0
GRAD_RTOL = 1e-4


def tiny_cfg(*overrides: str):
    fp32 = "{param_dtype: fp32, reduce_dtype: fp32, buffer_dtype: fp32}"
    precision = [
        f"compute_precision.{role}.{part}.mixed_precision={fp32}"
        for role in ("student", "teacher")
        for part in ("backbone", "dino_head", "ibot_head")
    ]
    fixed = ["student.block_chunks=2", "dino.koleo_loss_weight=0.0", "compute_precision.grad_scaler=false"]
    return tiny_ssl_cfg(BATCH, *fixed, *precision, *overrides)


def rank_batch(cfg, rank: int) -> dict:
    """Rank ``rank``'s share: random crops of BATCH images through the real masking and collate."""
    return random_collated_batch(cfg, seed=1000 + rank)


def concatenated_batch(batches: list[dict]) -> dict:
    """The batch one process would collate from all ranks' images (crop-major rows, masks, counts)."""

    def crop_major(key: str, n_crops: int) -> torch.Tensor:
        return torch.cat([b[key][c * BATCH : (c + 1) * BATCH] for c in range(n_crops) for b in batches])

    masks = crop_major("collated_masks", 2)
    indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1, keepdim=True).clamp(min=1).float()
    return {
        "collated_global_crops": crop_major("collated_global_crops", 2),
        "collated_local_crops": crop_major("collated_local_crops", N_LOCAL),
        "collated_masks": masks,
        "mask_indices_list": indices,
        "masks_weight": (1 / per_image).expand_as(masks)[masks],
        "upperbound": sum(b["upperbound"] for b in batches),
        "n_masked_patches": torch.tensor([indices.shape[0]]),
    }


def build_model(cfg) -> SSLMetaArch:
    """The tiny model, its prototype layers scaled up so that the outputs are far from uniform."""
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    with torch.no_grad():
        for name, param in model.student.named_parameters():
            if name.endswith("weight_g"):
                param.mul_(PROTOTYPE_SCALE)
    model.train()
    model.prepare_for_distributed_training()
    return model


def build_optimizer(model: SSLMetaArch, kind: str = "adamw") -> torch.optim.Optimizer:
    groups = model.get_params_groups()
    lr = {"adamw": LR, "sgd": SGD_LR}[kind]
    for group in groups:
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.AdamW(groups)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def one_step(model: SSLMetaArch, optimizer: torch.optim.Optimizer, batch: dict) -> dict:
    """forward_backward → per-part clip → AdamW → EMA; losses averaged over ranks, gradients gathered."""
    losses = model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
    names = sorted(losses)
    values = torch.stack([losses[n] for n in names])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    norms = {
        part: _full(torch.nn.utils.clip_grad_norm_(model.student[part].parameters(), CLIP)).item()
        for part in model.student.keys()
    }
    grads = {n: _full(p.grad).clone() for n, p in model.student.named_parameters() if p.grad is not None}
    optimizer.step()
    model.update_teacher(MOMENTUM)
    return {"losses": dict(zip(names, values.tolist())), "norms": norms, "grads": grads}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn, *args, world_size: int = WORLD_SIZE, timeout: float = TIMEOUT_S) -> None:
    """Start ``fn(rank, world_size, port, *args)`` in ``world_size`` spawned processes; fail past ``timeout``."""
    ctx = mp.start_processes(
        fn, args=(world_size, free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{world_size} ranks did not finish within {timeout} s")


def _init(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _parity_worker(rank: int, world_size: int, port: int, overrides: tuple, out: str) -> None:
    _init(rank, world_size, port)
    try:
        cfg = tiny_cfg(*overrides)
        model = build_model(cfg)
        assert fsdp.is_sharded(model.student) and fsdp.is_sharded(model.teacher)
        result = one_step(model, build_optimizer(model, "sgd"), rank_batch(cfg, rank))
        result["state"] = fsdp.full_state_dict(model)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _reference(overrides: tuple, kind: str = "adamw") -> tuple[SSLMetaArch, torch.optim.Optimizer, dict]:
    """One process, one step on the concatenated batch."""
    cfg = tiny_cfg(*overrides)
    model = build_model(cfg)
    optimizer = build_optimizer(model, kind)
    batch = concatenated_batch([rank_batch(cfg, r) for r in range(WORLD_SIZE)])
    return model, optimizer, one_step(model, optimizer, batch)


SETTINGS = {
    "chunks-shard_grad_op": (),
    "flat-full_shard-shared_head": (
        "student.block_chunks=0",
        "ibot.separate_head=false",
        *(
            f"compute_precision.{r}.{p}.sharding_strategy=FULL_SHARD"
            for r in ("student", "teacher")
            for p in (
                "backbone",
                "dino_head",
                "ibot_head",
            )
        ),
    ),
    "no_shard-heads": tuple(
        f"compute_precision.{r}.{p}.sharding_strategy=NO_SHARD"
        for r in ("student", "teacher")
        for p in ("dino_head", "ibot_head")
    ),
}


# ~30 s per setting on a shared 2-core machine: the default one is fast, the other layouts are slow tests
@pytest.mark.parametrize(
    "setting",
    [name if name == "chunks-shard_grad_op" else pytest.param(name, marks=pytest.mark.slow) for name in SETTINGS],
)
def test_two_ranks_match_one_process_on_the_concatenated_batch(setting, tmp_path):
    overrides = SETTINGS[setting]
    out = tmp_path / "two_ranks.pt"
    run_ranks(_parity_worker, overrides, str(out))
    sharded = torch.load(out, weights_only=True)
    model, _, reference = _reference(overrides, "sgd")

    assert set(sharded["losses"]) == {"dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"}
    for name, value in reference["losses"].items():
        assert sharded["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for part, norm in reference["norms"].items():
        assert norm > CLIP  # the clip is active, so the gradients below are the clipped ones
        assert sharded["norms"][part] == pytest.approx(norm, rel=GRAD_RTOL), part
    assert sharded["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(sharded["grads"][name], grad, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale, msg=name)
    expected = model.state_dict()
    assert sharded["state"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(sharded["state"][name], value, rtol=0, atol=1e-5, msg=name)
    # the step moved the student and the EMA moved the teacher
    moved = next(k for k in expected if k.startswith("student.backbone.blocks"))
    assert not torch.equal(expected[moved], expected[moved.replace("student.", "teacher.", 1)])


def _checkpoint_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    _init(rank, world_size, port)
    try:
        cfg = tiny_cfg()
        model = build_model(cfg)
        optimizer = build_optimizer(model)
        one_step(model, optimizer, rank_batch(cfg, rank))
        state = {
            "model": fsdp.ModelCheckpointState(model).state_dict(),
            "optimizer": fsdp.OptimizerCheckpointState(model, optimizer).state_dict(),
        }
        if rank == 0:
            torch.save(state, Path(out_dir) / "checkpoint.pth")
        else:
            assert not state["model"] and not state["optimizer"]  # gathered on rank 0 only
        fsdp.export_teacher(model, Path(out_dir) / "teacher_checkpoint.pth")
        second = one_step(model, optimizer, rank_batch(cfg, 10 + rank))
        if rank == 0:
            torch.save(second["losses"], Path(out_dir) / "second_step_losses.pth")
    finally:
        dist.destroy_process_group()


def test_checkpoint_saved_by_two_ranks_resumes_in_one_process(tmp_path):
    run_ranks(_checkpoint_worker, str(tmp_path))
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)

    # what one process computes for the same first step: the gathered Adam moments are the full ones
    reference_model, reference_optimizer, _ = _reference(())
    assert saved["model"].keys() == reference_model.state_dict().keys()
    assert saved["optimizer"]["state"].keys() == {"student." + n for n, _ in reference_model.student.named_parameters()}
    for name, param in reference_model.student.named_parameters():
        expected = reference_optimizer.state[param]["exp_avg"]  # 0.1 × the clipped full gradient
        scale = expected.abs().max().item()
        gathered = saved["optimizer"]["state"]["student." + name]["exp_avg"]
        torch.testing.assert_close(gathered, expected, rtol=GRAD_RTOL, atol=GRAD_RTOL * scale, msg=name)

    cfg = tiny_cfg()
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    model = SSLMetaArch(cfg)
    model.train()
    optimizer = build_optimizer(model)
    fsdp.ModelCheckpointState(model).load_state_dict(saved["model"])
    fsdp.OptimizerCheckpointState(model, optimizer).load_state_dict(saved["optimizer"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][name], rtol=0, atol=0, msg=name)
    for name, param in model.student.named_parameters():
        loaded, stored = optimizer.state[param], saved["optimizer"]["state"]["student." + name]
        assert loaded["exp_avg"].shape == param.shape, name  # full tensors, not one rank's shard
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(loaded[key], stored[key], rtol=0, atol=0, msg=f"{name} {key}")

    teacher = torch.load(tmp_path / "teacher_checkpoint.pth", weights_only=True)
    assert list(teacher) == ["teacher"]
    expected = {k.removeprefix("teacher."): v for k, v in saved["model"].items() if k.startswith("teacher.")}
    assert teacher["teacher"].keys() == expected.keys()
    assert "backbone.blocks.1.1.attn.qkv.weight" in teacher["teacher"]  # chunked official key layout
    for name, value in expected.items():
        torch.testing.assert_close(teacher["teacher"][name], value, rtol=0, atol=0, msg=name)

    # the resumed process continues the run: same second-step losses as the two ranks, Adam at step 2
    second = one_step(model, optimizer, concatenated_batch([rank_batch(cfg, 10 + r) for r in range(WORLD_SIZE)]))
    two_ranks = torch.load(tmp_path / "second_step_losses.pth", weights_only=True)
    for name, value in second["losses"].items():
        assert two_ranks[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert int(optimizer.state[model.student.backbone.cls_token]["step"]) == 2


def test_sharding_plans_follow_compute_precision():
    cfg = load_config_file(None, ["compute_precision.student.backbone.sharding_strategy=FULL_SHARD"])
    precision = cfg.compute_precision
    gpu = sharding_plan(precision.student.backbone, device_type="cuda")
    assert gpu.reshard_after_forward and not gpu.replicate
    assert (gpu.mp_policy.param_dtype, gpu.mp_policy.reduce_dtype, gpu.buffer_dtype) == (
        torch.float16,
        torch.float16,
        torch.float32,
    )
    head = sharding_plan(precision.student.dino_head, device_type="cuda")
    assert not head.reshard_after_forward and head.mp_policy.reduce_dtype == torch.float32
    cpu = sharding_plan(precision.student.backbone, device_type="cpu")
    assert cpu.mp_policy.param_dtype == cpu.mp_policy.reduce_dtype == cpu.buffer_dtype == torch.float32
    bad = {"sharding_strategy": "HYBRID", "mixed_precision": precision.student.backbone.mixed_precision}
    with pytest.raises(ValueError, match=r"student.backbone.sharding_strategy is 'HYBRID', must be one of"):
        sharding_plan(bad, device_type="cuda", where="compute_precision.student.backbone")


def test_shard_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        fsdp.shard_ssl_meta_arch(SSLMetaArch(tiny_cfg()))


def test_student_and_teacher_must_agree_on_no_shard(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = SSLMetaArch(tiny_cfg("compute_precision.teacher.dino_head.sharding_strategy=NO_SHARD"))
        message = "compute_precision.student.dino_head and compute_precision.teacher.dino_head must both be NO_SHARD"
        with pytest.raises(ValueError, match=message):
            fsdp.shard_ssl_meta_arch(model)
    finally:
        dist.destroy_process_group()
