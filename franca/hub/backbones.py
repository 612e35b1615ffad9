"""torch.hub entry points for the released Franca backbones (ViT-B/14, ViT-L/14, ViT-g/14).

Release files are fetched from the official GitHub release through torch.hub's cache (``$TORCH_HOME/hub/
checkpoints``); the ViT-g file ships as three ``*_chunked.tar.gz.part_*`` pieces that are reassembled there once.
Offline, pass ``local_state_dict`` (a ``.pth`` file or a folder holding the pieces). Withdrawn or incomplete releases
(ViT-L/14 and ViT-g/14 IN-21K) are not downloaded, see :mod:`franca.hub.release_caveats`. Returned backbones use the
flat block layout (``model.blocks[i]``) like the official hub, unless ``block_chunks`` is passed; checkpoints of
either layout load.
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from franca.hub.loading import extract_checkpoint_parts, load_backbone_weights, read_checkpoint
from franca.hub.release_caveats import check_release_weights
from franca.layers.rasa_head import load_rasa_head
from franca.models import build_model

RELEASE_URL = "https://github.com/valeoai/Franca/releases/download/v1.0.0"
_VITG_PIECES = ("chunked.tar.gz.part_aa", "chunked.tar.gz.part_ab", "chunked.tar.gz.part_ac")

# Architecture settings of the released backbones (keys of cfg.student); any of them can be overridden.
HUB_BACKBONE_CONFIG: dict[str, Any] = {
    "patch_size": 14,
    "layerscale": 1.0e-05,
    "ffn_layer": "swiglufused",
    "block_chunks": 0,
    "qkv_bias": True,
    "proj_bias": True,
    "ffn_bias": True,
    "num_register_tokens": 0,
    "interpolate_antialias": False,
    "interpolate_offset": 0.1,
}


class Weights(Enum):
    """Released pretraining runs (the value is the name used in the release file names)."""

    IN21K = "In21K"
    LAION = "Laion600M"
    DINOV2_IN21K = "Dinov2_In21K"


def _parse_weights(weights: Weights | str) -> Weights:
    if isinstance(weights, Weights):
        return weights
    for option in Weights:
        if weights.lower() in (option.name.lower(), option.value.lower()):
            return option
    raise ValueError(f"unsupported weights {weights!r}; expected one of {', '.join(w.name for w in Weights)}")


def release_name(arch_name: str, patch_size: int, weights: Weights) -> str:
    """Official file stem, e.g. ``franca_vitl14_In21K`` (``vit_giant2`` → ``vitg``)."""
    return f"franca_{arch_name.replace('_', '')[:4]}{patch_size}_{weights.value}"


def _unreachable(url: str, error: Exception, argument: str) -> ConnectionError:
    return ConnectionError(
        f"could not download {url} ({error}); without network access, fetch the file elsewhere and pass {argument}=PATH"
    )


def _download_state_dict(url: str, argument: str) -> dict:
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise _unreachable(url, error, argument) from error


def _download_pieces(urls: list[str], file_name: str) -> Path:
    """Download the archive pieces into torch.hub's cache once and reassemble them into ``file_name`` there."""
    model_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = model_dir / file_name
    if cached.exists():
        return cached
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir) as pieces_dir:
        for url in urls:
            try:
                torch.hub.download_url_to_file(url, os.path.join(pieces_dir, url.rsplit("/", 1)[-1]))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                raise _unreachable(url, error, "local_state_dict") from error
        return extract_checkpoint_parts(pieces_dir, cached)


def _release_state_dict(arch_name: str, patch_size: int, weights: Weights) -> dict:
    name = release_name(arch_name, patch_size, weights)
    if arch_name == "vit_giant2":
        urls = [f"{RELEASE_URL}/{name}_{piece}" for piece in _VITG_PIECES]
        return read_checkpoint(_download_pieces(urls, f"{name}.pth"))
    return _download_state_dict(f"{RELEASE_URL}/{name}.pth", "local_state_dict")


def _attach_rasa_head(model: nn.Module, source: str | os.PathLike | dict) -> None:
    model.rasa_head = load_rasa_head(source, input_dim=model.embed_dim)


def _make_franca_model(
    *,
    arch_name: str = "vit_large",
    img_size: int = 224,
    pretrained: bool = True,
    weights: Weights | str = Weights.IN21K,
    use_rasa_head: bool = False,
    local_state_dict: str | os.PathLike | None = None,
    RASA_local_state_dict: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``arch_name`` with the release settings (overridable by ``kwargs``) and load the requested weights.

    ``kwargs`` keys of :data:`HUB_BACKBONE_CONFIG` change the architecture settings; any other keyword goes to the
    model builder (e.g. ``drop_path_rate``, ``attn_backend``, or ``embed_dim``/``depth``/``num_heads``).
    With ``use_rasa_head`` the RASA head (from ``RASA_local_state_dict`` or the release) is attached as
    ``model.rasa_head`` and ``forward_features(x, use_rasa_head=True)`` adds ``patch_token_rasa``.
    """
    weights = _parse_weights(weights)
    if pretrained and weights == Weights.LAION and arch_name == "vit_base":
        raise ValueError("Franca ViT-B/14 has no LAION weights; use weights='IN21K' or pretrained=False")
    check_release_weights(
        arch_name,
        weights,
        downloads=(pretrained and local_state_dict is None) or (use_rasa_head and RASA_local_state_dict is None),
        loads_local=(pretrained and local_state_dict is not None)
        or (use_rasa_head and RASA_local_state_dict is not None),
    )
    config = {"arch": arch_name, **HUB_BACKBONE_CONFIG}
    config.update({key: kwargs.pop(key) for key in HUB_BACKBONE_CONFIG if key in kwargs})
    model, _ = build_model(config, only_teacher=True, img_size=img_size, **kwargs)

    if pretrained:
        if local_state_dict is not None:
            load_backbone_weights(model, local_state_dict)
        else:
            load_backbone_weights(model, _release_state_dict(arch_name, config["patch_size"], weights))

    if use_rasa_head:
        if RASA_local_state_dict is not None:
            _attach_rasa_head(model, RASA_local_state_dict)
        else:
            name = release_name(arch_name, config["patch_size"], weights)
            url = f"{RELEASE_URL}/{name}_rasa.pth"
            _attach_rasa_head(model, _download_state_dict(url, "RASA_local_state_dict"))
    return model


def franca_vitb14(*, pretrained: bool = True, weights: Weights | str = Weights.IN21K, **kwargs: Any) -> nn.Module:
    """Franca ViT-B/14 pretrained on ImageNet-21k (``img_size`` 518 by default, 224 for ``DINOV2_IN21K``)."""
    default_size = 224 if _parse_weights(weights) == Weights.DINOV2_IN21K else 518
    kwargs.setdefault("img_size", default_size)
    return _make_franca_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **kwargs)


def franca_vitl14(*, pretrained: bool = True, weights: Weights | str = Weights.IN21K, **kwargs: Any) -> nn.Module:
    """Franca ViT-L/14 on LAION-600M or the DINOv2 IN-21K baseline (``img_size`` 224; Franca IN-21K is withdrawn)."""
    return _make_franca_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **kwargs)


def franca_vitg14(*, pretrained: bool = True, weights: Weights | str = Weights.IN21K, **kwargs: Any) -> nn.Module:
    """Franca ViT-g/14 pretrained on LAION-600M (``img_size`` 224 by default; the IN-21K release is incomplete)."""
    return _make_franca_model(arch_name="vit_giant2", pretrained=pretrained, weights=weights, **kwargs)
