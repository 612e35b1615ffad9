"""The ViT backbone: parity with the official code, multi-crop packing, attention backends, drop path, builders."""

from __future__ import annotations

import pytest
import torch
from conftest import load_reference
from omegaconf import OmegaConf

import franca.models.vision_transformer as vits
from franca.hub.loading import load_backbone_weights
from franca.layers import Block, TokenLayout
from franca.layers.drop_path import DropPath, add_residual, draw_branch_drops
from franca.layers.swiglu_ffn import swiglu_hidden_features
from franca.models import build_model, build_model_from_cfg
from franca.models.vision_transformer import DinoVisionTransformer

TOL = 1e-5
IO = load_reference("vit_tiny_p14_io.pth")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert (actual - expected).abs().max().item() <= TOL * scale if expected.numel() else True


def tiny_reference_model(block_chunks: int, **kwargs) -> DinoVisionTransformer:
    """The architecture of the reference fixtures (embed 64, depth 4, 2 heads, patch 14, 56 px, SwiGLU)."""
    cfg = IO["config"]
    settings = dict(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        ffn_layer=cfg["ffn_layer"],
        init_values=cfg["layerscale"],
        num_register_tokens=cfg["num_register_tokens"],
        interpolate_offset=cfg["interpolate_offset"],
        interpolate_antialias=cfg["interpolate_antialias"],
    )
    return DinoVisionTransformer(**{**settings, **kwargs}, block_chunks=block_chunks)


def _inputs(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    value = IO["inputs"][name]
    return (value["x"], value["masks"]) if isinstance(value, dict) else (value, None)


@pytest.fixture(
    params=[(4, "chunks4"), (4, "chunks0"), (0, "chunks4"), (0, "chunks0")], ids=lambda p: f"model{p[0]}-{p[1]}"
)
def loaded_model(request, reference_dir) -> DinoVisionTransformer:
    block_chunks, layout = request.param
    model = tiny_reference_model(block_chunks)
    load_backbone_weights(model, reference_dir / f"vit_tiny_p14_ckpt_{layout}.pth")
    return model.eval()


@pytest.mark.parametrize("name", ["x56", "x56_masked", "x70x84"])
def test_forward_features_match_reference(loaded_model, name):
    x, masks = _inputs(name)
    with torch.no_grad():
        out = loaded_model.forward_features(x, masks=masks)
        cls = loaded_model(x)
    for key, expected in IO["outputs"][name].items():
        _close(out[key], expected)
    _close(cls, IO["outputs"][f"{name}_forward"])
    assert out["masks"] is masks


def test_intermediate_layers_match_reference(loaded_model):
    for record in IO["intermediate_layers"]:
        x, _ = _inputs(record["input"])
        with torch.no_grad():
            got = loaded_model.get_intermediate_layers(
                x,
                n=record["n"],
                reshape=record["reshape"],
                return_class_token=record["return_class_token"],
                norm=record["norm"],
            )
        assert len(got) == len(record["output"])
        for (patch, cls), (patch_ref, cls_ref) in zip(got, record["output"]):
            _close(patch, patch_ref)
            _close(cls, cls_ref)


def test_intermediate_layers_by_index_and_errors():
    model = tiny_reference_model(2, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        last_two = model.get_intermediate_layers(x, n=2, norm=False)
        by_index = model.get_intermediate_layers(x, n=[2, 3], norm=False)
        unnormed_last = model.forward_features(x)["x_prenorm"][:, 1 + 2 :]
    for a, b in zip(last_two, by_index):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(last_two[-1], unnormed_last)
    assert model.get_intermediate_layers(x, n=1, reshape=True)[0].shape == (2, 64, 3, 4)
    with pytest.raises(ValueError, match="cannot take blocks"):
        model.get_intermediate_layers(x, n=5)
    with pytest.raises(ValueError, match="cannot take blocks"):
        model.get_intermediate_layers(x, n=[4])


def _random_tiny(**kwargs) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = tiny_reference_model(kwargs.pop("block_chunks", 0), **kwargs)
    with torch.no_grad():  # make every parameter matter (LayerScale, tokens) so differences would show
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_list_forward_equals_per_crop_forward(backend):
    model = _random_tiny(num_register_tokens=2, attn_backend=backend).eval()
    crops = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 42), torch.randn(1, 3, 56, 56), torch.randn(2, 3, 28, 28)]
    masks = [torch.rand(2, 16) < 0.4, None, torch.rand(1, 16) < 0.4, None]
    with torch.no_grad():
        together = model.forward_features(crops, masks)
        alone = [model.forward_features(x, m) for x, m in zip(crops, masks)]
    assert len(together) == len(crops)
    for joint, single in zip(together, alone):
        assert set(joint) == set(single)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            _close(joint[key], single[key])


def test_token_layout_runs_merge_equal_lengths():
    layout = TokenLayout(((2, 5), (3, 5), (1, 7), (4, 5)))
    assert layout.num_tokens == 2 * 5 + 3 * 5 + 7 + 4 * 5
    assert layout.runs == ((0, 25, 5, 5), (25, 32, 1, 7), (32, 52, 4, 5))
    tensors = [torch.randn(b, n, 3) for b, n in layout.shapes]
    for a, b in zip(layout.unpack(layout.pack(tensors)), tensors):
        assert torch.equal(a, b)


def test_sdpa_and_math_backends_agree(monkeypatch):
    model = _random_tiny(num_register_tokens=1).eval()
    crops = [torch.randn(2, 3, 56, 56), torch.randn(4, 3, 28, 28)]
    results = {}
    for backend in ("sdpa", "math"):
        monkeypatch.setenv("FRANCA_ATTENTION", backend)
        with torch.no_grad():
            results[backend] = (model.forward_features(crops), model.forward_features(crops[0]))
    for sdpa, math in zip(results["sdpa"][0] + [results["sdpa"][1]], results["math"][0] + [results["math"][1]]):
        _close(sdpa["x_prenorm"], math["x_prenorm"])
    monkeypatch.setenv("FRANCA_ATTENTION", "flash")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        model.forward_features(crops[0])
    monkeypatch.setenv("FRANCA_ATTENTION", "xformers")
    with pytest.raises((RuntimeError, ValueError), match="xformers"):
        model.forward_features(crops[0])


def test_backward_through_list_forward_matches_per_crop():
    model = _random_tiny().train()
    crops = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)]
    masks = [torch.rand(2, 16) < 0.5, torch.rand(3, 4) < 0.5]
    outputs = model.forward_features(crops, masks)
    sum(out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].sum() for out in outputs).backward()
    joint = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    outputs = [model.forward_features(x, m) for x, m in zip(crops, masks)]
    sum(out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].sum() for out in outputs).backward()
    for a, p in zip(joint, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_drop_path_is_identity_at_eval_and_active_in_training():
    reference = _random_tiny().eval()
    for rate in (0.05, 0.5):
        dropped = tiny_reference_model(0, drop_path_rate=rate, drop_path_uniform=True)
        dropped.load_state_dict(reference.state_dict())
        x = torch.randn(8, 3, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(dropped.eval()(x), reference(x), rtol=0, atol=0)
            torch.manual_seed(1)
            trained = dropped.train()(x)
        assert not torch.allclose(trained, reference(x))
        crops = [torch.randn(4, 3, 28, 28), torch.randn(3, 3, 28, 42)]
        outputs = dropped.train().forward_features(crops)
        assert [o["x_prenorm"].shape for o in outputs] == [(4, 5, 64), (3, 7, 64)]
        sum(o["x_norm_clstoken"].sum() for o in outputs).backward()
        assert dropped.blocks[-1].attn.qkv.weight.grad is not None
    assert [b.sample_drop_ratio for b in tiny_reference_model(0, drop_path_rate=0.3).block_list()] == pytest.approx(
        [0.0, 0.1, 0.2, 0.3]
    )


def test_drop_path_masks_whole_samples_with_rescaling():
    torch.manual_seed(0)
    layout = TokenLayout(((6, 3), (4, 2)))
    residual = torch.ones(layout.num_tokens, 5)
    out = DropPath(0.5).train()(residual, layout)
    for crop in layout.unpack(out):
        per_sample = crop[:, :, 0]
        assert torch.all(per_sample == per_sample[:, :1])  # one draw per sample
        assert set(per_sample[:, 0].tolist()) <= {0.0, 2.0}
    assert torch.equal(DropPath(0.5).eval()(residual, layout), residual)


def test_residual_on_kept_samples_updates_subset_with_weight():
    torch.manual_seed(0)
    layout = TokenLayout(((5, 3), (4, 2)))
    x = torch.zeros(layout.num_tokens, 2)
    seen = []

    def branch(tokens, kept_layout):
        seen.append(kept_layout)
        return torch.ones_like(tokens)

    (drop,) = draw_branch_drops(layout, [0.4], x.device, x.dtype)
    out = add_residual(x, layout, branch, gamma=torch.tensor([1.0, 0.5]), drop=drop)
    assert seen == [TokenLayout(((3, 3), (2, 2)))]  # max(int(B·0.6), 1) samples per crop batch
    for crop, batch in zip(layout.unpack(out), (5, 4)):
        per_sample = crop[:, :, 0]
        assert torch.all(per_sample == per_sample[:, :1])
        kept = per_sample[:, 0] != 0
        assert torch.allclose(per_sample[kept, 0], torch.full((int(kept.sum()),), batch / int(kept.sum())))
        torch.testing.assert_close(crop[:, :, 1], crop[:, :, 0] * 0.5)  # LayerScale γ per channel
    assert [int((c[:, 0, 0] != 0).sum()) for c in layout.unpack(out)] == [3, 2]


def test_branch_drops_are_drawn_together_and_independently():
    """One draw call serves every branch of a rate: per-token scales in {0, 1/(1-p)} constant over a sample's
    tokens, kept-sample rows distinct within a branch, and branches not all alike."""
    torch.manual_seed(0)
    layout = TokenLayout(((8, 3), (6, 2)))
    drops = draw_branch_drops(layout, [0.0, 0.1, 0.5, 0.1, 0.5] * 4, torch.device("cpu"), torch.float32)
    assert drops[0] is None and drops[5] is None
    masks = [d.token_scale for d in drops if d is not None and d.rows is None]
    assert len(masks) == 8
    for mask in masks:
        assert mask.shape == (layout.num_tokens, 1)
        assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / 0.9)))
        for crop in layout.unpack(mask):
            assert torch.all(crop == crop[:, :1])
    subsets = [d for d in drops if d is not None and d.rows is not None]
    assert len(subsets) == 8
    for d in subsets:
        assert d.kept_layout == TokenLayout(((4, 3), (3, 2))) and d.row_scale == 2.0
        assert d.rows.unique().numel() == d.rows.numel() == 4 * 3 + 3 * 2
        assert d.rows[:12].max() < 24 <= d.rows[12:].min()  # each crop batch's rows stay in it
    assert len({tuple(d.rows.tolist()) for d in subsets}) > 1
    assert len({tuple(m.view(-1).tolist()) for m in masks}) > 1


def test_vit_draws_every_block_once_per_pass():
    """The packed forward equals the blocks applied one by one with the draws the ViT made for the pass."""
    model = tiny_reference_model(0, drop_path_rate=0.4, drop_path_uniform=True).train()
    crops = [torch.randn(4, 3, 28, 28), torch.randn(3, 3, 28, 42)]
    drawn = []
    draw = model._draw_drops
    model._draw_drops = lambda layout, packed: drawn.append(draw(layout, packed)) or drawn[-1]
    torch.manual_seed(3)
    out = model.forward_features(crops)
    (drops,) = drawn
    assert len(drops) == len(model.block_list()) and all(d[0].rows is not None for d in drops)
    tokens = [model.prepare_tokens_with_masks(x) for x in crops]
    layout = TokenLayout.of(tokens)
    packed = layout.pack(tokens)
    for block, block_drops in zip(model.block_list(), drops):
        packed = block(packed, layout, block_drops)
    for o, x in zip(out, layout.unpack(packed)):
        torch.testing.assert_close(o["x_prenorm"], x, rtol=0, atol=0)


def test_block_accepts_batch_list_and_packed_forms():
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, qkv_bias=True, init_values=0.5).eval()
    xs = [torch.randn(2, 5, 32), torch.randn(3, 9, 32)]
    with torch.no_grad():
        listed = block(xs)
        single = [block(x) for x in xs]
    for a, b in zip(listed, single):
        _close(a, b)


def test_position_embedding_interpolation_rules():
    model = _random_tiny()
    tokens = torch.zeros(1, 17, 64)
    assert model.interpolate_pos_encoding(tokens, 56, 56) is model.pos_embed
    # Same number of patches but a non-square image: the official code still resizes (to a 2×8 grid).
    resized = model.interpolate_pos_encoding(tokens, 28, 112)
    assert resized.shape == (1, 17, 64) and not torch.allclose(resized, model.pos_embed)
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0])
    exact = _random_tiny(interpolate_offset=0.0)
    same_grid = exact.interpolate_pos_encoding(torch.zeros(1, 17, 64), 56, 57)  # size path, 4×4 → 4×4
    torch.testing.assert_close(same_grid, exact.pos_embed)
    antialiased = _random_tiny(interpolate_antialias=True)
    with torch.no_grad():
        assert antialiased.forward_features(torch.randn(1, 3, 28, 42))["x_norm_patchtokens"].shape == (1, 6, 64)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.forward_features(torch.randn(1, 3, 50, 56))


def test_ffn_variants_and_widths():
    assert swiglu_hidden_features(256) == 176
    for ffn, keys in {
        "mlp": {"mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"},
        "swiglufused": {"mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"},
        "swiglu": {"mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"},
        "identity": set(),
    }.items():
        model = vits.vit_small(patch_size=14, img_size=28, depth=1, ffn_layer=ffn, init_values=1e-5, block_chunks=0)
        block_keys = {k.removeprefix("blocks.0.") for k in model.state_dict() if k.startswith("blocks.0.mlp.")}
        assert block_keys == keys
        assert model(torch.randn(1, 3, 28, 28)).shape == (1, 384)
    assert vits.vit_small(depth=1, ffn_layer="swiglu").blocks[0][0].mlp.w3.in_features == swiglu_hidden_features(1536)
    with pytest.raises(ValueError, match="unknown ffn_layer 'glu'"):
        vits.vit_small(depth=1, ffn_layer="glu")


def test_registers_and_chunk_layout():
    model = vits.vit_small(patch_size=14, img_size=28, depth=6, num_register_tokens=4, block_chunks=3, init_values=1e-5)
    keys = model.state_dict().keys()
    assert model.register_tokens.shape == (1, 4, 384)
    assert {
        "blocks.0.0.norm1.weight",
        "blocks.0.1.norm1.weight",
        "blocks.1.2.norm1.weight",
        "blocks.2.5.ls2.gamma",
    } <= keys
    assert "blocks.1.0.norm1.weight" not in keys
    assert len(model.block_list()) == model.n_blocks == 6
    out = model.forward_features(torch.randn(2, 3, 28, 28))
    assert out["x_norm_regtokens"].shape == (2, 4, 384) and out["x_norm_patchtokens"].shape == (2, 4, 384)
    assert model(torch.randn(2, 3, 28, 28), is_training=True).keys() == out.keys()


def _vit_parameter_count(dim: int, depth: int, heads: int, patch: int, img: int, mlp_ratio: float = 4.0) -> int:
    """Parameters of a SwiGLU-fused ViT with LayerScale and biases, from the architecture alone."""
    hidden = swiglu_hidden_features(int(dim * mlp_ratio))
    embed = 3 * patch * patch * dim + dim + dim * ((img // patch) ** 2 + 1) + dim + dim  # patch, pos, cls, mask
    block = (
        2 * dim  # norm1
        + dim * 3 * dim
        + 3 * dim  # qkv
        + dim * dim
        + dim  # proj
        + dim  # ls1
        + 2 * dim  # norm2
        + dim * 2 * hidden
        + 2 * hidden  # w12
        + hidden * dim
        + dim  # w3
        + dim  # ls2
    )
    return embed + depth * block + 2 * dim  # final norm


def test_vit_giant_on_meta_device_has_official_size_and_keys():
    with torch.device("meta"):
        model = vits.vit_giant2(patch_size=14, img_size=518, ffn_layer="swiglufused", init_values=1e-5, block_chunks=4)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == _vit_parameter_count(1536, 40, 24, 14, 518)
    assert count == 1_136_480_768  # the published DINOv2/Franca ViT-g/14 size (518 px position table)
    keys = set(model.state_dict())
    assert {"blocks.0.0.attn.qkv.weight", "blocks.1.10.mlp.w12.weight", "blocks.3.39.ls2.gamma", "mask_token"} <= keys
    assert not any(k.startswith("blocks.0.10.") for k in keys)
    assert model.blocks[1][10].mlp.w3.in_features == 4096
    with torch.device("meta"):
        flat = vits.vit_giant2(patch_size=14, img_size=224, ffn_layer="swiglufused", init_values=1e-5, block_chunks=0)
    assert "blocks.39.mlp.w3.bias" in flat.state_dict()
    assert sum(p.numel() for p in flat.parameters()) == _vit_parameter_count(1536, 40, 24, 14, 224)


def _student_cfg(**overrides):
    student = {
        "arch": "vit_small",
        "patch_size": 14,
        "drop_path_rate": 0.3,
        "layerscale": 1e-5,
        "drop_path_uniform": True,
        "ffn_layer": "mlp",
        "block_chunks": 2,
        "qkv_bias": True,
        "proj_bias": True,
        "ffn_bias": True,
        "num_register_tokens": 1,
        "interpolate_antialias": False,
        "interpolate_offset": 0.1,
        **overrides,
    }
    return OmegaConf.create({"student": student, "crops": {"global_crops_size": 28}})


def test_build_model_from_cfg(monkeypatch):
    monkeypatch.setattr(vits, "vit_tiny_test", lambda **kw: vits.vit_small(depth=2, **kw), raising=False)
    student, teacher, dim = build_model_from_cfg(_student_cfg(arch="vit_tiny_test"))
    assert dim == 384 and student.n_blocks == 2 and student.chunked_blocks and student.num_register_tokens == 1
    assert student.patch_embed.img_size == (28, 28) and student.patch_size == 14
    assert [b.sample_drop_ratio for b in student.block_list()] == [0.3, 0.3]
    assert [b.sample_drop_ratio for b in teacher.block_list()] == [0.0, 0.0]
    assert student.state_dict().keys() == teacher.state_dict().keys()
    teacher_only, dim = build_model_from_cfg(_student_cfg(arch="vit_tiny_test"), only_teacher=True)
    assert isinstance(teacher_only, DinoVisionTransformer) and dim == 384
    with pytest.raises(ValueError, match="did you mean 'vit_small'"):
        build_model_from_cfg(_student_cfg(arch="vit_smal"))
    with torch.device("meta"):
        student, _, _ = build_model(_student_cfg(arch="vit_large_memeff").student, img_size=224)
    assert student.embed_dim == 1024 and next(student.parameters()).is_meta


def test_final_norm_sees_batch_token_channel_tensors():
    """A replaced final norm (e.g. a RASA-folded one) gets (B, N, D) per crop batch, also for a list of crops."""
    model = _random_tiny(num_register_tokens=1).eval()
    shapes = []
    model.norm.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        model.forward_features([torch.randn(2, 3, 28, 28), torch.randn(3, 3, 56, 56)])
        model.get_intermediate_layers(torch.randn(1, 3, 28, 42), n=2)
    assert shapes == [(2, 6, 64), (3, 18, 64), (1, 8, 64), (1, 8, 64)]
