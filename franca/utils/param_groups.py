"""Optimizer parameter groups: layer-wise lr decay, patch-embed lr multiplier, weight-decay exclusions.

Each parameter gets ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``; the training
loop sets ``lr = (last_layer_lr if is_last_layer else lr) * lr_multiplier`` and
``weight_decay = wd * wd_multiplier`` every iteration.

Rules (for a backbone with L blocks, rate r = ``lr_decay_rate``):

* layer id 0 for the patch embedding and the tokens (``cls_token``, ``pos_embed``,
  ``mask_token``, ``register_tokens``), ``i + 1`` for block i (absolute index, in both the
  flat ``blocks.<i>`` and the chunked ``blocks.<chunk>.<i>`` layouts), ``L + 1`` for the rest
  (final norm); ``lr_multiplier = r ** (L + 1 - layer_id)``. Heads (no blocks) get 1.
* the patch embedding's multiplier is further scaled by ``patch_embed_lr_mult``;
* ``wd_multiplier = 0`` for biases, normalisation parameters, LayerScale gammas and tokens;
* ``is_last_layer`` marks the prototype layers (``last_layer`` / ``last_layers``), whose lr
  is held at 0 while the last layer is frozen.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from torch import nn

logger = logging.getLogger("franca")

_TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")
_CHUNKED_BLOCK = re.compile(r"(?:^|\.)blocks\.\d+\.(\d+)\.")
_FLAT_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _is_token(name: str) -> bool:
    return any(part in _TOKEN_NAMES for part in name.split("."))


def _layer_id(name: str, n_blocks: int, chunked: bool) -> int:
    """0 for embeddings/tokens, i + 1 for block i, ``n_blocks + 1`` otherwise."""
    if ".patch_embed." in f".{name}" or _is_token(name):
        return 0
    match = (_CHUNKED_BLOCK if chunked else _FLAT_BLOCK).search(name)
    if match is not None:
        return int(match.group(1)) + 1
    return n_blocks + 1


def _n_blocks_of(model: nn.Module) -> tuple[int, bool]:
    """Number of transformer blocks of a backbone (0 for a head) and whether they are chunked."""
    if hasattr(model, "n_blocks"):
        return int(model.n_blocks), bool(getattr(model, "chunked_blocks", False))
    return 0, False


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    """One group per trainable parameter of ``model`` with its multipliers (see module docstring)."""
    n_blocks, chunked = _n_blocks_of(model)
    groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _clean_name(raw_name)
        lr_multiplier = lr_decay_rate ** (n_blocks + 1 - _layer_id(name, n_blocks, chunked)) if n_blocks else 1.0
        if ".patch_embed." in f".{name}":
            lr_multiplier *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name or _is_token(name)
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_multiplier,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
        logger.debug("%s: lr_multiplier %g, wd_multiplier %g", name, lr_multiplier, groups[-1]["wd_multiplier"])
    return groups


def fuse_params_groups(
    params_groups: Iterable[dict], keys: Sequence[str] = ("lr_multiplier", "wd_multiplier", "is_last_layer")
) -> list[dict]:
    """Merge per-parameter groups sharing the same values of ``keys`` into one group each."""
    fused: dict[tuple, dict] = {}
    for group in params_groups:
        ident = tuple(group[k] for k in keys)
        if ident not in fused:
            fused[ident] = {**{k: group[k] for k in keys}, "params": []}
        fused[ident]["params"].append(group["params"])
    return list(fused.values())
