"""franca.train.train in-process: schedules, optimizer groups, the loop's outputs, resume, NaN stop, high-res FT."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import franca.models.vision_transformer as vits
from franca.data.datasets.demo import write_demo_dataset
from franca.hub.loading import load_backbone_weights
from franca.models import build_model_from_cfg
from franca.models.vision_transformer import DinoVisionTransformer
from franca.train import train as train_module
from franca.train.checkpointing import list_checkpoints
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import (
    NonFiniteLossError,
    apply_optim_scheduler,
    build_optimizer,
    build_schedulers,
    do_train,
)
from franca.utils.config import apply_scaling_rules_to_cfg, load_config_file

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")

# A 64-wide, 2-block ViT registered under a new name, as the contract allows (resolved at call time).
TINY_ARCH_SOURCE = """
import franca.models.vision_transformer as _vits
def vit_test_tiny(**kwargs):
    return _vits.DinoVisionTransformer(embed_dim=64, depth=2, num_heads=2, **kwargs)
_vits.vit_test_tiny = vit_test_tiny
"""


def vit_test_tiny(**kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(embed_dim=64, depth=2, num_heads=2, **kwargs)


def tiny_overrides(data_root: Path, output_dir: Path, **extra) -> list[str]:
    """cpu_tiny shrunk to seconds: 64-wide ViT, 32/16 px crops, batch 4, epochs of 2 iterations."""
    values = {
        "student.arch": "vit_test_tiny",
        "train.dataset_path": f"ImageFolder:root={data_root}/train",
        "train.output_dir": str(output_dir),
        "train.batch_size_per_gpu": 4,
        "train.num_workers": 0,
        "train.OFFICIAL_EPOCH_LENGTH": 2,
        "train.saveckp_freq": 1,
        "crops.global_crops_size": 32,
        "crops.local_crops_size": 16,
        "crops.local_crops_number": 2,
        "dino.head_n_prototypes": 64,
        "ibot.head_n_prototypes": 64,
        "dino.head_hidden_dim": 64,
        "ibot.head_hidden_dim": 64,
        "dino.head_bottleneck_dim": 32,
        "ibot.head_bottleneck_dim": 32,
        "optim.epochs": 2,
        "optim.warmup_epochs": 1,
        "teacher.warmup_teacher_temp_epochs": 1,
        "evaluation.eval_period_iterations": 2,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, image_size=32)


@pytest.fixture
def tiny_arch(monkeypatch):
    monkeypatch.setattr(vits, "vit_test_tiny", vit_test_tiny, raising=False)


def _cfg(demo_root: Path, output_dir: Path, **extra):
    cfg = load_config_file("train/cpu_tiny", tiny_overrides(demo_root, output_dir, **extra))
    return apply_scaling_rules_to_cfg(cfg, world_size=1)


def _model(cfg) -> SSLMetaArch:
    torch.manual_seed(cfg.train.seed)
    model = SSLMetaArch(cfg)
    model.prepare_for_distributed_training()
    return model


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "training_metrics.json").read_text().splitlines()]


def _deterministic_fields(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("iter_time", "data_time", "img_per_s", "max_mem_mb")}


# ---------------------------------------------------------------------------------------------- schedules


def test_build_schedulers_shapes_and_values(demo_root, tmp_path):
    cfg = _cfg(demo_root, tmp_path, **{"train.OFFICIAL_EPOCH_LENGTH": 10, "optim.epochs": 10, "optim.warmup_epochs": 2})
    cfg.teacher.warmup_teacher_temp_epochs = 3
    lr, wd, mom, temp, last = build_schedulers(cfg)
    peak = cfg.optim.lr
    assert peak == pytest.approx(5e-3 * math.sqrt(4 / 1024))
    # lr: linear warm-up 0 -> peak over 20 iterations, then cosine to min_lr
    assert lr[0] == 0.0 and lr[19] == pytest.approx(peak) and lr[20] == pytest.approx(peak)
    assert lr[10] == pytest.approx(peak * 10 / 19)
    assert lr[60] == pytest.approx(
        cfg.optim.min_lr + 0.5 * (peak - cfg.optim.min_lr) * (1 + math.cos(math.pi * 40 / 80))
    )
    assert lr[10_000] == cfg.optim.min_lr
    # last-layer lr: the lr with the first freeze_last_layer_epochs (1) epochs at 0
    assert [last[i] for i in range(10)] == [0.0] * 10
    assert all(last[i] == lr[i] for i in range(10, 100))
    # wd and momentum: cosine over the whole run, no warm-up
    assert wd[0] == pytest.approx(cfg.optim.weight_decay) and wd[100] == cfg.optim.weight_decay_end
    assert wd[50] == pytest.approx((cfg.optim.weight_decay + cfg.optim.weight_decay_end) / 2)
    assert mom[0] == pytest.approx(cfg.teacher.momentum_teacher) and mom[100] == 1.0
    # teacher temperature: linear warm-up over 30 iterations, then constant
    assert temp[0] == pytest.approx(cfg.teacher.warmup_teacher_temp)
    assert temp[29] == pytest.approx(cfg.teacher.teacher_temp) and temp[5000] == cfg.teacher.teacher_temp


def test_optimizer_and_apply_scheduler(demo_root, tmp_path, tiny_arch):
    cfg = _cfg(demo_root, tmp_path, **{"optim.patch_embed_lr_mult": 0.2})
    model = _model(cfg)
    optimizer = build_optimizer(cfg, model.get_params_groups())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2)
    assert all(group["fused"] for group in optimizer.param_groups)
    n_params = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_params
    apply_optim_scheduler(optimizer, lr=1.0, wd=0.5, last_layer_lr=0.25)
    kinds = set()
    for group in optimizer.param_groups:
        base = 0.25 if group["is_last_layer"] else 1.0
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.5 * group["wd_multiplier"])
        kinds.add((group["is_last_layer"], group["lr_multiplier"], group["wd_multiplier"]))
    assert (True, 1.0, 1.0) in kinds  # prototype layers
    assert (False, 1.0, 0.0) in kinds  # biases / norms: no weight decay
    assert any(not last and lr_mult == pytest.approx(0.2) for last, lr_mult, _ in kinds)  # patch embedding


# ---------------------------------------------------------------------------------------------- the loop


def test_do_train_writes_metrics_checkpoints_and_release_teacher(demo_root, tmp_path, tiny_arch):
    cfg = _cfg(demo_root, tmp_path, **{"train.checkpoint_keep_last": 1})
    model = _model(cfg)
    initial = {k: v.clone() for k, v in model.student.state_dict().items()}
    averages = do_train(cfg, model, log_period=1)
    assert set(LOSS_KEYS) <= set(averages)

    records = _records(tmp_path)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    lr, wd, mom, temp, last = build_schedulers(cfg)
    for r in records:
        it = r["iteration"]
        assert r["lr"] == lr[it] and r["wd"] == wd[it] and r["mom"] == mom[it] and r["teacher_temp"] == temp[it]
        assert r["last_layer_lr"] == last[it]
        assert r["total_loss"] == pytest.approx(sum(r[k] for k in LOSS_KEYS))
        assert all(math.isfinite(r[k]) for k in LOSS_KEYS)
        assert r["img_per_s"] > 0 and 0 <= r["data_time"] <= r["iter_time"] and r["max_mem_mb"] > 0
        assert r["current_batch_size"] == 4

    # checkpoints every 2 iterations, keep last 1; it holds everything a resume needs
    assert [it for it, _ in list_checkpoints(tmp_path)] == [3]
    data = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    assert {"model", "optimizer", "iteration", "sampler_advance", "rng"} <= set(data)
    assert data["iteration"] == 3 and data["sampler_advance"] == 16
    assert set(data["rng"][0]) == {"python", "numpy", "torch", "cuda"}

    # release-format teachers at iterations 1 and 3 load through the hub reader into a fresh backbone
    for it in (1, 3):
        path = tmp_path / "eval" / f"training_{it}" / "teacher_checkpoint.pth"
        release = torch.load(path, weights_only=True)
        assert list(release) == ["teacher"]
        assert any(k.startswith("dino_head.") for k in release["teacher"])
        backbone, _ = build_model_from_cfg(cfg, only_teacher=True)
        load_backbone_weights(backbone, str(path))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, model.teacher.backbone.state_dict()[key])

    # the student moved; the teacher is an EMA of it: strictly between initial and current student
    final = model.student.state_dict()
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(final[key], initial[key])
    teacher = model.teacher.state_dict()[key]
    assert not torch.equal(teacher, final[key]) and not torch.equal(teacher, initial[key])


def test_resume_matches_uninterrupted(demo_root, tmp_path, tiny_arch):
    """Drop the last checkpoint of a finished run, resume: iterations 4-5 are recomputed bit for bit."""
    full = tmp_path / "full"
    cfg = _cfg(demo_root, full, **{"optim.epochs": 3, "train.checkpoint_keep_last": 5})
    do_train(cfg, _model(cfg), log_period=1)
    expected = [_deterministic_fields(r) for r in _records(full)]
    assert [r["iteration"] for r in expected] == list(range(6))

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "model_0000005.pth").unlink()
    cfg = _cfg(demo_root, resumed, **{"optim.epochs": 3, "train.checkpoint_keep_last": 5})
    do_train(cfg, _model(cfg), log_period=1)  # a fresh model: everything comes from model_0000003.pth
    got = [_deterministic_fields(r) for r in _records(resumed)]
    assert got == expected  # JSON lines of the recomputed iterations replaced, values identical
    a = torch.load(full / "model_0000005.pth", weights_only=True)["model"]
    b = torch.load(resumed / "model_0000005.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_resume_starts_over_and_removes_old_checkpoints(demo_root, tmp_path, tiny_arch):
    cfg = _cfg(demo_root, tmp_path, **{"optim.epochs": 1})
    do_train(cfg, _model(cfg), log_period=1)
    (tmp_path / "model_0000009.pth").write_bytes((tmp_path / "model_0000001.pth").read_bytes())
    do_train(cfg, _model(cfg), resume=False, log_period=1)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1]
    assert [r["iteration"] for r in _records(tmp_path)] == [0, 1]


def test_nan_loss_stops_before_the_step_and_keeps_last_checkpoint(demo_root, tmp_path, tiny_arch, monkeypatch):
    cfg = _cfg(demo_root, tmp_path, **{"optim.epochs": 3})
    model = _model(cfg)
    real_forward_backward = model.forward_backward
    calls = []
    snapshot = {}

    def poisoned(batch, teacher_temp):
        losses = real_forward_backward(batch, teacher_temp)
        calls.append(len(calls))
        if len(calls) == 3:  # iteration 2
            snapshot.update({k: v.clone() for k, v in model.student.state_dict().items()})
            losses["ibot_loss"] = torch.tensor(float("nan"))
            losses["koleo_loss"] = torch.tensor(float("inf"))
        return losses

    monkeypatch.setattr(model, "forward_backward", poisoned)
    with pytest.raises(NonFiniteLossError) as error:
        do_train(cfg, model, log_period=1)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("non-finite loss at iteration 2: dino_local_crops_loss=")
    assert "koleo_loss=inf" in message and "ibot_loss=nan" in message
    assert [it for it, _ in list_checkpoints(tmp_path)] == [1]
    for key, value in model.student.state_dict().items():  # no optimizer step with the bad gradients
        assert torch.equal(value, snapshot[key])


def test_high_resolution_finetune_restarts_from_pretrained(demo_root, tmp_path, tiny_arch):
    modify_main = _load_script("modify_ckpt_highres").main
    low = tmp_path / "low"
    cfg = _cfg(demo_root, low, **{"optim.epochs": 1})
    do_train(cfg, _model(cfg), log_period=1)
    highres_file = tmp_path / "teacher_48.pth"
    modify_main(
        [
            f"--checkpoint_path={low / 'eval' / 'training_1' / 'teacher_checkpoint.pth'}",
            f"--output_path={highres_file}",
            "--target_img_size=48",
            "--target_patch_size=8",
        ]
    )

    high = tmp_path / "high"
    overrides = {
        "crops.global_crops_size": 48,
        "optim.epochs": 1,
        "student.pretrained_weights": str(highres_file),
        "train.high_resolution_finetune": "true",
    }
    cfg = _cfg(demo_root, high, **overrides)
    model = _model(cfg)
    pretrained = torch.load(highres_file, weights_only=True)["teacher"]
    for name in ("pos_embed", "blocks.1.mlp.fc2.weight"):
        assert torch.equal(model.student.backbone.state_dict()[name], pretrained[f"backbone.{name}"])
        assert torch.equal(model.teacher.backbone.state_dict()[name], pretrained[f"backbone.{name}"])
    do_train(cfg, model, log_period=1)
    assert [r["iteration"] for r in _records(high)] == [0, 1]
    assert _records(high)[0]["lr"] == 0.0  # schedules restart too

    cfg = _cfg(demo_root, tmp_path / "bad", **{"train.high_resolution_finetune": "true"})
    with pytest.raises(ValueError, match="high_resolution_finetune=true needs student.pretrained_weights"):
        do_train(cfg, _model(cfg))


def test_model_weights_start(demo_root, tmp_path, tiny_arch):
    """MODEL.WEIGHTS: a training checkpoint's model, continuing its iteration count (no optimizer state)."""
    first = tmp_path / "first"
    cfg = _cfg(demo_root, first, **{"optim.epochs": 1})
    do_train(cfg, _model(cfg), log_period=1)
    second = tmp_path / "second"
    cfg = _cfg(demo_root, second, **{"optim.epochs": 2, "MODEL.WEIGHTS": str(first / "model_0000001.pth")})
    do_train(cfg, _model(cfg), log_period=1)
    assert [r["iteration"] for r in _records(second)] == [2, 3]
    cfg = _cfg(
        demo_root, tmp_path / "third", **{"MODEL.WEIGHTS": str(first / "eval/training_1/teacher_checkpoint.pth")}
    )
    with pytest.raises(KeyError, match="is not a training checkpoint"):
        do_train(cfg, _model(cfg))


def test_metrics_truncation_drops_cut_lines(tmp_path):
    path = tmp_path / "training_metrics.json"
    path.write_text('{"iteration": 0}\n{"iteration": 1}\n{"iteration": 2}\n{"iterat')
    train_module._truncate_metrics(path, 2)
    assert path.read_text() == '{"iteration": 0}\n{"iteration": 1}\n'


def test_modify_ckpt_highres_resizes_pos_embed(tmp_path):
    script = _load_script("modify_ckpt_highres")
    grid = torch.arange(16.0).reshape(1, 4, 4, 1).expand(1, 4, 4, 3).reshape(1, 16, 3)
    pos_embed = torch.cat([torch.full((1, 1, 3), -7.0), grid], dim=1)
    assert torch.allclose(script.resize_pos_embed(pos_embed, 4), pos_embed, atol=1e-5)  # same grid: unchanged
    resized = script.resize_pos_embed(pos_embed, 8)
    assert resized.shape == (1, 65, 3)
    assert torch.equal(resized[:, 0], pos_embed[:, 0])  # class position kept
    rows = resized[0, 1:, 0].reshape(8, 8)
    assert torch.all(rows[:, 1:] >= rows[:, :-1]) and torch.all(rows[1:] >= rows[:-1])  # the ramp stays a ramp
    with pytest.raises(ValueError, match="15 patch positions, not a square grid"):
        script.resize_pos_embed(pos_embed[:, :16], 8)

    source = tmp_path / "teacher.pth"
    torch.save({"teacher": {"backbone.pos_embed": pos_embed, "backbone.cls_token": torch.ones(1, 1, 3)}}, source)
    sizes = ["--target_img_size=112", "--target_patch_size=14"]
    out = script.main([f"--checkpoint_path={source}", f"--output_path={tmp_path / 'o' / 'hr.pth'}", *sizes])
    converted = torch.load(out, weights_only=True)["teacher"]
    assert converted["backbone.pos_embed"].shape == (1, 65, 3)
    assert torch.equal(converted["backbone.cls_token"], torch.ones(1, 1, 3))

    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        script.main([f"--checkpoint_path={tmp_path / 'missing.pth'}", f"--output_path={tmp_path / 'x.pth'}"])
    with pytest.raises(KeyError, match="has no 'model' entry; entries: teacher"):
        script.main([f"--checkpoint_path={source}", f"--output_path={tmp_path / 'x.pth'}", "--teacher_key=model"])
    with pytest.raises(ValueError, match="518 is not a multiple of target_patch_size 16"):
        script.main([f"--checkpoint_path={source}", f"--output_path={tmp_path / 'x.pth'}", "--target_patch_size=16"])
