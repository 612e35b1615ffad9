"""The backbone to export, from a hub entry point, an architecture name or a training config, plus weights.

Every weight file goes through the one checkpoint reader (``franca.hub.loading``): ``teacher``/``backbone.``
prefixes, chunked or flat block keys, strict keys and shapes. A file written by ``rasa.fold`` (extra
``norm.patch_proj.*`` keys) loads into the same architecture with the folded norm. A RASA head file given on its
own is folded in afterwards (``franca.layers.folded_norm.fold``), so the exported patch tokens are the debiased ones.

* ``hub``: ``franca_vitb14`` / ``franca_vitl14`` / ``franca_vitg14`` with ``hub_weights`` (``IN21K``, ``LAION``,
  ``DINOV2_IN21K``); ``weights`` (a local file) replaces the download.
* ``arch``: a builder of ``franca.models.vision_transformer`` (``vit_base``, …) with the release settings of
  ``franca.hub.backbones.HUB_BACKBONE_CONFIG``; ``weights`` is required.
* ``config_file``: the ``student`` section of a training config (e.g. ``<output_dir>/config.yaml``).

``model_args`` override settings or pass builder keywords (``patch_size``, ``num_register_tokens``, ``embed_dim``,
``depth``, ``num_heads``, …). Unless ``img_size`` is given, the ``arch``/``config_file`` model is built for the
grid of the checkpoint's ``pos_embed`` (``img_size = √(N − 1) · patch_size``).
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf
from torch import Tensor, nn

from franca.hub import backbones as hub
from franca.hub.loading import backbone_state_dict, load_backbone_weights, read_checkpoint
from franca.layers.folded_norm import fold, prepare_for_folded_state_dict
from franca.layers.rasa_head import load_rasa_head
from franca.models import build_model
from franca.utils.config import load_config_file

HUB_ENTRY_POINTS = {
    "franca_vitb14": hub.franca_vitb14,
    "franca_vitl14": hub.franca_vitl14,
    "franca_vitg14": hub.franca_vitg14,
}


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["depth=4", "ffn_layer=mlp"]`` → ``{"depth": 4, "ffn_layer": "mlp"}`` (Python literals, else strings)."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"model argument {item!r} is not of the form key=value")
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed[key] = text
    return parsed


def _load_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Strict load of backbone weights; files with a folded RASA norm get a ``FoldedLayerNorm`` first."""
    model = prepare_for_folded_state_dict(model, state_dict)
    load_backbone_weights(model, state_dict)
    return model


def _checkpoint_img_size(state_dict: Mapping[str, Tensor], patch_size: int) -> int:
    if "pos_embed" not in state_dict:
        raise ValueError("the checkpoint has no pos_embed key; pass the image size with --model-arg img_size=N")
    grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
    return grid * patch_size


def _build(config: dict[str, Any], model_args: dict[str, Any], state_dict: Mapping[str, Tensor]) -> nn.Module:
    """``build_model`` with the ``cfg.student`` settings ``config``; ``model_args`` override a setting of
    ``HUB_BACKBONE_CONFIG``'s keys or go to the builder as keywords."""
    config = dict(config)
    builder_kwargs = {}
    for key, value in model_args.items():
        if key in hub.HUB_BACKBONE_CONFIG:
            config[key] = value
        else:
            builder_kwargs[key] = value
    builder_kwargs.setdefault("img_size", _checkpoint_img_size(state_dict, config["patch_size"]))
    try:
        model, _ = build_model(config, only_teacher=True, **builder_kwargs)
    except TypeError as error:
        raise ValueError(f"invalid model argument for {config['arch']}: {error}") from error
    return model


def build_backbone(
    weights: str | os.PathLike | None = None,
    hub_name: str | None = None,
    hub_weights: str = "IN21K",
    arch: str | None = None,
    config_file: str | os.PathLike | None = None,
    model_args: Mapping[str, Any] | None = None,
    rasa: str | os.PathLike | None = None,
) -> nn.Module:
    """The eval-mode backbone described by exactly one of ``hub_name``, ``arch``, ``config_file`` (see module doc)."""
    model_args = dict(model_args or {})
    sources = [name for name, value in (("hub", hub_name), ("arch", arch), ("config file", config_file)) if value]
    if len(sources) != 1:
        raise ValueError(
            f"give exactly one model source (hub name, architecture or config file), got {sources or 'none'}"
        )
    state_dict = backbone_state_dict(read_checkpoint(weights)) if weights is not None else None
    if hub_name:
        if hub_name not in HUB_ENTRY_POINTS:
            raise ValueError(f"unknown hub model {hub_name!r}; expected one of {', '.join(HUB_ENTRY_POINTS)}")
        model = HUB_ENTRY_POINTS[hub_name](pretrained=state_dict is None, weights=hub_weights, **model_args)
        if state_dict is not None:
            model = _load_weights(model, state_dict)
    else:
        if state_dict is None:
            raise ValueError("a model built from an architecture or a config file needs a weights file")
        if arch:
            config = {"arch": arch, **hub.HUB_BACKBONE_CONFIG}
        else:
            config = OmegaConf.to_container(load_config_file(config_file).student, resolve=True)
        model = _load_weights(_build(config, model_args, state_dict), state_dict)
    if rasa is not None:
        model = fold(model, load_rasa_head(rasa, input_dim=model.embed_dim))
    return model.eval()
