"""fvcore, the field's counting tools: the parameter table of the training log, a FLOP cross-check of the
benchmark's analytic ViT FLOPs (fvcore counts one flop per multiply-add; the benchmark counts two)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from tiny_ssl import tiny_ssl_cfg

from benchmarks.backbone import vit_forward_flops
from franca.models.vision_transformer import DinoVisionTransformer
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import log_parameter_counts

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis


def test_parameter_table_is_logged_once_with_the_model_parts(caplog):
    model = SSLMetaArch(tiny_ssl_cfg(2))
    with caplog.at_level(logging.INFO, logger="franca"):
        table = log_parameter_counts(model)
    assert [r.getMessage() for r in caplog.records] == [f"parameters:\n{table}"]
    for part in ("student.backbone", "student.dino_head", "teacher.ibot_head"):
        assert f"| {part} " in table
    total = sum(p.numel() for p in model.parameters())
    assert f"{total / 1e6:.1f}M" in table.splitlines()[2]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_size=56, ffn_layer="mlp"),
        dict(img_size=42, ffn_layer="swiglufused", num_register_tokens=2),
    ],
)
def test_analytic_vit_flops_agree_with_fvcore(kwargs):
    model = DinoVisionTransformer(
        patch_size=14, embed_dim=64, depth=3, num_heads=2, block_chunks=0, attn_backend="math", **kwargs
    ).eval()
    size = kwargs["img_size"]
    analysis = FlopCountAnalysis(model, torch.randn(1, 3, size, size))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    counted = 2 * analysis.total()  # fvcore: one flop per multiply-add
    assert counted == pytest.approx(vit_forward_flops(model, size), rel=0.03)
