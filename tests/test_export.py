"""Export of tiny backbones to ONNX and torch.export: official-output parity, registers, RASA, errors."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_reference
from tiny_backbones import random_rasa_head, tiny_vit

import franca.export.__main__ as cli
from franca.export import ExportableBackbone, ExportedRunner, OnnxRunner, VerificationError, export_backbone
from franca.export.interpolation import interpolate_pos_embed
from franca.export.onnx_export import _gather_external_data
from rasa.fold import fold, save_folded_backbone

# The reference fixture's architecture: the release settings (--arch, HUB_BACKBONE_CONFIG) narrowed to 64 wide.
TINY_ARGS = ["--model-arg", "embed_dim=64", "--model-arg", "depth=4", "--model-arg", "num_heads=2"]
ARCH_ARGS = ["--arch", "DinoVisionTransformer", *TINY_ARGS]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= tol * expected.abs().max().item()


def _save_teacher(model: torch.nn.Module, path: Path) -> Path:
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("offset", [0.0, 0.1])
def test_pos_embed_interpolation_matches_backbone(offset, antialias):
    model = tiny_vit(img_size=14 * 6, interpolate_offset=offset, interpolate_antialias=antialias)
    for rows, cols in [(6, 6), (6, 7), (7, 6), (3, 5), (13, 4), (2, 2)]:
        tokens = torch.zeros(1, 1 + rows * cols, 64)
        expected = model.interpolate_pos_encoding(tokens, rows * 14, cols * 14)
        _close(interpolate_pos_embed(model.pos_embed, rows, cols, offset, antialias), expected, 1e-5)


def test_wrapper_equals_forward_features_with_registers():
    model = tiny_vit(num_register_tokens=3, patch_size=8, img_size=32)
    wrapper = ExportableBackbone(model)
    assert wrapper.output_names == ("cls_token", "patch_tokens", "register_tokens")
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        out, ref = wrapper(images), model.forward_features(images)
    _close(out["cls_token"], ref["x_norm_clstoken"], 1e-5)
    _close(out["patch_tokens"], ref["x_norm_patchtokens"], 1e-5)
    _close(out["register_tokens"], ref["x_norm_regtokens"], 1e-5)


def test_onnx_from_chunked_checkpoint_matches_official_outputs(reference_dir, tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    argv = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth"), *ARCH_ARGS]
    assert cli.main([*argv, "--format", "onnx", "--img-size", "56", "--dynamic-size", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "checked batch 3 at 84×70" in printed and "max relative error" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]

    runner = OnnxRunner(out)
    inputs = runner.session.get_inputs()
    assert [(i.name, i.shape) for i in inputs] == [("images", ["batch", 3, "height", "width"])]
    assert runner.output_names == ["cls_token", "patch_tokens"]
    io = load_reference("vit_tiny_p14_io.pth")
    for name in ("x56", "x70x84"):
        features = runner(io["inputs"][name]["x"])
        _close(features["cls_token"], io["outputs"][name]["x_norm_clstoken"])
        _close(features["patch_tokens"], io["outputs"][name]["x_norm_patchtokens"])


def test_exported_program_from_flat_checkpoint_matches_official_outputs(reference_dir, tmp_path):
    out = tmp_path / "tiny.pt2"
    argv = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *ARCH_ARGS]
    assert cli.main([*argv, "--format", "exported", "--img-size", "56", "--dynamic-size", "--out", str(out)]) == 0
    runner = ExportedRunner(out)
    io = load_reference("vit_tiny_p14_io.pth")
    for name in ("x56", "x70x84"):
        features = runner(io["inputs"][name]["x"])
        assert list(features) == ["cls_token", "patch_tokens"]
        _close(features["cls_token"], io["outputs"][name]["x_norm_clstoken"])
        _close(features["patch_tokens"], io["outputs"][name]["x_norm_patchtokens"])


def test_hub_entry_point_with_local_weights(reference_dir, tmp_path):
    out = tmp_path / "hub.onnx"
    weights = str(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth")
    argv = ["--hub", "franca_vitb14", "--weights", weights, *TINY_ARGS, "--model-arg", "img_size=56"]
    assert cli.main([*argv, "--format", "onnx", "--img-size", "56", "--out", str(out)]) == 0
    io = load_reference("vit_tiny_p14_io.pth")
    features = OnnxRunner(out)(io["inputs"]["x56"]["x"][:1])
    _close(features["cls_token"], io["outputs"]["x56"]["x_norm_clstoken"][:1])


def test_registers_dynamic_size_onnx(tmp_path):
    model = tiny_vit(num_register_tokens=4, patch_size=8, img_size=32)
    result = export_backbone(model, tmp_path / "reg.onnx", format="onnx", img_size=32, dynamic_size=True, opset=14)
    assert result.output_names == ("cls_token", "patch_tokens", "register_tokens")
    assert {(c.batch, c.height, c.width) for c in result.checks} == {(1, 32, 32), (3, 32, 32), (1, 48, 40), (3, 48, 40)}
    assert result.max_error <= 1e-4
    images = torch.randn(2, 3, 24, 56)
    features, ref = OnnxRunner(result.path)(images), model.forward_features(images)
    assert features["register_tokens"].shape == (2, 4, 64)
    _close(features["register_tokens"], ref["x_norm_regtokens"])
    _close(features["patch_tokens"], ref["x_norm_patchtokens"])


def test_rasa_folded_export_equals_unfolded_head(tmp_path):
    model, head = tiny_vit(), random_rasa_head(64, n_layers=2)
    weights = _save_teacher(model, tmp_path / "backbone.pth")
    torch.save(head.state_dict(), tmp_path / "rasa_head.pth")
    folded_file = tmp_path / "folded.pth"
    save_folded_backbone(fold(model, head), folded_file)
    common = [*ARCH_ARGS[:2], "--model-arg", "embed_dim=64", "--model-arg", "depth=2", "--model-arg", "num_heads=2"]
    common += [
        "--model-arg",
        "layerscale=1.0",
        "--model-arg",
        "ffn_layer='mlp'",
        "--format",
        "onnx",
        "--img-size",
        "56",
    ]
    head_out, folded_out = tmp_path / "with_head.onnx", tmp_path / "folded.onnx"
    assert (
        cli.main(
            ["--weights", str(weights), "--rasa", str(tmp_path / "rasa_head.pth"), *common, "--out", str(head_out)]
        )
        == 0
    )
    assert cli.main(["--weights", str(folded_file), *common, "--out", str(folded_out)]) == 0

    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model.forward_features(images)
        debiased = head(ref["x_norm_patchtokens"])
    for path in (head_out, folded_out):
        features = OnnxRunner(path)(images)
        _close(features["patch_tokens"], debiased)
        _close(features["cls_token"], ref["x_norm_clstoken"])


def test_failed_verification_writes_nothing(tmp_path, monkeypatch, capsys):
    model = tiny_vit()
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        export_backbone(model, tmp_path / "strict.onnx", img_size=56, dynamic_size=True, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []

    weights = _save_teacher(model, tmp_path / "backbone.pth")
    monkeypatch.setattr(cli, "export_backbone", functools.partial(export_backbone, tolerance=0.0))
    argv = ["--weights", str(weights), *ARCH_ARGS[:2], "--model-arg", "embed_dim=64", "--model-arg", "depth=2"]
    argv += ["--model-arg", "num_heads=2", "--model-arg", "ffn_layer='mlp'", "--model-arg", "layerscale=1.0"]
    assert (
        cli.main([*argv, "--format", "onnx", "--img-size", "56", "--dynamic-size", "--out", str(tmp_path / "x.onnx")])
        == 1
    )
    assert "verification failed, nothing written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pth"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights", "missing.pth", "--arch", "vit_small"], "checkpoint not found: missing.pth"),
        (["--model-arg", "num_register_tokens=2"], "missing keys: register_tokens"),
        (["--model-arg", "embed_dim=96"], "shape mismatch"),
        (["--img-size", "50"], "image size 50 is not a multiple of the patch size 14"),
        (["--opset", "13"], "opset 13 is too old"),
        (["--model-arg", "depth"], "'depth' is not of the form key=value"),
    ],
)
def test_cli_errors_are_one_line(reference_dir, tmp_path, capsys, extra, message):
    base = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *ARCH_ARGS]
    out = tmp_path / "x.onnx"
    assert cli.main([*base, "--format", "onnx", "--img-size", "56", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_extra_names_the_install_command(reference_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    argv = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *ARCH_ARGS, "--format", "onnx"]
    assert cli.main([*argv, "--out", str(tmp_path / "x.onnx")]) == 2
    assert "pip install 'franca[export]'" in capsys.readouterr().err


def test_external_weights_are_gathered_into_one_file(tmp_path):
    import onnx
    from onnx import helper, numpy_helper

    matrices = [torch.randn(32, 32) for _ in range(2)]
    weights = [numpy_helper.from_array(m.numpy(), name=f"w{i}") for i, m in enumerate(matrices)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(tmp_path.iterdir())) == 3
    _gather_external_data(path, "m.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    import onnxruntime

    x = torch.randn(1, 32)
    (y,) = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    _close(torch.from_numpy(y), x @ matrices[0] @ matrices[1], 1e-5)


def test_training_config_file_describes_the_backbone(reference_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("student:\n  arch: vit_small\n  patch_size: 14\n  ffn_layer: swiglufused\n  block_chunks: 4\n")
    argv = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), "--config-file", str(config), *TINY_ARGS]
    out = tmp_path / "cfg.onnx"
    assert cli.main([*argv, "--format", "onnx", "--img-size", "56", "--out", str(out)]) == 0
    io = load_reference("vit_tiny_p14_io.pth")
    features = OnnxRunner(out)(io["inputs"]["x56"]["x"])
    _close(features["cls_token"], io["outputs"]["x56"]["x_norm_clstoken"])
    _close(features["patch_tokens"], io["outputs"]["x56"]["x_norm_patchtokens"])
