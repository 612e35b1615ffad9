"""Backbone construction from a config (``cfg.student``) or any object with the same attributes."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

from torch import nn

import franca.models.vision_transformer as vits


def get_architecture(name: str) -> Callable[..., nn.Module]:
    """The builder ``franca.models.vision_transformer.<name>`` (a ``vit_*`` function or ``DinoVisionTransformer``).

    Looked up at call time; the ``_memeff`` suffix of DINOv2 config names is ignored. The one architecture lookup of
    the project (training, hub, export, RASA).
    """
    name = name.removesuffix("_memeff")
    builder = getattr(vits, name, None)
    if not callable(builder):
        known = [k for k in dir(vits) if k.startswith("vit_")]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
        raise ValueError(f"unknown architecture {name!r} in franca.models.vision_transformer{hint}")
    return builder


def build_model(
    args: Any, only_teacher: bool = False, img_size: int = 224, **model_kwargs: Any
) -> tuple[nn.Module, nn.Module, int] | tuple[nn.Module, int]:
    """Teacher (and student) backbones from ``args`` with the keys of ``cfg.student``.

    Keys: ``arch``, ``patch_size``, ``layerscale`` (LayerScale init), ``ffn_layer``, ``block_chunks``,
    ``qkv_bias``, ``proj_bias``, ``ffn_bias``, ``num_register_tokens``, ``interpolate_offset``,
    ``interpolate_antialias``; the student also gets ``drop_path_rate`` and ``drop_path_uniform``.
    ``model_kwargs`` go to both builders unchanged. Returns ``(student, teacher, embed_dim)``, or
    ``(teacher, embed_dim)`` with ``only_teacher``.
    """
    if isinstance(args, Mapping):
        args = SimpleNamespace(**args)
    builder = get_architecture(args.arch)
    vit_kwargs = dict(
        img_size=img_size,
        patch_size=args.patch_size,
        init_values=args.layerscale,
        ffn_layer=args.ffn_layer,
        block_chunks=args.block_chunks,
        qkv_bias=args.qkv_bias,
        proj_bias=args.proj_bias,
        ffn_bias=args.ffn_bias,
        num_register_tokens=args.num_register_tokens,
        interpolate_offset=args.interpolate_offset,
        interpolate_antialias=args.interpolate_antialias,
        attn_backend=getattr(args, "attn_backend", None) or None,
        **model_kwargs,
    )
    teacher = builder(**vit_kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = builder(**vit_kwargs, drop_path_rate=args.drop_path_rate, drop_path_uniform=args.drop_path_uniform)
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg: Any, only_teacher: bool = False):
    """:func:`build_model` for ``cfg.student`` at the global crop size ``cfg.crops.global_crops_size``."""
    return build_model(cfg.student, only_teacher=only_teacher, img_size=cfg.crops.global_crops_size)
