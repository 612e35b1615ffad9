"""``export_backbone``: write a backbone as a verified ONNX file or ``torch.export`` program, or write nothing.

The graph is produced in a temporary folder beside the destination, run by onnxruntime (CPU) or reloaded with
``torch.export.load``, compared with PyTorch (``franca.export.verify``), and only then moved into place. A failed
check leaves no file behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from franca.export.interop import INTEROP_FORMATS, export_interop, output_names, require_format
from franca.export.onnx_export import DEFAULT_OPSET, OnnxRunner, check_opset, require_onnx, write_onnx
from franca.export.torch_export import ExportedRunner, write_exported
from franca.export.verify import TOLERANCE, Check, verification_sizes, verify
from franca.export.wrapper import ExportableBackbone

FORMATS = ("onnx", "exported", *INTEROP_FORMATS)
TRACE_BATCH = 2


@dataclass(frozen=True)
class ExportResult:
    """What was written: the file(s), the format, output names and the verification checks."""

    path: Path
    format: str
    output_names: tuple[str, ...]
    checks: tuple[Check, ...]
    opset: int | None
    extra_files: tuple[Path, ...] = ()
    note: str = ""  # what was not checked (a Core ML package off macOS)

    @property
    def max_error(self) -> float | None:
        """Largest relative error over every check and output (None when nothing was run numerically)."""
        return max((check.error for check in self.checks), default=None)


def check_image_size(img_size: int, patch_size: int, dynamic_size: bool) -> None:
    """``img_size`` must be a positive multiple of the patch size (at least two patches for a dynamic size)."""
    if img_size <= 0 or img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
    if dynamic_size and img_size < 2 * patch_size:
        raise ValueError(f"a size-dynamic export needs an image size of at least 2 patches ({2 * patch_size})")


def export_backbone(
    backbone: nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    img_size: int = 224,
    dynamic_size: bool = False,
    opset: int = DEFAULT_OPSET,
    tolerance: float = TOLERANCE,
    fp16: bool = False,
) -> ExportResult:
    """Export ``backbone`` (put in eval mode) to ``out`` and verify it; see :class:`ExportableBackbone` for the graph
    and :mod:`franca.export.interop` for ``hf`` / ``timm`` / ``safetensors`` / ``coreml`` (``fp16``: Core ML only).

    Raises ``ValueError`` for a bad format, image size or opset, ``MissingExtraError`` without the format's extra,
    ``VerificationError`` (nothing written) when the exported graph disagrees with PyTorch.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    if fp16 and format != "coreml":
        raise ValueError("fp16 applies to --format coreml only")
    if format == "onnx":
        require_onnx()
        check_opset(opset)
    require_format(format)
    check_image_size(img_size, backbone.patch_size, dynamic_size)
    devices = {parameter.device.type for parameter in backbone.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"export a CPU model (call .cpu() first); the backbone's parameters are on {sorted(devices)}")
    if format in INTEROP_FORMATS:
        if dynamic_size:
            raise ValueError(f"--dynamic-size applies to onnx and exported; {format} is written at --img-size")
        out = Path(out)
        written, checks, note = export_interop(backbone, out, format, img_size, tolerance, fp16)
        extra = tuple(path for path in written if path != out)
        return ExportResult(out, format, output_names(backbone), tuple(checks), None, extra, note)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportableBackbone(backbone)
    example = torch.randn(TRACE_BATCH, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    sizes = verification_sizes(img_size, backbone.patch_size, dynamic_size)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        if format == "onnx":
            write_onnx(module, staged, example, dynamic_size, opset, data_name=f"{out.name}.data")
            runner = OnnxRunner(staged)
        else:
            write_exported(module, staged, example, dynamic_size)
            runner = ExportedRunner(staged)
        checks = verify(runner, backbone, module.output_names, sizes, tolerance)
        del runner
        written = sorted(Path(tmp).iterdir())
        for path in written:
            os.replace(path, out.parent / path.name)
    extra = tuple(out.parent / path.name for path in written if path.name != out.name)
    return ExportResult(out, format, module.output_names, tuple(checks), opset if format == "onnx" else None, extra)
