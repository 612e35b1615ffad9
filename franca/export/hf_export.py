"""Hugging Face transformers folders: ``config.json`` + ``model.safetensors`` loading as ``Dinov2Model``.

``Dinov2WithRegistersModel`` when the backbone has registers. Weights are written under the names of the published
DINOv2 checkpoints on the Hugging Face hub (``facebook/dinov2-*``), which every transformers version from 4.48 loads
(5.x renames them on load):

| ours (flat blocks) | transformers |
|---|---|
| ``cls_token``, ``mask_token``, ``register_tokens`` | ``embeddings.cls_token``, ``.mask_token``, ``.register_tokens`` |
| ``pos_embed`` | ``embeddings.position_embeddings`` |
| ``patch_embed.proj`` | ``embeddings.patch_embeddings.projection`` |
| ``blocks.i.attn.qkv`` (3D × D, rows q, k, v) | ``encoder.layer.i.attention.attention.{query,key,value}`` |
| ``blocks.i.attn.proj`` | ``encoder.layer.i.attention.output.dense`` |
| ``blocks.i.ls{1,2}.gamma`` (ones without LayerScale) | ``encoder.layer.i.layer_scale{1,2}.lambda1`` |
| ``blocks.i.mlp.fc{1,2}`` / ``mlp.w12``, ``mlp.w3`` | ``mlp.fc{1,2}`` / ``mlp.weights_in``, ``mlp.weights_out`` |
| ``norm`` | ``layernorm`` |

transformers always has the output-projection and FFN biases: a backbone without them gets zero biases. Its
``mlp_ratio`` is an integer, so the FFN width must be ``int(D · r)`` (MLP) or ``(int(int(D · r)·2/3) + 7)//8·8``
(SwiGLU) for an integer ``r``. ``last_hidden_state`` is ``[cls, registers, patches]`` after the final norm, i.e.
our ``x_norm_clstoken`` / ``x_norm_regtokens`` / ``x_norm_patchtokens``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from franca.export.layout import BackboneLayout, describe, flat_state_dict
from franca.export.patch_map import split_tokens
from franca.export.safetensors_export import save_safetensors
from franca.export.verify import VerificationError

WEIGHTS_FILE = "model.safetensors"
PATCH_MAP_FILE = "rasa_patch_map.safetensors"
_MAX_MLP_RATIO = 16


def _mlp_ratio(layout: BackboneLayout) -> int:
    for ratio in range(1, _MAX_MLP_RATIO + 1):
        width = int(layout.embed_dim * ratio)
        if layout.swiglu:
            width = (int(width * 2 / 3) + 7) // 8 * 8
        if width == layout.hidden_features:
            return ratio
    kind = "SwiGLU" if layout.swiglu else "MLP"
    raise ValueError(
        f"transformers cannot express a {kind} hidden width of {layout.hidden_features} for width "
        f"{layout.embed_dim} (its mlp_ratio is an integer)"
    )


def hf_config(layout: BackboneLayout, img_size: int):
    """The ``Dinov2Config`` (or ``Dinov2WithRegistersConfig``) of ``layout`` at ``img_size``."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    settings = dict(
        hidden_size=layout.embed_dim,
        num_hidden_layers=layout.depth,
        num_attention_heads=layout.num_heads,
        mlp_ratio=_mlp_ratio(layout),
        hidden_act="gelu",
        layer_norm_eps=layout.eps,
        image_size=img_size,
        patch_size=layout.patch_size,
        qkv_bias=layout.qkv_bias,
        layerscale_value=1.0,
        use_swiglu_ffn=layout.swiglu,
    )
    if layout.num_register_tokens:
        config = Dinov2WithRegistersConfig(num_register_tokens=layout.num_register_tokens, **settings)
        config.architectures = ["Dinov2WithRegistersModel"]
    else:
        config = Dinov2Config(**settings)
        config.architectures = ["Dinov2Model"]
    return config


def _linear(out: dict[str, Tensor], name: str, weight: Tensor, bias: Tensor | None) -> None:
    out[f"{name}.weight"] = weight
    out[f"{name}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


def hf_state_dict(backbone: nn.Module, layout: BackboneLayout) -> dict[str, Tensor]:
    """The backbone's weights under the Hugging Face hub DINOv2 names (see module doc), contiguous copies."""
    ours = flat_state_dict(backbone)
    out = {
        "embeddings.cls_token": ours["cls_token"],
        "embeddings.mask_token": ours["mask_token"].reshape(1, -1),
        "embeddings.position_embeddings": ours["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": ours["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": ours["patch_embed.proj.bias"],
        "layernorm.weight": ours["norm.weight"],
        "layernorm.bias": ours["norm.bias"],
    }
    if layout.num_register_tokens:
        out["embeddings.register_tokens"] = ours["register_tokens"]
    ones = torch.ones(layout.embed_dim)
    for i in range(layout.depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{dst}{norm}.weight"] = ours[f"{src}{norm}.weight"]
            out[f"{dst}{norm}.bias"] = ours[f"{src}{norm}.bias"]
        qkv_bias = ours.get(f"{src}attn.qkv.bias")
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * layout.embed_dim, (j + 1) * layout.embed_dim)
            out[f"{dst}attention.attention.{name}.weight"] = ours[f"{src}attn.qkv.weight"][rows]
            if qkv_bias is not None:
                out[f"{dst}attention.attention.{name}.bias"] = qkv_bias[rows]
        _linear(out, f"{dst}attention.output.dense", ours[f"{src}attn.proj.weight"], ours.get(f"{src}attn.proj.bias"))
        for k in (1, 2):
            out[f"{dst}layer_scale{k}.lambda1"] = ours.get(f"{src}ls{k}.gamma", ones)
        pairs = (("w12", "weights_in"), ("w3", "weights_out")) if layout.swiglu else (("fc1", "fc1"), ("fc2", "fc2"))
        for ours_name, hf_name in pairs:
            _linear(
                out, f"{dst}mlp.{hf_name}", ours[f"{src}mlp.{ours_name}.weight"], ours.get(f"{src}mlp.{ours_name}.bias")
            )
    return {key: value.float().clone().contiguous() for key, value in out.items()}


def write_hf(backbone: nn.Module, folder: Path, img_size: int, patch_map: dict[str, Tensor] | None) -> list[Path]:
    """Write ``config.json``, ``model.safetensors`` (and ``rasa_patch_map.safetensors``) into ``folder``; returns
    ``[folder]``."""
    layout = describe(backbone)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config(layout, img_size).save_pretrained(folder)
    save_safetensors(hf_state_dict(backbone, layout), folder / WEIGHTS_FILE)
    if patch_map is not None:
        save_safetensors(patch_map, folder / PATCH_MAP_FILE)
    return [folder]


class HFRunner:
    """Loads a folder with ``transformers.AutoModel`` (strictly: no missing/unexpected/mismatched key) and runs it.

    ``runner(images)`` → ``{"cls_token", "patch_tokens"[, "register_tokens"]}`` from ``last_hidden_state``; the
    patch map of a folded RASA norm (``rasa_patch_map.safetensors``) is applied to the patch tokens.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModel

        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {name: sorted(map(str, keys)) for name, keys in problems.items() if keys}
        if problems:
            raise VerificationError(f"transformers loads the folder with {problems}")
        self.registers = int(getattr(model.config, "num_register_tokens", 0) or 0)
        expected = "Dinov2WithRegistersModel" if self.registers else "Dinov2Model"
        if type(model).__name__ != expected:
            raise VerificationError(f"transformers builds a {type(model).__name__}, expected {expected}")
        self.model = model.eval()
        patch_map_file = folder / PATCH_MAP_FILE
        self.patch_map = load_file(patch_map_file) if patch_map_file.exists() else None

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        tokens = self.model(pixel_values=images).last_hidden_state
        return split_tokens(tokens, self.registers, self.patch_map)
