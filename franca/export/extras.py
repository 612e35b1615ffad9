"""Optional dependencies of the interop exports: a missing one is an error naming the extra to install."""

from __future__ import annotations

import importlib

from franca.export.onnx_export import MissingExtraError

EXTRAS = {
    "hf": ("transformers", "safetensors"),
    "timm": ("timm", "safetensors"),
    "coreml": ("coremltools",),
}


def require_extra(extra: str, purpose: str) -> None:
    """Raise :class:`MissingExtraError` (``pip install 'franca[<extra>]'``) when a package of ``extra`` is missing."""
    missing = []
    for package in EXTRAS[extra]:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingExtraError(
            f"{purpose} needs {' and '.join(missing)} (the '{extra}' extra): pip install 'franca[{extra}]'"
        )
