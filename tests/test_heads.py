"""DINO / Matryoshka heads: parity with the official MRLDINOHead, weight-norm naming, options and errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import load_reference
from torch import nn

from franca.layers import DINOHead, MRLDINOHead
from franca.layers.dino_head import WeightNormLinear


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = max(1.0, expected.abs().max().item())
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= rtol * scale


@pytest.fixture(scope="module")
def mrl_reference() -> dict:
    return load_reference("public_mrl_head.pth")


def test_mrl_head_matches_reference_outputs(mrl_reference):
    head = MRLDINOHead(**mrl_reference["config"])
    head.load_state_dict(mrl_reference["state_dict"], strict=True)
    assert head.n_prototypes == mrl_reference["n_prototypes"]
    outputs = head(mrl_reference["input"])
    assert isinstance(outputs, tuple) and len(outputs) == 5
    for out, expected in zip(outputs, mrl_reference["outputs"]):
        _assert_close_rel(out, expected)


def test_mrl_head_state_dict_uses_official_names_and_shapes(mrl_reference):
    head = MRLDINOHead(**mrl_reference["config"])
    ours = head.state_dict()
    official = mrl_reference["state_dict"]
    assert list(ours) == list(official)
    assert all(ours[k].shape == official[k].shape for k in official)
    assert ours["last_layers.4.weight_g"].shape == (512, 1)
    assert ours["last_layers.4.weight_v"].shape == (512, 32)
    # A fresh head starts with g = 1, like weight_norm(...) followed by weight_g.fill_(1).
    assert all(
        torch.equal(ours[f"last_layers.{j}.weight_g"], torch.ones(k, 1)) for j, k in enumerate(head.n_prototypes)
    )


def test_mrl_head_save_load_round_trip_is_exact(tmp_path, mrl_reference):
    head = MRLDINOHead(**mrl_reference["config"])
    head.load_state_dict(mrl_reference["state_dict"], strict=True)
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)
    reloaded = torch.load(path, weights_only=True)
    assert reloaded.keys() == mrl_reference["state_dict"].keys()
    assert all(torch.equal(reloaded[k], mrl_reference["state_dict"][k]) for k in reloaded)


@pytest.mark.parametrize("rows", [7, 64], ids=["scaled-output", "formed-weight"])  # fewer / more rows than in
def test_weight_norm_linear_matches_torch_weight_norm_forward_and_backward(rows):
    torch.manual_seed(0)
    reference = nn.utils.parametrizations.weight_norm(nn.Linear(16, 40, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.uniform_(0.5, 1.5)
    ours = WeightNormLinear(16, 40)
    ours.load_state_dict(reference.state_dict(), strict=True)  # newer parametrisation key names
    x = torch.randn(rows, 16)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(rows, 40)
    (reference(x_ref) * grad_out).sum().backward()
    (ours(x_ours) * grad_out).sum().backward()
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight, reference.weight, rtol=1e-5, atol=1e-6)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
    torch.testing.assert_close(ours.weight_g.grad, reference.parametrizations.weight.original0.grad, **tol)
    torch.testing.assert_close(ours.weight_v.grad, reference.parametrizations.weight.original1.grad, **tol)


def _legacy_weight_norm_linear(in_dim: int, out_dim: int) -> nn.Module:
    """``torch.nn.utils.weight_norm`` (the API the official heads use), silencing its deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False))


def test_dino_head_loads_official_naming_strictly_and_computes_the_dinov2_head():
    torch.manual_seed(1)
    head = DINOHead(in_dim=24, out_dim=50, nlayers=3, hidden_dim=32, bottleneck_dim=12)
    assert sorted(head.state_dict()) == [
        "last_layer.weight_g",
        "last_layer.weight_v",
        "mlp.0.bias",
        "mlp.0.weight",
        "mlp.2.bias",
        "mlp.2.weight",
        "mlp.4.bias",
        "mlp.4.weight",
    ]
    legacy_last = _legacy_weight_norm_linear(12, 50)
    with torch.no_grad():
        legacy_last.weight_g.uniform_(0.5, 1.5)
    mlp = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 12))
    official = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    official.update({f"last_layer.{k}": v for k, v in legacy_last.state_dict().items()})
    head.load_state_dict(official, strict=True)
    x = torch.randn(5, 24)
    expected = legacy_last(F.normalize(mlp(x), dim=-1, p=2, eps=1e-12))
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


def test_mrl_head_default_nesting_and_prototype_counts():
    head = MRLDINOHead(in_dim=64, out_dim=256, hidden_dim=16, bottleneck_dim=8)
    assert head.nesting_list == [4, 8, 16, 32, 64]
    assert head.n_prototypes == [16, 32, 64, 128, 256]
    outputs = head(torch.randn(3, 64))
    assert [o.shape for o in outputs] == [torch.Size([3, k]) for k in head.n_prototypes]


def test_mrl_head_has_gelu_after_bottleneck_and_no_l2_norm():
    torch.manual_seed(2)
    head = MRLDINOHead(in_dim=32, out_dim=64, hidden_dim=16, bottleneck_dim=8, nesting_list=[16, 32])
    x = torch.randn(4, 32)
    for j, level_out in enumerate(head(x)):
        h = head.mlps[j](head.matryoshka_projections[j](x))
        assert isinstance(head.mlps[j][-1], nn.GELU)
        last = head.last_layers[j]
        torch.testing.assert_close(level_out, h @ last.weight.t(), rtol=1e-5, atol=1e-6)


def test_mrl_head_batchnorm_and_single_layer_key_layout():
    with_bn = MRLDINOHead(in_dim=32, out_dim=64, use_bn=True, hidden_dim=16, bottleneck_dim=8, nesting_list=[32])
    layers = [type(m).__name__ for m in with_bn.mlps[0]]
    assert layers == ["Linear", "BatchNorm1d", "GELU"] * 3
    single = MRLDINOHead(in_dim=32, out_dim=64, nlayers=1, hidden_dim=16, bottleneck_dim=8, nesting_list=[16, 32])
    assert isinstance(single.mlps[0], nn.Linear) and "mlps.1.weight" in single.state_dict()


def test_mrl_head_slice_variant_uses_only_the_first_features():
    torch.manual_seed(3)
    head = MRLDINOHead(
        in_dim=32, out_dim=64, hidden_dim=16, bottleneck_dim=8, nesting_list=[8, 16, 32], projection="slice"
    )
    assert not any(k.startswith("matryoshka_projections") for k in head.state_dict())
    x = torch.randn(4, 32)
    perturbed = x.clone()
    perturbed[:, 8:] += torch.randn(4, 24)
    before, after = head(x), head(perturbed)
    torch.testing.assert_close(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nesting_list": [16, 8]}, "strictly increasing"),
        ({"nesting_list": [0, 8]}, "strictly increasing"),
        ({"projection": "pad"}, "projection must be one of"),
        ({"projection": "slice", "nesting_list": [16, 64]}, "needs nesting widths <= in_dim=32"),
        ({"out_dim": 2, "nesting_list": [1, 32]}, "empty level"),
    ],
)
def test_mrl_head_rejects_bad_configuration(kwargs, message):
    options = {"in_dim": 32, "out_dim": 64, "hidden_dim": 16, "bottleneck_dim": 8} | kwargs
    with pytest.raises(ValueError, match=message):
        MRLDINOHead(**options)


def test_weight_norm_linear_handles_leading_dims_and_cpu_autocast():
    torch.manual_seed(4)
    layer = WeightNormLinear(16, 24)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, x @ layer.weight.t(), rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, rtol=3e-2, atol=3e-2)
    low.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight_v.grad.dtype == torch.float32
    assert torch.isfinite(layer.weight_v.grad).all() and torch.isfinite(layer.weight_g.grad).all()
