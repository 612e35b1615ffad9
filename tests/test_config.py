"""Config loading: shipped configs, validation errors, lr scaling, written config, schedules."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from franca.configs import available_configs, franca_default_config, load_config
from franca.train.schedules import CosineScheduler
from franca.utils.config import (
    ConfigError,
    apply_scaling_rules_to_cfg,
    get_cfg_from_args,
    load_and_merge_config,
    load_config_file,
    write_config,
)

SHIPPED = {
    "train/IN21K/vitb14": ("vit_base", 768),
    "train/IN21K/vitl14": ("vit_large", 1024),
    "train/IN21K/vitg14": ("vit_giant2", 1536),
    "train/LAION/vitl14": ("vit_large", 1024),
    "train/LAION/vitg14": ("vit_giant2", 1536),
    "finetune/vitb14_finetune": ("vit_base", 768),
    "finetune/vitl14_finetune": ("vit_large", 1024),
}


def build_model_from_cfg(cfg, only_teacher=False):
    from franca.models import build_model_from_cfg as build

    return build(cfg, only_teacher=only_teacher)


def _write_yaml(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_is_listed():
    assert set(SHIPPED) | {"train/cpu_tiny"} == set(available_configs())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_and_builds_on_meta(name):
    arch, embed_dim = SHIPPED[name]
    cfg = load_and_merge_config(name)
    assert cfg.student.arch == arch
    assert cfg.student.patch_size == 14
    assert cfg.dino.MRL is True
    assert cfg.train.centering == "sinkhorn_knopp"
    assert cfg.train.use_inverse_block and cfg.train.roll
    with torch.device("meta"):
        student, teacher, dim = build_model_from_cfg(cfg)
    assert dim == embed_dim
    assert student.patch_size == 14 and student.n_blocks == teacher.n_blocks
    assert all(p.is_meta for p in student.parameters())
    # the chunked layout of the official release files
    assert any(k.startswith("blocks.3.") for k in student.state_dict())


def test_vitg_parameter_count_on_meta():
    cfg = load_and_merge_config("train/IN21K/vitg14")
    assert "MRL" not in load_config("train/IN21K/vitg14").dino  # the official file omits it
    with torch.device("meta"):
        teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    n_params = sum(p.numel() for p in teacher.parameters())
    assert 1.0e9 < n_params < 1.2e9


def test_official_values_survive_the_merge():
    cfg = load_and_merge_config("train/LAION/vitl14")
    assert cfg.optim.base_lr == pytest.approx(1.0e-3)
    assert list(cfg.crops.global_crops_scale) == [0.48, 1.0]
    assert cfg.crops.local_crops_size == 98
    assert cfg.dino.head_n_prototypes == 131072 and cfg.ibot.separate_head
    # untouched defaults come from the default config
    assert cfg.optim.layerwise_decay == 1.0 and cfg.optim.patch_embed_lr_mult == 0.2
    assert cfg.teacher.final_momentum_teacher == 1.0
    ft = load_and_merge_config("finetune/vitl14_finetune")
    assert ft.crops.global_crops_size == 518 and ft.train.OFFICIAL_EPOCH_LENGTH == 200


def test_default_config_defines_franca_keys():
    d = franca_default_config
    assert d.dino.MRL is True and d.dino.mrl_projection == "linear"
    assert d.train.centering == "sinkhorn_knopp"
    assert d.train.use_block_masking and d.train.use_inverse_block and d.train.roll
    assert d.train.high_resolution_finetune is False
    assert d.ibot.sk_exclude_padding is False


def test_cpu_tiny_builds_a_small_model():
    cfg = load_and_merge_config("train/cpu_tiny")
    student, teacher, dim = build_model_from_cfg(cfg)
    n_params = sum(p.numel() for p in student.parameters())
    assert n_params < 3_000_000
    x = torch.randn(2, 3, cfg.crops.global_crops_size, cfg.crops.global_crops_size)
    assert student.forward_features(x)["x_norm_clstoken"].shape == (2, dim)
    assert cfg.compute_precision.student.backbone.mixed_precision.param_dtype == "fp32"


def test_overrides_merge_over_file_and_default():
    cfg = load_config_file(
        "train/IN21K/vitb14",
        ["optim.base_lr=1e-3", "crops.local_crops_number=4", "ibot.mask_ratio_min_max=[0.2,0.5]", "optim.epochs=2"],
    )
    assert cfg.optim.base_lr == pytest.approx(1e-3)
    assert cfg.crops.local_crops_number == 4
    assert list(cfg.ibot.mask_ratio_min_max) == [0.2, 0.5]
    assert cfg.optim.epochs == 2
    assert cfg.student.arch == "vit_base"  # from the file
    assert cfg.optim.min_lr == pytest.approx(1e-6)  # from the default


def test_int_is_promoted_where_a_float_is_expected():
    cfg = load_config_file(None, ["optim.base_lr=1", "crops.global_crops_scale=[0,1]"])
    assert isinstance(cfg.optim.base_lr, float) and cfg.optim.base_lr == 1.0
    assert all(isinstance(v, float) for v in cfg.crops.global_crops_scale)


def test_empty_override_gives_empty_string():
    cfg = load_config_file("finetune/vitb14_finetune", ["student.pretrained_weights="])
    assert cfg.student.pretrained_weights == ""


@pytest.mark.parametrize(
    ("override", "bad", "suggestion"),
    [
        ("optim.base_lrr=1e-3", "optim.base_lrr", "optim.base_lr"),
        ("train.patch_size=14", "train.patch_size", "student.patch_size"),
        ("dino.mrl=false", "dino.mrl", "dino.MRL"),
        ("crop.local_crops_number=2", "crop", "crops"),
    ],
)
def test_unknown_override_key_names_closest(override, bad, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config_file(None, [override])
    message = str(info.value)
    assert f"'{bad}'" in message and f"did you mean '{suggestion}'" in message
    assert "\n" not in message


def test_unknown_key_in_file_names_file_and_closest(tmp_path):
    path = _write_yaml(tmp_path, "train:\n  batch_size_per_gpus: 8\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'train.batch_size_per_gpu.' in config file .*cfg\.yaml.*"
        r"did you mean 'train.batch_size_per_gpu'",
    ):
        load_config_file(path)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.batch_size_per_gpu=abc", "train.batch_size_per_gpu", "must be int"),
        ("train.batch_size_per_gpu=3.5", "train.batch_size_per_gpu", "must be int"),
        ("dino.MRL=1", "dino.MRL", "must be bool"),
        ("optim.base_lr=true", "optim.base_lr", "must be float"),
        ("crops.global_crops_scale=0.3", "crops.global_crops_scale", "must be a list"),
        ("crops.local_crops_scale=[a,1.0]", r"crops.local_crops_scale\[0\]", "must be float"),
        ("student=vit_base", "student", "must be a mapping"),
        ("optim.lr.x=1", "optim.lr", "must be float"),
    ],
)
def test_wrong_type_override_is_one_error(override, key, expected):
    with pytest.raises(ConfigError, match=rf"config key '{key}' .*{expected}"):
        load_config_file(None, [override])


def test_wrong_type_in_file(tmp_path):
    path = _write_yaml(tmp_path, "optim:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"config key 'optim.epochs' in config file .* must be int .* got str 'ten'"):
        load_config_file(path)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.centering=sinkhorn", r"'train.centering' .* did you mean 'sinkhorn_knopp'"),
        ("optim.scaling_rule=linear", r"'optim.scaling_rule' .* must be one of sqrt_wrt_1024, linear_wrt_256"),
        ("compute_precision.student.backbone.mixed_precision.param_dtype=fp8", r"param_dtype' is 'fp8'"),
    ],
)
def test_bad_choice(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config_file(None, [override])


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"override 'optim.base_lr' is not of the form key=value"):
        load_config_file(None, ["optim.base_lr"])


def test_missing_config_file_suggests_shipped_name():
    with pytest.raises(FileNotFoundError, match=r"'train/IN21K/vitb16' does not exist.*'train/IN21K/vitb14'"):
        load_config_file("train/IN21K/vitb16")


@pytest.mark.parametrize("world_size", [1, 8, 64])
def test_sqrt_scaling_rule(world_size):
    cfg = load_config_file("train/IN21K/vitb14")
    apply_scaling_rules_to_cfg(cfg, world_size=world_size)
    assert cfg.optim.lr == pytest.approx(7.01e-4 * math.sqrt(32 * world_size / 1024))


def test_sqrt_rule_at_reference_batch_is_identity():
    cfg = load_config_file(None, ["train.batch_size_per_gpu=128"])
    apply_scaling_rules_to_cfg(cfg, world_size=8)  # 1024 images
    assert cfg.optim.lr == pytest.approx(cfg.optim.base_lr)


def test_linear_scaling_rule():
    cfg = load_config_file(
        None, ["optim.scaling_rule=linear_wrt_256", "optim.base_lr=5e-4", "train.batch_size_per_gpu=64"]
    )
    apply_scaling_rules_to_cfg(cfg, world_size=2)
    assert cfg.optim.lr == pytest.approx(5e-4 * 128 / 256)


def test_scaling_uses_single_process_world_size_by_default():
    cfg = load_config_file(None, ["train.batch_size_per_gpu=256"])
    apply_scaling_rules_to_cfg(cfg)
    assert cfg.optim.lr == pytest.approx(cfg.optim.base_lr * 0.5)


def test_cli_args_and_written_config_round_trip(tmp_path):
    args = argparse.Namespace(
        config_file="train/LAION/vitg14", output_dir=str(tmp_path / "run"), opts=["optim.epochs=3"]
    )
    cfg = get_cfg_from_args(args)
    assert cfg.train.output_dir == str((tmp_path / "run").resolve())
    apply_scaling_rules_to_cfg(cfg, world_size=4)
    path = write_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    reloaded = load_config_file(path)
    assert OmegaConf.to_container(reloaded) == OmegaConf.to_container(cfg)
    assert reloaded.optim.epochs == 3 and reloaded.optim.lr == pytest.approx(cfg.optim.lr)


def test_cosine_scheduler_warmup_and_decay():
    sched = CosineScheduler(base_value=1.0, final_value=0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.0)
    assert len(sched.schedule) == 20
    np.testing.assert_allclose([sched[i] for i in range(5)], np.linspace(0, 1, 5))
    assert sched[5] == pytest.approx(1.0)
    # cosine over the 15 remaining steps: value(i) = 0.1 + 0.45 * (1 + cos(pi * i / 15))
    for i in range(15):
        assert sched[5 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / 15)))
    assert all(sched[i] >= sched[i + 1] for i in range(5, 19))
    assert sched[20] == sched[10_000] == 0.1


def test_cosine_scheduler_freeze_and_constant():
    sched = CosineScheduler(2.0, 0.0, total_iters=10, warmup_iters=2, freeze_iters=3, start_warmup_value=1.0)
    assert [sched[i] for i in range(5)] == [0.0, 0.0, 0.0, 1.0, 2.0]
    const = CosineScheduler(0.07, 0.07, total_iters=4)
    assert [const[i] for i in range(6)] == pytest.approx([0.07] * 6)


def test_cosine_scheduler_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"warmup_iters \(8\) \+ freeze_iters \(3\) exceed total_iters \(10\)"):
        CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=8, freeze_iters=3)


def test_merge_configs_validates_any_default_tree():
    from franca.utils.config import merge_configs

    default = OmegaConf.create({"a": {"lr": 0.1, "steps": 3}, "kwargs": {}, "opt": 5})
    cfg = merge_configs(
        default,
        [
            (OmegaConf.create({"a": {"lr": 1}, "kwargs": {"depth": 2}}), "layer one"),
            (OmegaConf.create({"opt": None}), "two"),
        ],
        label="toy config",
        nullable=("opt",),
    )
    assert cfg.a.lr == 1.0 and isinstance(cfg.a.lr, float) and cfg.a.steps == 3
    assert cfg.kwargs.depth == 2 and cfg.opt is None
    with pytest.raises(ConfigError, match="unknown toy config key 'a.stepz' in layer one; did you mean 'a.steps'"):
        merge_configs(default, [(OmegaConf.create({"a": {"stepz": 1}}), "layer one")], label="toy config")
    with pytest.raises(ConfigError, match="config key 'opt' in two must be int"):
        merge_configs(default, [(OmegaConf.create({"opt": None}), "two")])
