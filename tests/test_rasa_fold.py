"""Folding a RASA head into the backbone's final norm: exact equivalence, checkpoint round trip, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_reference
from tiny_backbones import random_rasa_head

from franca.hub.loading import load_backbone_weights
from franca.models.vision_transformer import DinoVisionTransformer
from rasa.fold import FoldedLayerNorm, fold, load_folded_backbone, save_folded_backbone
from rasa.src.rasa_head import RASAHead

TINY = dict(
    img_size=56,
    patch_size=14,
    embed_dim=64,
    depth=4,
    num_heads=2,
    mlp_ratio=4.0,
    ffn_layer="swiglufused",
    init_values=1.0,
    block_chunks=0,
    interpolate_offset=0.1,
    interpolate_antialias=False,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= tol * scale


def _perturbed_norm(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    """The reference tiny ViT with its official weights (real, trained-like statistics)."""
    model = DinoVisionTransformer(**TINY)
    load_backbone_weights(model, load_reference("vit_tiny_p14_ckpt_chunks4.pth"))
    return model.eval()


def _check_equivalence(model: torch.nn.Module, head: RASAHead, x: torch.Tensor, masks=None) -> None:
    folded = fold(model, head).eval()
    with torch.no_grad():
        ref = model.forward_features(x, masks=masks)
        out = folded.forward_features(x, masks=masks)
        _close(out["x_norm_patchtokens"], head(ref["x_norm_patchtokens"]))
        _close(out["x_norm_clstoken"], ref["x_norm_clstoken"], tol=1e-6)
        _close(out["x_norm_regtokens"], ref["x_norm_regtokens"], tol=1e-6)
        _close(out["x_prenorm"], ref["x_prenorm"], tol=1e-6)
        _close(folded(x), model(x), tol=1e-6)


@pytest.mark.parametrize("registers", [0, 2])
def test_fold_equivalence_random_inputs(registers):
    torch.manual_seed(0)
    model = _perturbed_norm(DinoVisionTransformer(**{**TINY, "num_register_tokens": registers})).eval()
    head = random_rasa_head(64, 3, seed=0)
    x = torch.randn(3, 3, 56, 56)
    _check_equivalence(model, head, x)
    _check_equivalence(model, head, x, masks=torch.rand(3, 16) < 0.3)
    # the original backbone is untouched
    assert isinstance(model.norm, torch.nn.LayerNorm)


def test_fold_equivalence_real_inputs(reference_model):
    io = load_reference("vit_tiny_p14_io.pth")
    head = random_rasa_head(64, 5, seed=1)
    for name in ("x56", "x56_masked", "x70x84"):
        _check_equivalence(reference_model, head, io["inputs"][name]["x"], io["inputs"][name]["masks"])
    folded = fold(reference_model, head)
    with torch.no_grad():
        out = folded.forward_features(io["inputs"]["x56"]["x"])
    _close(out["x_norm_clstoken"], io["outputs"]["x56"]["x_norm_clstoken"])


def test_intermediate_layers_with_norm_give_debiased_tokens(reference_model):
    head = random_rasa_head(64, 2, seed=2)
    folded = fold(reference_model, head)
    x = load_reference("vit_tiny_p14_io.pth")["inputs"]["x56"]["x"]
    with torch.no_grad():
        (ref_patch, ref_cls), *_ = reference_model.get_intermediate_layers(x, 1, return_class_token=True, norm=True)
        (out_patch, out_cls), *_ = folded.get_intermediate_layers(x, 1, return_class_token=True, norm=True)
        _close(out_patch, head(ref_patch))
        _close(out_cls, ref_cls, tol=1e-6)
        out_grid = folded.get_intermediate_layers(x, 1, reshape=True, norm=True)[0]
        _close(out_grid.flatten(2).transpose(1, 2), head(ref_patch))
        _close(folded.forward_features(x)["x_norm_patchtokens"], out_patch)


def test_fold_twice_composes_heads(reference_model):
    first, second = random_rasa_head(64, 1, seed=3), random_rasa_head(64, 2, seed=4)
    twice = fold(fold(reference_model, first), second)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = second(first(reference_model.forward_features(x)["x_norm_patchtokens"]))
        _close(twice.forward_features(x)["x_norm_patchtokens"], expected)


def test_folded_checkpoint_round_trip(reference_model, tmp_path):
    head = random_rasa_head(64, 3, seed=5)
    folded = fold(reference_model, head)
    path = tmp_path / "folded_teacher_checkpoint.pth"
    save_folded_backbone(folded, path)
    saved = torch.load(path, weights_only=True)["teacher"]
    plain = {f"backbone.{k}" for k in reference_model.state_dict()}
    assert set(saved) - plain == {"backbone.norm.patch_proj.weight", "backbone.norm.patch_proj.bias"}
    assert plain <= set(saved)
    loaded = load_folded_backbone(path, "DinoVisionTransformer", **{**TINY, "block_chunks": 4}).eval()
    assert isinstance(loaded.norm, FoldedLayerNorm)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        _close(loaded.forward_features(x)["x_norm_patchtokens"], folded.forward_features(x)["x_norm_patchtokens"])
    # a plain checkpoint still loads into a plain model through the same function
    plain_loaded = load_folded_backbone(_plain_file(reference_model, tmp_path), "DinoVisionTransformer", **TINY)
    assert isinstance(plain_loaded.norm, torch.nn.LayerNorm)


def _plain_file(model: torch.nn.Module, tmp_path) -> str:
    path = tmp_path / "plain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return str(path)


def test_bad_inputs(reference_model, tmp_path):
    with pytest.raises(ValueError, match="RASA head width 96 does not match the backbone width 64"):
        fold(reference_model, RASAHead(96, 1))
    with pytest.raises(FileNotFoundError, match="backbone checkpoint not found"):
        load_folded_backbone(tmp_path / "nope.pth", "DinoVisionTransformer", **TINY)
    with pytest.raises(ValueError, match="unknown architecture 'vit_tiny_nope'"):
        load_folded_backbone(tmp_path / "nope.pth", "vit_tiny_nope")


def test_folded_checkpoint_loads_through_hubconf(reference_model, tmp_path):
    """The folded file is a plain official-format checkpoint for the hub: no RASA head argument needed."""
    folded = fold(reference_model, random_rasa_head(64, 2, seed=7))
    path = tmp_path / "folded_teacher_checkpoint.pth"
    save_folded_backbone(folded, path)
    repo = Path(__file__).resolve().parents[1]
    tiny = {"img_size": 56, "embed_dim": 64, "depth": 4, "num_heads": 2}
    model = torch.hub.load(
        str(repo), "franca_vitb14", source="local", pretrained=True, local_state_dict=str(path), **tiny
    )
    assert isinstance(model.norm, FoldedLayerNorm)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got, expected = model.eval().forward_features(x), folded.forward_features(x)
    _close(got["x_norm_patchtokens"], expected["x_norm_patchtokens"])
    _close(got["x_norm_clstoken"], expected["x_norm_clstoken"])
