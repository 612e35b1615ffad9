"""timm files: a flat DINOv2-named backbone state dict ``FILE`` plus ``FILE.json`` = ``{"model_name", "kwargs"}``.

``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": FILE}, **kwargs)`` rebuilds the
backbone: timm recognises DINOv2 files by their ``mask_token`` and converts them on load (``mlp.w12``/``w3`` →
``mlp.fc1``/``fc2`` of its packed SwiGLU; with registers the class token absorbs its position embedding and
``register_tokens`` become ``reg_token``, ``no_embed_class=True``). The kwargs are plain JSON; the one setting that
is a class, ``mlp_layer`` (``SwiGLUPacked`` with ``SiLU`` for SwiGLU), comes with the model name: timm's
``vit_giant_patch14[_reg4]_dinov2`` builders set it, ``vit_base_patch14[_reg4]_dinov2`` use the plain MLP, and
the kwargs override width, depth, heads, ``mlp_ratio`` (``2·hidden / D`` for packed SwiGLU), patch and image
size, ``init_values`` (gammas of ones are written for a backbone without LayerScale), biases, ``reg_tokens`` and ``num_classes=0``. ``forward_features`` then returns
``[cls, registers, patches]`` after the final norm.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from franca.export.layout import BackboneLayout, describe, flat_state_dict
from franca.export.patch_map import split_tokens
from franca.export.safetensors_export import save_safetensors
from franca.utils.io import atomic_save, atomic_write_text

SPEC_SUFFIX = ".json"
PATCH_MAP_SUFFIX = ".rasa_patch_map.safetensors"


def _mlp_ratio(layout: BackboneLayout) -> float:
    """A ratio ``r`` with ``int(D · r)`` equal to fc1's output width (twice the hidden width for packed SwiGLU)."""
    width = 2 * layout.hidden_features if layout.swiglu else layout.hidden_features
    ratio = width / layout.embed_dim
    return ratio if int(layout.embed_dim * ratio) == width else (width + 0.5) / layout.embed_dim


def timm_spec(layout: BackboneLayout, img_size: int) -> dict[str, Any]:
    """``{"model_name": ..., "kwargs": {...}}`` rebuilding ``layout`` at ``img_size`` in timm."""
    if layout.proj_bias != layout.ffn_bias:
        raise ValueError("timm has one proj_bias for attention and FFN outputs; this backbone sets them differently")
    family = "vit_giant_patch14" if layout.swiglu else "vit_base_patch14"
    registers = layout.num_register_tokens
    name = f"{family}_reg4_dinov2" if registers else f"{family}_dinov2"
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": layout.patch_size,
        "embed_dim": layout.embed_dim,
        "depth": layout.depth,
        "num_heads": layout.num_heads,
        "mlp_ratio": _mlp_ratio(layout),
        "init_values": 1.0,  # LayerScale gammas are in the file (ones for a backbone without LayerScale)
        "qkv_bias": layout.qkv_bias,
        "proj_bias": layout.proj_bias,
        "reg_tokens": registers,
        "no_embed_class": bool(registers),
        "num_classes": 0,
    }
    return {"model_name": name, "kwargs": kwargs}


def write_timm(backbone: nn.Module, path: Path, img_size: int, patch_map: dict[str, Tensor] | None) -> list[Path]:
    """Write ``path`` (state dict), ``path.json`` (model name and kwargs) and, for folded RASA, the patch map."""
    layout = describe(backbone)
    spec = timm_spec(layout, img_size)
    state_dict = flat_state_dict(backbone)
    if not layout.layerscale:
        for i in range(layout.depth):
            state_dict.update({f"blocks.{i}.ls{k}.gamma": torch.ones(layout.embed_dim) for k in (1, 2)})
    atomic_save({key: value.clone().contiguous() for key, value in state_dict.items()}, path)
    spec_path = path.with_name(path.name + SPEC_SUFFIX)
    written = [path, spec_path]
    if patch_map is not None:
        patch_map_path = path.with_name(path.name + PATCH_MAP_SUFFIX)
        save_safetensors(patch_map, patch_map_path)
        spec["rasa_patch_map"] = patch_map_path.name
        written.append(patch_map_path)
    atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")
    return written


class TimmRunner:
    """Builds the model as a timm user would from ``FILE`` and ``FILE.json``; ``runner(images)`` → named tokens."""

    def __init__(self, path: Path) -> None:
        import timm

        spec = json.loads(path.with_name(path.name + SPEC_SUFFIX).read_text())
        self.model = timm.create_model(
            spec["model_name"], pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **spec["kwargs"]
        ).eval()
        self.registers = spec["kwargs"]["reg_tokens"]
        self.patch_map = None
        if "rasa_patch_map" in spec:
            from safetensors.torch import load_file

            self.patch_map = load_file(path.with_name(spec["rasa_patch_map"]))

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        tokens = self.model.forward_features(images)
        return split_tokens(tokens, self.registers, self.patch_map)
