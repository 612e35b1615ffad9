"""SSLMetaArch: the Franca training step on a tiny model, with batches from the real collate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_ssl import N_LOCAL, tiny_ssl_cfg

from franca.data.synthetic import random_collated_batch
from franca.loss import KoLeoLoss
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.utils.config import load_config_file
from franca.utils.param_groups import get_params_groups_with_decay

LOSS_KEYS = {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
BATCH = 4


def tiny_cfg(*overrides: str):
    return tiny_ssl_cfg(
        BATCH, "student.ffn_layer=mlp", "student.block_chunks=0", "optim.layerwise_decay=0.9", *overrides
    )


def make_batch(cfg, seed: int = 0, dtype=torch.float32) -> dict:
    """A batch of random crops through the real MaskingGenerator and collate_data_and_cast."""
    return random_collated_batch(cfg, seed, dtype)


def build(*overrides: str, seed: int = 0) -> SSLMetaArch:
    torch.manual_seed(seed)
    model = SSLMetaArch(tiny_cfg(*overrides))
    model.train()
    return model


VARIANTS = {
    "mrl-sk-separate": (),
    "mrl-sk-shared": ("ibot.separate_head=false",),
    "mrl-sk-slice-nopad": ("dino.mrl_projection=slice", "ibot.sk_exclude_padding=true"),
    "dino-centering": ("dino.MRL=false", "train.centering=centering"),
    "mrl-centering-shared": ("train.centering=centering", "ibot.separate_head=false"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_backward_losses_and_gradients(variant):
    model = build(*VARIANTS[variant])
    losses = model.forward_backward(make_batch(model.cfg), teacher_temp=0.05)
    assert set(losses) == LOSS_KEYS
    for name, value in losses.items():
        assert value.ndim == 0 and torch.isfinite(value), name
        assert not value.requires_grad
    assert losses["dino_global_crops_loss"] > 0 and losses["ibot_loss"] > 0
    # gradients land on the student only
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    for key in model.student.keys():
        grads = [p.grad for p in model.student[key].parameters() if p.grad is not None]
        assert grads, key
        assert all(torch.isfinite(g).all() for g in grads)
    backbone = model.student.backbone
    assert backbone.mask_token.grad is not None and backbone.mask_token.grad.abs().sum() > 0
    assert backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_heads_follow_the_config():
    mrl = build()
    assert set(mrl.student.keys()) == set(mrl.teacher.keys()) == {"backbone", "dino_head", "ibot_head"}
    assert type(mrl.student.dino_head).__name__ == "MRLDINOHead"
    shared = build("ibot.separate_head=false", "dino.MRL=false")
    assert set(shared.student.keys()) == {"backbone", "dino_head"}
    assert type(shared.student.dino_head).__name__ == "DINOHead"
    assert mrl.fp16_scaler is None  # no fp16 on CPU


def test_teacher_is_an_exact_copy_at_init():
    model = build()
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert any(k.startswith("dino_head.last_layers.") for k in teacher)
    for key in student:
        assert torch.equal(student[key], teacher[key]), key


def test_update_teacher_is_an_ema_of_every_parameter():
    model = build()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = model.student.state_dict()
    m = 0.9
    model.update_teacher(m)
    after = model.teacher.state_dict()
    for key in before_t:
        torch.testing.assert_close(after[key], m * before_t[key] + (1 - m) * student[key], rtol=1e-6, atol=1e-6)
    model.update_teacher(0.0)
    for key in student:
        assert torch.equal(model.teacher.state_dict()[key], student[key]), key


def test_train_mode_keeps_teacher_in_eval():
    model = build()
    model.train()
    assert model.student.training and not model.teacher.training
    assert all(not m.training for m in model.teacher.modules())


def test_inputs_are_cast_and_moved_to_the_model():
    model = build()
    batch = make_batch(model.cfg, dtype=torch.float16)  # the official collate casts to half
    losses = model.forward_backward(batch, teacher_temp=0.04)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(v.device == model.device for v in losses.values())


def test_loss_arithmetic_matches_the_official_formulas():
    """Recompute every logged term from the teacher/student outputs with the official normalisation."""
    model = build("train.centering=sinkhorn_knopp")
    batch = make_batch(model.cfg, seed=3)
    torch.manual_seed(0)
    step = model.forward_step(batch, teacher_temp=0.06)
    x, teacher, student, losses = step.inputs, step.teacher, step.student, step.losses

    n_terms = N_LOCAL * 2 + 2
    temp = model.dino_loss.student_temp
    local, glob, ibot = 0.0, 0.0, 0.0
    masks = x["masks"]
    n_masked = int(x["n_masked_patches"])
    upperbound = x["upperbound"]
    assert n_masked < upperbound and x["mask_indices_list"].shape == x["masks_weight"].shape == (upperbound,)
    assert torch.all(x["masks_weight"][n_masked:] == 0)  # padding rows weigh nothing
    weights = x["masks_weight"][:n_masked]
    for s_local, s_global, t_cls, s_patch, t_patch in zip(
        student["local_cls"], student["global_cls"], teacher["dino"], student["masked_patches"], teacher["ibot"]
    ):
        assert t_cls.shape[0] == 2 * BATCH and t_patch.shape[0] == s_patch.shape[0] == upperbound
        s_patch, t_patch = s_patch[:n_masked], t_patch[:n_masked]  # the loss uses the first n_masked rows
        t_crops = t_cls.chunk(2)  # already swapped: row block 0 = teacher of global crop 1
        for s in s_local.chunk(N_LOCAL):
            for t in t_crops:
                local -= (t * F.log_softmax(s / temp, -1)).sum(-1).mean()
        glob -= (t_cls * F.log_softmax(s_global / temp, -1)).sum(-1).mean()
        per_token = (t_patch * F.log_softmax(s_patch / temp, -1)).sum(-1)
        ibot -= (per_token * weights).sum() / masks.shape[0]
    koleo = sum(KoLeoLoss()(c) for c in student["global_cls_tokens"].chunk(2)) * model.cfg.dino.koleo_loss_weight
    torch.testing.assert_close(losses["dino_local_crops_loss"], local / n_terms)
    torch.testing.assert_close(losses["dino_global_crops_loss"], glob * 2 / n_terms)
    torch.testing.assert_close(losses["ibot_loss"], ibot / 2)
    torch.testing.assert_close(losses["koleo_loss"], koleo / 2)


def test_teacher_targets_are_swapped_global_crops():
    model = build()
    x = model._move_batch(make_batch(model.cfg, seed=1))
    out = model.teacher.backbone.forward_features(x["global_crops"])["x_norm_clstoken"]
    swapped = torch.cat([out[BATCH:], out[:BATCH]])
    logits = model.teacher.dino_head(swapped)
    expected = model.dino_loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.05, n_global_crops_teacher=2)
    targets = model.get_teacher_output(
        global_crops=x["global_crops"],
        mask_indices_list=x["mask_indices_list"],
        n_masked_patches=x["n_masked_patches"],
        upperbound=x["upperbound"],
        teacher_temp=0.05,
    )["dino"]
    for got, want in zip(targets, expected):
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got.sum(-1), torch.ones(2 * BATCH), rtol=1e-4, atol=1e-4)


def _per_param_groups(model: SSLMetaArch, key: str) -> dict[str, dict]:
    groups = get_params_groups_with_decay(
        model.student[key],
        lr_decay_rate=model.cfg.optim.layerwise_decay,
        patch_embed_lr_mult=model.cfg.optim.patch_embed_lr_mult,
    )
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_param_groups_rules(block_chunks):
    model = build(f"student.block_chunks={block_chunks}", "student.num_register_tokens=2")
    groups = _per_param_groups(model, "backbone")
    depth, r = 2, 0.9
    for name, g in groups.items():
        if "blocks." in name:
            idx = int(name.split(".")[2 if block_chunks else 1])
            assert g["lr_multiplier"] == pytest.approx(r ** (depth - idx)), name
        elif name.startswith(("cls_token", "pos_embed", "mask_token", "register_tokens")):
            assert g["lr_multiplier"] == pytest.approx(r ** (depth + 1)), name
            assert g["wd_multiplier"] == 0.0, name
        elif name.startswith("patch_embed"):
            assert g["lr_multiplier"] == pytest.approx(r ** (depth + 1) * 0.2), name
        else:
            assert name.startswith("norm.") and g["lr_multiplier"] == 1.0, name
        no_wd = name.endswith(".bias") or "norm" in name or ".gamma" in name
        if no_wd:
            assert g["wd_multiplier"] == 0.0, name
        assert not g["is_last_layer"]
    assert groups["patch_embed.proj.weight"]["wd_multiplier"] == 1.0
    qkv = [n for n in groups if n.endswith("attn.qkv.weight")]
    assert qkv and all(groups[n]["wd_multiplier"] == 1.0 for n in qkv)
    assert any(n.endswith("ls1.gamma") for n in groups)

    head = _per_param_groups(model, "dino_head")
    assert all(g["lr_multiplier"] == 1.0 for g in head.values())
    last = {n for n, g in head.items() if g["is_last_layer"]}
    assert last and all("last_layer" in n for n in last)
    assert {n for n in head if "last_layer" in n} == last


def test_get_params_groups_covers_the_student_once():
    model = build()
    groups = model.get_params_groups()
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == sum(1 for _ in model.student.parameters())
    assert not {id(p) for p in model.teacher.parameters()} & {id(p) for p in params}
    for g in groups:
        assert g["foreach"] is True and set(g) >= {"lr_multiplier", "wd_multiplier", "is_last_layer"}
    assert any(g["is_last_layer"] for g in groups) and any(not g["is_last_layer"] for g in groups)
    # usable by AdamW as is
    torch.optim.AdamW(groups, lr=1e-3)


def test_prepare_for_distributed_training_resyncs_teacher_in_one_process():
    model = build()
    with torch.no_grad():
        model.student.backbone.cls_token.add_(1.0)
    model.prepare_for_distributed_training()
    assert torch.equal(model.student.backbone.cls_token, model.teacher.backbone.cls_token)


def test_pretrained_weights_initialise_student_and_teacher(tmp_path):
    source = build(seed=7)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": source.teacher.state_dict()}, path)
    model = build(f"student.pretrained_weights={path}", seed=0)
    want = source.teacher.backbone.state_dict()
    for net in (model.student, model.teacher):
        got = net.backbone.state_dict()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # the heads keep their own initialisation
    assert not torch.equal(next(model.student.dino_head.parameters()), next(source.student.dino_head.parameters()))


def test_missing_pretrained_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build(f"student.pretrained_weights={tmp_path / 'missing.pth'}")


def test_overfits_one_fixed_batch():
    """30 AdamW steps on one batch with the EMA teacher: the logged total loss falls.

    The heads' hidden layers are re-initialised with unit-gain weights first: with the official
    trunc-normal(0.02) init every head output is ~0, the targets are uniform and the loss sits at
    its uniform-target value for many more than 30 steps.
    """
    model = build()
    with torch.no_grad():
        for key in ("dino_head", "ibot_head"):
            for name, p in model.student[key].named_parameters():
                if p.ndim == 2 and "last_layer" not in name:
                    p.normal_(0.0, p.shape[1] ** -0.5)
    model.prepare_for_distributed_training()  # the teacher starts from the same weights
    batch = make_batch(model.cfg, seed=5)
    optimizer = torch.optim.AdamW(model.get_params_groups(), lr=1e-3)
    totals = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(batch, teacher_temp=0.04)
        optimizer.step()
        model.update_teacher(0.99)
        totals.append(sum(v.item() for v in losses.values()))
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.8 * totals[0], totals
    assert sum(totals[-5:]) < sum(totals[5:10]), totals  # still falling after the first steps


@pytest.mark.parametrize("name", ["train/IN21K/vitb14", "train/IN21K/vitg14", "finetune/vitl14_finetune"])
def test_shipped_configs_build_the_whole_arch_on_meta(name):
    cfg = load_config_file(name, ["student.pretrained_weights="])
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    d = model.embed_dim
    assert model.student.dino_head.n_prototypes == [131072 * m // d for m in (d // 16, d // 8, d // 4, d // 2, d)]
    assert set(model.student.keys()) == {"backbone", "dino_head", "ibot_head"}
    assert any(k.startswith("backbone.blocks.3.") for k in model.teacher.state_dict())
    groups = model.get_params_groups()
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.student.parameters())
