"""Deployable exports of Franca backbones, verified against PyTorch before anything is written: ONNX files,
``torch.export`` programs, Hugging Face transformers folders, timm files, ``.safetensors`` and Core ML packages.

``python -m franca.export --help`` for the command line; in Python::

    from franca.export import build_backbone, export_backbone
    model = build_backbone(weights="teacher_checkpoint.pth", arch="vit_base", rasa="rasa_head.pth")
    export_backbone(model, "franca_vitb14.onnx", format="onnx", img_size=224, dynamic_size=True)

The graph's only input is the image batch; its outputs are ``cls_token`` (B, D), ``patch_tokens`` (B, N, D) and,
with registers, ``register_tokens`` (B, R, D). ``format="hf"`` / ``"timm"`` / ``"safetensors"`` / ``"coreml"``
are described in :mod:`franca.export.interop` and docs/export.md.
"""

from franca.export.api import FORMATS, ExportResult, check_image_size, export_backbone
from franca.export.build import build_backbone, parse_model_args
from franca.export.onnx_export import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, MissingExtraError, OnnxRunner
from franca.export.torch_export import ExportedRunner
from franca.export.verify import TOLERANCE, VerificationError
from franca.export.wrapper import ExportableBackbone

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "MAX_OPSET",
    "MIN_OPSET",
    "TOLERANCE",
    "ExportResult",
    "ExportableBackbone",
    "ExportedRunner",
    "MissingExtraError",
    "OnnxRunner",
    "VerificationError",
    "build_backbone",
    "check_image_size",
    "export_backbone",
    "parse_model_args",
]
