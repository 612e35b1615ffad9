"""RASAHead: parity with the official head, projection algebra, head files and their errors."""

from __future__ import annotations

import pytest
import torch
from conftest import load_reference, rasa_head_file_state

import rasa
from rasa.src.rasa_head import RASAHead, load_rasa_head


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= 1e-5 * scale


@pytest.fixture(scope="module")
def reference() -> dict:
    return load_reference("public_rasa_head.pth")


def test_parity_with_official_head(reference):
    cfg = reference["config"]
    head = RASAHead(cfg["input_dim"], cfg["n_pos_layers"], cfg["pos_out_dim"], cfg["pos_out_act_layer"])
    head.load_state_dict(reference["state_dict"], strict=True)
    x = reference["input"]
    with torch.no_grad():
        _close(head(x), reference["output"])
        x_pos, x_debiased = head(x, return_pos_info=True)
        _close(x_pos, reference["output_pos_info"][0])
        _close(x_debiased, reference["output_pos_info"][1])
        _close(head(x, use_pos_pred=False), reference["output_use_pos_pred_false"])
        _close(head.forward_pos_pred(x), reference["forward_pos_pred"])


def test_load_rasa_head_infers_shape_and_strips_prefixes(reference, tmp_path):
    wrapped = {"state_dict": {f"head.{k}": v for k, v in reference["state_dict"].items()}}
    wrapped["state_dict"]["backbone.norm.weight"] = torch.ones(96)
    path = tmp_path / "lightning.ckpt"
    torch.save(wrapped, path)
    head = load_rasa_head(path, input_dim=96)
    assert head.n_pos_layers == 3 and head.input_dim == 96
    _close(head(reference["input"]).detach(), reference["output"])
    hub_style = {f"module.rasa_head.{k}": v for k, v in reference["state_dict"].items()}
    assert load_rasa_head(hub_style).n_pos_layers == 3


def _remove_span(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` minus its orthogonal projection on the row span of ``weight`` (k×D), through a QR factorisation."""
    q, _ = torch.linalg.qr(weight.T)
    return x - (x @ q) @ q.T


@pytest.mark.parametrize("n_pre_pos_layers", [8, 9])
def test_release_head_layouts_load(n_pre_pos_layers, tmp_path):
    """Legacy release heads (8 pre-position layers, 9 tensors) and current ones (9 layers, 10 tensors) both load."""
    state = rasa_head_file_state(n_pre_pos_layers)
    assert len(state) == n_pre_pos_layers + 1
    torch.save(state, tmp_path / "franca_rasa.pth")
    head = rasa.load_rasa_head(tmp_path / "franca_rasa.pth", input_dim=64)
    assert head.n_pos_layers == n_pre_pos_layers and head.pos_out_dim == 2
    loaded = head.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(1))
    expected = x
    for i in range(n_pre_pos_layers):
        expected = _remove_span(expected, state[f"pre_pos_layers.{i}.weight"])
    with torch.no_grad():
        _close(head(x, use_pos_pred=False), expected)
        _close(head(x), _remove_span(expected, state["pos_pred.weight"]))


def test_debias_matrix_equals_forward_and_removes_the_spans(reference):
    head = load_rasa_head(reference["state_dict"])
    x = reference["input"]
    with torch.no_grad():
        _close(x @ head.debias_matrix(), head(x))
        _close(x @ head.debias_matrix(use_pos_pred=False), head(x, use_pos_pred=False))
        # the last removed read-out is blind to the output (earlier ones only when the directions are orthogonal)
        assert (head(x) @ head.pos_pred.weight.T).abs().max() < 1e-5
        assert (head(x, use_pos_pred=False) @ head.pre_pos_layers[-1].weight.T).abs().max() < 1e-5


@pytest.mark.parametrize("pos_out_dim", [1, 2])
def test_decomposition_is_an_orthogonal_projection(pos_out_dim):
    torch.manual_seed(0)
    head = RASAHead(32, 0, pos_out_dim=pos_out_dim)
    x = torch.randn(3, 10, 32)
    x_pos, x_rest = head.decompose_pos(x, head.pos_pred.weight)
    torch.testing.assert_close(x_pos + x_rest, x)
    assert (x_pos * x_rest).sum(-1).abs().max() < 1e-5
    # idempotent: projecting the positional part again keeps it
    torch.testing.assert_close(head.decompose_pos(x_pos, head.pos_pred.weight)[0], x_pos, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(head.debias_matrix()) == 32 - pos_out_dim


def test_activations_and_append():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for act, fn in [("sigmoid", torch.sigmoid), ("tanh", torch.tanh), (None, lambda t: t)]:
        head = RASAHead(16, 0, pos_out_act_layer=act)
        torch.testing.assert_close(head.forward_pos_pred(x), fn(x @ head.pos_pred.weight.T))
    head = RASAHead(16, 1)
    fitted = head.pos_pred.weight.detach().clone()
    head.append_pos_pred()
    assert head.n_pos_layers == 2 and torch.equal(head.pre_pos_layers[1].weight, fitted)
    assert not head.pre_pos_layers[1].weight.requires_grad and head.pos_pred.weight.requires_grad
    assert set(head.state_dict()) == {"pos_pred.weight", "pre_pos_layers.0.weight", "pre_pos_layers.1.weight"}


def test_bad_inputs_raise_one_clear_error(reference, tmp_path):
    with pytest.raises(ValueError, match="pos_out_dim"):
        RASAHead(8, 0, pos_out_dim=3)
    with pytest.raises(ValueError, match="pos_out_act_layer"):
        RASAHead(8, 0, pos_out_act_layer="relu")
    with pytest.raises(FileNotFoundError, match="RASA head file not found"):
        load_rasa_head(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="width 96 does not match the backbone width 64"):
        load_rasa_head(reference["state_dict"], input_dim=64)
    with pytest.raises(KeyError, match="pos_pred.weight"):
        load_rasa_head({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="tokens of width 96"):
        load_rasa_head(reference["state_dict"])(torch.zeros(1, 4, 64))
