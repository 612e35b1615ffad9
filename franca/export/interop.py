"""Exports for other libraries — transformers folders, timm files, ``.safetensors``, Core ML — verified, or nothing.

For every format the backbone's position embedding is first baked at ``--img-size`` (``franca.export.baking``),
so the other library uses the table unchanged at that size and matches ours there. For transformers and timm a
folded RASA norm is split into their plain final norm plus a patch map saved beside the model
(``franca.export.patch_map``). The files are written into a temporary folder next to the destination, loaded back
the way a user of that library would, compared with the backbone's own ``forward_features`` at ``img_size²``
(batch sizes 1 and 3, relative error ≤ 1e-4, ``franca.export.verify``) and only then moved into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from franca.export.baking import bake_img_size
from franca.export.coreml_export import MACOS_ONLY, can_predict, check_program, predict_check, write_coreml
from franca.export.extras import require_extra
from franca.export.hf_export import HFRunner, write_hf
from franca.export.patch_map import split_folded_norm
from franca.export.safetensors_export import SafetensorsRunner, write_safetensors
from franca.export.timm_export import TimmRunner, write_timm
from franca.export.verify import TOLERANCE, Check, verify
from franca.utils.io import SAFETENSORS_SUFFIX, fsync_dir

INTEROP_FORMATS = ("hf", "timm", "safetensors", "coreml")
_PURPOSE = {
    "hf": "Hugging Face transformers export",
    "timm": "timm export",
    "coreml": "Core ML export",
}


def output_names(backbone: nn.Module) -> tuple[str, ...]:
    """``cls_token``, ``patch_tokens`` and, with registers, ``register_tokens``."""
    names = ("cls_token", "patch_tokens")
    return names + ("register_tokens",) if backbone.num_register_tokens else names


def require_format(format: str) -> None:
    """The optional extra of ``format`` must be installed (``MissingExtraError`` naming it otherwise)."""
    if format in _PURPOSE:
        require_extra(format, _PURPOSE[format])


def _check_destination(out: Path, format: str) -> None:
    if format in ("hf", "coreml") and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose another --out or remove it")
    if format == "coreml" and out.suffix != ".mlpackage":
        raise ValueError(f"a Core ML package is a folder named *.mlpackage, got {out}")
    if format == "safetensors" and out.suffix != SAFETENSORS_SUFFIX:
        raise ValueError(f"a safetensors file must be named *{SAFETENSORS_SUFFIX} (the readers go by it), got {out}")


def _stage(
    backbone: nn.Module, staged: Path, format: str, img_size: int, tolerance: float, fp16: bool
) -> tuple[list[Path], list[Check], str]:
    """Write ``format`` at ``staged`` and check it; returns the written paths, the checks and a note."""
    names = output_names(backbone)
    baked = bake_img_size(backbone, img_size)
    sizes = [(img_size, img_size)]
    if format == "coreml":
        written = write_coreml(baked, staged, img_size, names, fp16)
        check_program(staged, img_size, names)
        if not can_predict():
            return written, [], MACOS_ONLY
        return written, [predict_check(staged, backbone, img_size, names, fp16)], ""
    if format == "safetensors":
        written = write_safetensors(baked, staged)
        runner = SafetensorsRunner(staged, baked, names)
    else:
        plain, patch_map = split_folded_norm(baked)
        if format == "hf":
            written = write_hf(plain, staged, img_size, patch_map)
            runner = HFRunner(staged)
        else:
            written = write_timm(plain, staged, img_size, patch_map)
            runner = TimmRunner(staged)
    return written, verify(runner, backbone, names, sizes, tolerance), ""


def export_interop(
    backbone: nn.Module, out: Path, format: str, img_size: int, tolerance: float = TOLERANCE, fp16: bool = False
) -> tuple[list[Path], list[Check], str]:
    """Write ``format`` at ``out`` after its checks pass; returns the final paths, the checks and a note."""
    require_format(format)
    _check_destination(out, format)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        written, checks, note = _stage(backbone.eval(), staged, format, img_size, tolerance, fp16)
        final = []
        for path in written:
            target = out.parent / path.name
            if path.is_dir() and target.is_dir():
                target.rmdir()  # empty (checked above)
            os.replace(path, target)
            final.append(target)
    fsync_dir(out.parent)
    return final, checks, note
