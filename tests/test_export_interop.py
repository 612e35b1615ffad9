"""Exports for other libraries on tiny models: transformers, timm, safetensors, Core ML; baking; folded RASA."""

from __future__ import annotations

import copy
import functools
import json
import sys

import pytest
import torch
from conftest import load_reference
from tiny_backbones import random_rasa_head, tiny_vit

import franca.export.__main__ as cli
from franca.export import VerificationError, export_backbone
from franca.export.hf_export import PATCH_MAP_FILE
from franca.export.verify import relative_error
from franca.hub.loading import read_checkpoint
from franca.layers.folded_norm import fold

transformers = pytest.importorskip("transformers", reason="the 'hf' extra (transformers) is not installed")
timm = pytest.importorskip("timm", reason="the 'timm' extra is not installed")
from safetensors.torch import load_file  # noqa: E402

FIXTURE_ARGS = ["--arch", "DinoVisionTransformer", "--model-arg", "embed_dim=64", "--model-arg", "depth=4"]
FIXTURE_ARGS += ["--model-arg", "num_heads=2"]
IO = load_reference("vit_tiny_p14_io.pth")


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= tol


def _hf(folder):
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def _timm(path):
    spec = json.loads(path.with_name(path.name + ".json").read_text())
    assert set(spec) >= {"model_name", "kwargs"} and spec["kwargs"]["num_classes"] == 0
    model = timm.create_model(
        spec["model_name"], pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **spec["kwargs"]
    )
    return model.eval(), spec


def test_trainer_checkpoint_to_transformers_and_timm_equals_official_outputs(reference_dir, tmp_path, capsys):
    """The chunked teacher checkpoint (backbone./teacher prefixes, dino_head keys, SwiGLU, LayerScale)."""
    weights = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth"), *FIXTURE_ARGS]
    assert cli.main([*weights, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "checked batch 3 at 56×56" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert cli.main([*weights, "--format", "timm", "--out", str(tmp_path / "timm.pth")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "timm.pth", "timm.pth.json"]

    hf = _hf(tmp_path / "hf")
    assert type(hf).__name__ == "Dinov2Model" and hf.config.use_swiglu_ffn
    model, spec = _timm(tmp_path / "timm.pth")
    assert spec["model_name"] == "vit_giant_patch14_dinov2" and spec["kwargs"]["img_size"] == 56
    x, expected = IO["inputs"]["x56"]["x"], IO["outputs"]["x56"]
    with torch.no_grad():
        for tokens in (hf(pixel_values=x).last_hidden_state, model.forward_features(x)):
            _close(tokens[:, 0], expected["x_norm_clstoken"])
            _close(tokens[:, 1:], expected["x_norm_patchtokens"])


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglufused"])
def test_registers_and_patch_size_8(tmp_path, ffn_layer):
    model = tiny_vit(num_register_tokens=3, patch_size=8, img_size=32, ffn_layer=ffn_layer, block_chunks=2)
    hf_result = export_backbone(model, tmp_path / "hf", format="hf", img_size=32)
    timm_result = export_backbone(model, tmp_path / "t.pth", format="timm", img_size=32)
    for result in (hf_result, timm_result):
        assert result.output_names == ("cls_token", "patch_tokens", "register_tokens")
        assert {(c.batch, c.height) for c in result.checks} == {(1, 32), (3, 32)} and result.max_error <= 1e-4
    hf = _hf(tmp_path / "hf")
    assert type(hf).__name__ == "Dinov2WithRegistersModel" and hf.config.patch_size == 8
    timm_model, spec = _timm(tmp_path / "t.pth")
    assert spec["kwargs"]["reg_tokens"] == 3 and spec["kwargs"]["patch_size"] == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
        for tokens in (hf(pixel_values=x).last_hidden_state, timm_model.forward_features(x)):
            _close(tokens[:, 0], ref["x_norm_clstoken"])
            _close(tokens[:, 1:4], ref["x_norm_regtokens"])
            _close(tokens[:, 4:], ref["x_norm_patchtokens"])


def test_img_size_bakes_our_interpolation(tmp_path):
    """Exported at 84 px from a 56 px model: equal to ours at 84; a 56 px export resized by the library is not."""
    model = tiny_vit()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        ref = model.forward_features(x)["x_norm_patchtokens"]
    export_backbone(model, tmp_path / "hf84", format="hf", img_size=84)
    export_backbone(model, tmp_path / "hf56", format="hf", img_size=56)
    export_backbone(model, tmp_path / "t84.pth", format="timm", img_size=84)
    with torch.no_grad():
        baked = _hf(tmp_path / "hf84")(pixel_values=x).last_hidden_state[:, 1:]
        resized = _hf(tmp_path / "hf56")(pixel_values=x).last_hidden_state[:, 1:]
        timm_baked = _timm(tmp_path / "t84.pth")[0].forward_features(x)[:, 1:]
    _close(baked, ref)
    _close(timm_baked, ref)
    assert relative_error(resized, ref) > 1e-3  # transformers' own resize (no 0.1 offset) differs


def test_folded_rasa_exports_to_every_format(tmp_path):
    model, head = tiny_vit(num_register_tokens=2), random_rasa_head()
    folded = fold(model, head)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model.forward_features(x)
        debiased = head(ref["x_norm_patchtokens"])
    export_backbone(folded, tmp_path / "hf", format="hf", img_size=56)
    export_backbone(folded, tmp_path / "t.pth", format="timm", img_size=56)
    export_backbone(folded, tmp_path / "b.safetensors", format="safetensors", img_size=56)
    patch_map = load_file(tmp_path / "hf" / PATCH_MAP_FILE)
    timm_model, spec = _timm(tmp_path / "t.pth")
    assert spec["rasa_patch_map"] == "t.pth.rasa_patch_map.safetensors"
    with torch.no_grad():
        for tokens in (_hf(tmp_path / "hf")(pixel_values=x).last_hidden_state, timm_model.forward_features(x)):
            _close(tokens[:, 0], ref["x_norm_clstoken"])
            _close(tokens[:, 1:3], ref["x_norm_regtokens"])
            _close(torch.nn.functional.linear(tokens[:, 3:], patch_map["weight"], patch_map["bias"]), debiased)
    state = read_checkpoint(tmp_path / "b.safetensors")
    assert "norm.patch_proj.weight" in state and "blocks.1.attn.qkv.weight" in state


def test_safetensors_wherever_a_pth_is_accepted(reference_dir, tmp_path):
    weights = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *FIXTURE_ARGS]
    out = tmp_path / "backbone.safetensors"
    assert cli.main([*weights, "--format", "safetensors", "--out", str(out)]) == 0
    from franca.hub.backbones import franca_vitb14

    hub = franca_vitb14(local_state_dict=out, img_size=56, embed_dim=64, depth=4, num_heads=2).eval()
    x, expected = IO["inputs"]["x56"]["x"], IO["outputs"]["x56"]
    with torch.no_grad():
        _close(hub.forward_features(x)["x_norm_patchtokens"], expected["x_norm_patchtokens"], 1e-5)
    # the exported .safetensors is itself an input of the export (and of every reader)
    again = ["--weights", str(out), *FIXTURE_ARGS[:2], *FIXTURE_ARGS[2:]]
    assert cli.main([*again, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    from safetensors.torch import save_file

    save_file(random_rasa_head().state_dict(), tmp_path / "rasa.safetensors")
    from franca.layers.rasa_head import load_rasa_head

    assert load_rasa_head(tmp_path / "rasa.safetensors", input_dim=64).n_pos_layers == 2
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors is not a readable safetensors file"):
        read_checkpoint(tmp_path / "broken.safetensors")


def test_failed_check_writes_nothing(tmp_path, monkeypatch, capsys):
    model = tiny_vit()
    for format, out in (
        ("hf", tmp_path / "hf"),
        ("timm", tmp_path / "t.pth"),
        ("safetensors", tmp_path / "b.safetensors"),
    ):
        with pytest.raises(VerificationError, match="differs from PyTorch"):
            export_backbone(model, out, format=format, img_size=56, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    monkeypatch.setattr(cli, "export_backbone", functools.partial(export_backbone, tolerance=-1.0))
    argv = ["--weights", str(tmp_path / "w.pth"), "--arch", "DinoVisionTransformer", "--model-arg", "embed_dim=64"]
    argv += ["--model-arg", "depth=2", "--model-arg", "num_heads=2", "--model-arg", "ffn_layer='mlp'"]
    argv += ["--model-arg", "layerscale=1.0"]
    assert cli.main([*argv, "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert "verification failed, nothing written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


@pytest.mark.parametrize(
    "format, module, extra",
    [("hf", "transformers", "hf"), ("timm", "timm", "timm"), ("coreml", "coremltools", "coreml")],
)
def test_missing_extra_names_it(reference_dir, tmp_path, monkeypatch, capsys, format, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    argv = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *FIXTURE_ARGS, "--format", format]
    assert cli.main([*argv, "--out", str(tmp_path / "x.mlpackage")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"pip install 'franca[{extra}]'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "hf", "--dynamic-size"], "--dynamic-size applies to onnx and exported"),
        (["--format", "timm", "--fp16"], "fp16 applies to --format coreml only"),
        (["--format", "hf", "--img-size", "60"], "image size 60 is not a multiple of the patch size 14"),
        (["--format", "safetensors"], "a safetensors file must be named *.safetensors"),
    ],
)
def test_bad_arguments_are_one_line(reference_dir, tmp_path, capsys, extra, message):
    argv = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *FIXTURE_ARGS, *extra]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_coreml_package_inputs_and_outputs(reference_dir, tmp_path, capsys):
    ct = pytest.importorskip("coremltools", reason="the 'coreml' extra is not installed")
    model = tiny_vit(num_register_tokens=2)
    result = export_backbone(
        fold(model, random_rasa_head()), tmp_path / "m.mlpackage", format="coreml", img_size=56, fp16=True
    )
    assert result.output_names == ("cls_token", "patch_tokens", "register_tokens")
    spec = ct.utils.load_spec(str(tmp_path / "m.mlpackage"))
    assert [i.name for i in spec.description.input] == ["images"]
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    assert [o.name for o in spec.description.output] == ["cls_token", "patch_tokens", "register_tokens"]
    if sys.platform != "darwin":
        assert result.checks == () and "needs macOS" in result.note
    weights = ["--weights", str(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth"), *FIXTURE_ARGS]
    assert cli.main([*weights, "--format", "coreml", "--out", str(tmp_path / "cli.mlpackage")]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and (sys.platform == "darwin" or "numerical verification" in printed)


def test_coreml_prediction_check_compares_with_pytorch(monkeypatch):
    """The macOS check's own logic (image → normalised input → per-output error), with a stand-in for Core ML."""
    ct = pytest.importorskip("coremltools", reason="the 'coreml' extra is not installed")
    import numpy as np

    from franca.export.coreml_export import CoreMLBackbone, predict_check

    model = tiny_vit(num_register_tokens=1)
    program = CoreMLBackbone(copy.deepcopy(model))  # the "package": a frozen copy

    class StandIn:
        def __init__(self, path):
            self.path = path

        def predict(self, inputs):
            pixels = torch.from_numpy(np.array(inputs["images"])).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                outputs = program(pixels)
            return {name: out.numpy() for name, out in zip(("cls_token", "patch_tokens", "register_tokens"), outputs)}

    monkeypatch.setattr(ct.models, "MLModel", StandIn)
    names = ("cls_token", "patch_tokens", "register_tokens")
    assert predict_check("m.mlpackage", model, 56, names, fp16=False).error <= 1e-5
    with torch.no_grad():
        model.norm.bias.add_(1.0)  # PyTorch now disagrees with the "package"
    with pytest.raises(VerificationError, match="differs from PyTorch"):
        predict_check("m.mlpackage", model, 56, names, fp16=True)


@pytest.mark.parametrize("dim", [384, 768, 1024, 1536])
@pytest.mark.parametrize("swiglu", [False, True])
def test_release_widths_map_to_both_libraries(dim, swiglu):
    """FFN widths of ViT-S/B/L/g (MLP 4·D, SwiGLU (int(4D·2/3) + 7)//8·8) in transformers' and timm's terms."""
    from franca.export.hf_export import hf_config
    from franca.export.layout import BackboneLayout
    from franca.export.timm_export import timm_spec

    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    layout = BackboneLayout(dim, 12, dim // 64, 14, 0, swiglu, hidden, True, True, True, True, 1e-6)
    assert hf_config(layout, 518).mlp_ratio == 4
    kwargs = timm_spec(layout, 518)["kwargs"]
    assert int(dim * kwargs["mlp_ratio"]) == (2 * hidden if swiglu else hidden)
