"""torch.hub entry points and the checkpoint reader: layouts, archive pieces, strict errors, offline use, RASA head."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, load_reference, rasa_head_file_state

import franca.hub.backbones as backbones
from franca.hub import CheckpointError, backbone_state_dict, load_backbone_weights, read_checkpoint
from franca.hub.release_caveats import RELEASE_CAVEATS
from franca.models.vision_transformer import DinoVisionTransformer

IO = load_reference("vit_tiny_p14_io.pth")
# The reference fixture backbone is vit_base narrowed to this size (patch 14, SwiGLU, LayerScale: the hub defaults).
TINY = {"img_size": 56, "embed_dim": 64, "depth": 4, "num_heads": 2}
UNREACHABLE = "http://127.0.0.1:9/releases"  # the discard port: connection refused at once, no network needed


def _assert_reference_features(model: torch.nn.Module) -> None:
    model.eval()
    x = IO["inputs"]["x56"]
    x = x["x"] if isinstance(x, dict) else x
    with torch.no_grad():
        got = model.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(got[key], IO["outputs"]["x56"][key], rtol=0, atol=1e-5)


@pytest.fixture
def hub_dir(tmp_path):
    """A private torch.hub cache folder for the test."""
    original = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(original)


def _hub_load(name: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(str(REPO_ROOT), name, source="local", trust_repo=True, **kwargs)


@pytest.mark.parametrize("layout", ["chunks4", "chunks0"])
@pytest.mark.parametrize("block_chunks", [None, 4])
def test_hub_load_local_state_dict_offline(reference_dir, layout, block_chunks):
    extra = {} if block_chunks is None else {"block_chunks": block_chunks}
    path = reference_dir / f"vit_tiny_p14_ckpt_{layout}.pth"
    model = _hub_load("franca_vitb14", pretrained=True, local_state_dict=str(path), **TINY, **extra)
    assert model.chunked_blocks == (block_chunks is not None)
    if block_chunks is None:  # like the official hub: flat blocks, model.blocks[i] is block i
        assert len(model.blocks) == model.n_blocks == 4
    _assert_reference_features(model)


def _split_archive(checkpoint: Path, folder: Path, stem: str, pieces: int = 3) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(checkpoint, arcname=f"{stem}.pth")
    data = buffer.getvalue()
    size = -(-len(data) // pieces)
    folder.mkdir()
    for i in range(pieces):
        (folder / f"{stem}_chunked.tar.gz.part_a{'abcdefgh'[i]}").write_bytes(data[i * size : (i + 1) * size])


def test_hub_load_from_folder_of_archive_pieces(reference_dir, tmp_path):
    _split_archive(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth", tmp_path / "vitg", "franca_vitg14_Laion600M")
    model = _hub_load("franca_vitg14", weights="LAION", local_state_dict=str(tmp_path / "vitg"), **TINY)
    _assert_reference_features(model)
    assert not any(tmp_path.glob("vitg/*.pth"))  # extraction went to a temporary folder
    with pytest.raises(FileNotFoundError, match=r"no checkpoint pieces matching '\*\.tar\.gz\.part_\*'"):
        read_checkpoint(tmp_path)


def test_hub_download_through_torch_hub_cache(reference_dir, tmp_path, monkeypatch, hub_dir):
    """A release file reachable at the release URL is fetched into $TORCH_HOME once and loaded from there."""
    release = tmp_path / "release"
    (release / "v1.0.0").mkdir(parents=True)
    (release / "v1.1.0").mkdir()
    fixture = (reference_dir / "vit_tiny_p14_ckpt_chunks0.pth").read_bytes()
    (release / "v1.0.0" / "franca_vitl14_Laion600M.pth").write_bytes(fixture)
    (release / "v1.1.0" / "franca_vitl14_Laion_518.pth").write_bytes(fixture)
    _split_archive(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth", release / "g", "franca_vitg14_Laion600M")
    for piece in (release / "g").iterdir():
        piece.rename(release / "v1.0.0" / piece.name)
    monkeypatch.setattr(backbones, "RELEASE_URL", release.as_uri())
    _assert_reference_features(backbones.franca_vitl14(weights="LAION", **TINY))
    _assert_reference_features(backbones.franca_vitl14(weights="LAION_518", **TINY))
    _assert_reference_features(backbones.franca_vitg14(weights="LAION", **TINY))
    cached = {p.name for p in (hub_dir / "checkpoints").iterdir()}
    assert cached == {"franca_vitl14_Laion600M.pth", "franca_vitl14_Laion_518.pth", "franca_vitg14_Laion600M.pth"}


def test_offline_without_local_file_says_what_to_do(monkeypatch, hub_dir):
    monkeypatch.setattr(backbones, "RELEASE_URL", UNREACHABLE)
    with pytest.raises(ConnectionError, match=r"franca_vitl14_Laion600M\.pth.*pass local_state_dict=PATH"):
        backbones.franca_vitl14(weights="LAION", **TINY)
    with pytest.raises(ConnectionError, match=r"franca_vitg14_Laion600M_chunked\.tar\.gz\.part_aa.*local_state_dict"):
        backbones.franca_vitg14(weights="LAION", **TINY)
    with pytest.raises(ConnectionError, match=r"franca_vitb14_In21K_rasa\.pth.*RASA_local_state_dict=PATH"):
        backbones.franca_vitb14(pretrained=False, use_rasa_head=True, **TINY)


def _tampered_checkpoint(reference_dir: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth", weights_only=True)
    edit(checkpoint["teacher"])
    path = tmp_path / "tampered.pth"
    torch.save(checkpoint, path)
    return path


def test_strict_loading_errors_name_keys_and_shapes(reference_dir, tmp_path):
    missing = _tampered_checkpoint(reference_dir, tmp_path, lambda sd: sd.pop("backbone.blocks.2.2.ls1.gamma"))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\.ls1\.gamma$"):
        _hub_load("franca_vitb14", local_state_dict=str(missing), **TINY)

    def add_key(sd):
        sd["backbone.extra_token"] = torch.zeros(3)

    unexpected = _tampered_checkpoint(reference_dir, tmp_path, add_key)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra_token$"):
        _hub_load("franca_vitb14", local_state_dict=str(unexpected), **TINY)

    def widen(sd):
        sd["backbone.blocks.1.1.attn.qkv.weight"] = torch.zeros(96, 64)

    mismatched = _tampered_checkpoint(reference_dir, tmp_path, widen)
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.attn\.qkv\.weight checkpoint \(96, 64\) vs model \(192, 64\)"
    ):
        _hub_load("franca_vitb14", local_state_dict=str(mismatched), **TINY)

    with pytest.raises(CheckpointError, match=r"pos_embed checkpoint \(1, 17, 64\) vs model \(1, 1370, 64\)"):
        backbones.franca_vitb14(
            local_state_dict=reference_dir / "vit_tiny_p14_ckpt_chunks4.pth", embed_dim=64, depth=4, num_heads=2
        )
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.pth"):
        _hub_load("franca_vitb14", local_state_dict=str(tmp_path / "nowhere.pth"), **TINY)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        read_checkpoint(tmp_path / "list.pth")


def test_reader_selects_entry_and_strips_prefixes(reference_dir, tmp_path):
    teacher = torch.load(reference_dir / "vit_tiny_p14_ckpt_chunks0.pth", weights_only=True)["teacher"]
    wrapped = {"module." + k: v for k, v in teacher.items()}
    for entry in ("model", "state_dict"):
        torch.save({entry: wrapped, "iteration": 7}, tmp_path / f"{entry}.pth")
        state = backbone_state_dict(read_checkpoint(tmp_path / f"{entry}.pth"))
        assert set(state) == {k.removeprefix("backbone.") for k in teacher}
    heads = torch.load(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth", weights_only=True)["teacher"]
    assert any(k.startswith("dino_head.") for k in heads) and any(k.startswith("ibot_head.") for k in heads)
    assert not any(k.startswith(("dino_head.", "ibot_head.")) for k in backbone_state_dict(heads))


def test_load_into_meta_model_assigns_tensors(reference_dir):
    with torch.device("meta"):
        model = backbones.franca_vitb14(pretrained=False, **TINY)
    load_backbone_weights(model, reference_dir / "vit_tiny_p14_ckpt_chunks4.pth")
    assert not any(p.is_meta for p in model.parameters())
    _assert_reference_features(model)


def test_rasa_head_attached_from_local_file(reference_dir, tmp_path):
    torch.manual_seed(0)
    rasa_state = {f"pre_pos_layers.{i}.weight": torch.randn(2, 64) for i in range(3)}
    rasa_state["pos_pred.weight"] = torch.randn(2, 64)
    torch.save(rasa_state, tmp_path / "rasa.pth")
    model = _hub_load(
        "franca_vitb14",
        local_state_dict=str(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth"),
        use_rasa_head=True,
        RASA_local_state_dict=str(tmp_path / "rasa.pth"),
        **TINY,
    ).eval()
    assert model.rasa_head.n_pos_layers == 3
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        out = model.forward_features(x, use_rasa_head=True)
        plain = model.forward_features(x)
    assert "patch_token_rasa" not in plain
    torch.testing.assert_close(out["x_norm_patchtokens"], plain["x_norm_patchtokens"])
    debiased = out["patch_token_rasa"]
    assert debiased.shape == (2, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(debiased, model.rasa_head(out["x_norm_patchtokens"]))
    # The last position read-out (pos_pred, applied after the pre_pos_layers) is projected out of the tokens.
    residual = (debiased @ rasa_state["pos_pred.weight"].T).abs().max() / debiased.abs().max()
    assert residual < 1e-5 and not torch.allclose(debiased, out["x_norm_patchtokens"])
    # The backbone weights still load into a model carrying a RASA head.
    load_backbone_weights(model, reference_dir / "vit_tiny_p14_ckpt_chunks0.pth")
    bare = DinoVisionTransformer(patch_size=14, **TINY)
    with pytest.raises(ValueError, match="no RASA head is attached"):
        bare.forward_features(x, use_rasa_head=True)


@pytest.mark.parametrize("n_pre_pos_layers", [8, 9])
def test_both_release_rasa_head_layouts_load_through_the_hub(
    reference_dir, tmp_path, monkeypatch, hub_dir, n_pre_pos_layers
):
    """Legacy (8 pre-position layers) and current (9) RASA head files, from a local path and from the release URL."""
    state = rasa_head_file_state(n_pre_pos_layers)
    release = tmp_path / "release"
    (release / "v1.0.0").mkdir(parents=True)
    torch.save(state, release / "v1.0.0" / "franca_vitb14_In21K_rasa.pth")
    monkeypatch.setattr(backbones, "RELEASE_URL", release.as_uri())
    backbone = str(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth")
    local = _hub_load(
        "franca_vitb14",
        local_state_dict=backbone,
        use_rasa_head=True,
        RASA_local_state_dict=str(release / "v1.0.0" / "franca_vitb14_In21K_rasa.pth"),
        **TINY,
    ).eval()
    downloaded = backbones.franca_vitb14(local_state_dict=backbone, use_rasa_head=True, **TINY).eval()
    x = torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    for model in (local, downloaded):
        assert model.rasa_head.n_pos_layers == n_pre_pos_layers
        with torch.no_grad():
            out = model.forward_features(x, use_rasa_head=True)
        expected = out["x_norm_patchtokens"] @ model.rasa_head.debias_matrix()
        torch.testing.assert_close(out["patch_token_rasa"], expected, rtol=0, atol=1e-5)
        residual = (out["patch_token_rasa"] @ state["pos_pred.weight"].T).abs().max()  # the last read-out is blind
        assert residual < 1e-5 * out["patch_token_rasa"].abs().max()


def test_withdrawn_and_incomplete_releases_are_not_downloaded(monkeypatch, hub_dir):
    """ViT-L/14 IN-21K (identical to DINOv2-L) and ViT-g/14 IN-21K (incomplete): an error before any download."""
    monkeypatch.setattr(backbones, "RELEASE_URL", UNREACHABLE)  # a download attempt would be a ConnectionError
    withdrawn = (
        r"vit_large weights='IN21K' are withdrawn \(valeoai/Franca release_checkpoints\.md\): .*identical to DINOv2-L"
    )
    with pytest.raises(ValueError, match=withdrawn + r".*use weights='LAION'.*weights='DINOV2_IN21K'"):
        backbones.franca_vitl14(weights="IN21K", **TINY)
    with pytest.raises(ValueError, match=withdrawn):  # its RASA head is not fetched either
        backbones.franca_vitl14(pretrained=False, weights="IN21K", use_rasa_head=True, **TINY)
    with pytest.raises(ValueError, match=r"vit_giant2 weights='IN21K' are incomplete .*use weights='LAION'"):
        _hub_load("franca_vitg14", weights="IN21K", **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no weights involved: no error and no warning
        backbones.franca_vitl14(pretrained=False, **TINY)
        backbones.franca_vitg14(pretrained=False, **TINY)
    assert {(arch, weights) for arch, weights in RELEASE_CAVEATS} <= {
        (arch, w.name) for arch in ("vit_base", "vit_large", "vit_giant2") for w in backbones.Weights
    }


def test_local_file_for_a_withdrawn_release_loads_with_a_warning(reference_dir, tmp_path):
    torch.save(rasa_head_file_state(8), tmp_path / "rasa.pth")
    path = str(reference_dir / "vit_tiny_p14_ckpt_chunks4.pth")
    with pytest.warns(UserWarning, match=r"withdrawn .*identical to DINOv2-L.*loading the local file as given"):
        model = backbones.franca_vitl14(weights="IN21K", local_state_dict=path, **TINY)
    _assert_reference_features(model)
    with pytest.warns(UserWarning, match=r"vit_giant2 weights='IN21K' are incomplete"):
        model = backbones.franca_vitg14(
            weights="IN21K",
            local_state_dict=path,
            use_rasa_head=True,
            RASA_local_state_dict=str(tmp_path / "rasa.pth"),
            **TINY,
        )
    _assert_reference_features(model)
    assert model.rasa_head.n_pos_layers == 8


def test_weights_names_and_image_sizes():
    assert backbones.franca_vitb14(pretrained=False, embed_dim=64, depth=1, num_heads=2).patch_embed.img_size == (
        518,
        518,
    )
    dinov2 = backbones.franca_vitb14(pretrained=False, weights="DINOV2_IN21K", embed_dim=64, depth=1, num_heads=2)
    assert dinov2.patch_embed.img_size == (224, 224)
    assert (
        backbones.franca_vitl14(pretrained=False, weights="laion600m", embed_dim=64, depth=1, num_heads=2).patch_size
        == 14
    )
    with pytest.raises(
        ValueError,
        match=r"weights 'LAION' are not published for vit_base; available: IN21K, IN21K_224, DINOV2_IN21K, "
        r"DINOV2_IN21K_518$",
    ):
        backbones.franca_vitb14(weights="LAION", embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="unsupported weights 'IN1K'; expected one of IN21K, IN21K_224, LAION, "):
        backbones.franca_vitl14(weights="IN1K")
    assert backbones.release_name("vit_giant2", 14, backbones.Weights.LAION) == "franca_vitg14_Laion600M"


def test_release_table_names_sizes_and_rasa_heads():
    """The upstream v1.0.0 / v1.1.0 release layout: file names, tags, native sizes, RASA heads, errors."""
    from franca.hub.releases import RELEASES, Weights, backbone_urls, native_img_size, rasa_url

    base = "https://github.com/valeoai/Franca/releases/download"
    expected = {
        ("vit_base", "IN21K"): ("v1.0.0/franca_vitb14_In21K", 518, True),
        ("vit_base", "IN21K_224"): ("v1.1.0/franca_vitb14_In21K_224", 224, False),
        ("vit_base", "DINOV2_IN21K"): ("v1.1.0/franca_vitb14_Dinov2_In21K", 224, False),
        ("vit_base", "DINOV2_IN21K_518"): ("v1.1.0/franca_vitb14_Dinov2_In21K_518", 518, True),
        ("vit_large", "LAION"): ("v1.0.0/franca_vitl14_Laion600M", 518, True),
        ("vit_large", "LAION_224"): ("v1.1.0/franca_vitl14_Laion600M_224", 224, False),
        ("vit_large", "DINOV2_IN21K"): ("v1.1.0/franca_vitl14_Dinov2_In21K", 224, False),
        ("vit_large", "DINOV2_IN21K_518"): ("v1.1.0/franca_vitl14_Dinov2_In21K_518", 518, True),
        ("vit_large", "LAION_518"): ("v1.1.0/franca_vitl14_Laion_518", 518, True),
        ("vit_giant2", "LAION"): ("v1.0.0/franca_vitg14_Laion600M", 224, True),
    }
    assert {(arch, w.name) for arch, w in RELEASES} == set(expected)
    for (arch, name), (stem, size, has_rasa) in expected.items():
        weights = Weights[name]
        urls = backbone_urls(arch, 14, weights)
        if arch == "vit_giant2":
            assert urls == [f"{base}/{stem}_chunked.tar.gz.part_{p}" for p in ("aa", "ab", "ac")]
        else:
            assert urls == [f"{base}/{stem}.pth"]
        assert native_img_size(arch, weights) == size
        if has_rasa:
            assert rasa_url(arch, 14, weights) == f"{base}/{stem}_rasa.pth"
        else:
            with pytest.raises(ValueError, match=rf"no RASA head is published for {arch} weights='{name}'"):
                rasa_url(arch, 14, weights)
    assert not set(RELEASE_CAVEATS) & {(arch, w.name) for arch, w in RELEASES}  # withdrawn ones are not offered


def test_hub_uses_the_native_size_and_names_the_available_weights(monkeypatch, hub_dir):
    small = {"embed_dim": 64, "depth": 1, "num_heads": 2}
    assert backbones.franca_vitl14(pretrained=False, **small).patch_embed.img_size == (518, 518)  # LAION default
    assert backbones.franca_vitl14(pretrained=False, weights="LAION_224", **small).patch_embed.img_size == (224, 224)
    assert backbones.franca_vitb14(pretrained=False, weights="IN21K_224", **small).patch_embed.img_size == (224, 224)
    assert backbones.franca_vitg14(pretrained=False, **small).patch_embed.img_size == (224, 224)
    monkeypatch.setattr(backbones, "RELEASE_URL", UNREACHABLE)
    with pytest.raises(ValueError, match=r"weights 'DINOV2_IN21K' are not published for vit_giant2; available: LAION$"):
        backbones.franca_vitg14(weights="DINOV2_IN21K", **small)
    with pytest.raises(ValueError, match=r"no RASA head is published for vit_base weights='IN21K_224'"):
        backbones.franca_vitb14(pretrained=False, weights="IN21K_224", use_rasa_head=True, **small)
    with pytest.raises(ConnectionError, match=r"v1\.1\.0/franca_vitl14_Laion_518_rasa\.pth"):
        backbones.franca_vitl14(pretrained=False, weights="LAION_518", use_rasa_head=True, **small)
