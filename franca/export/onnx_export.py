"""ONNX files of an :class:`ExportableBackbone` (TorchScript-based exporter) and running them with onnxruntime.

The graph has one input ``images`` (B, 3, H, W) and the wrapper's named outputs. The batch axis is always dynamic;
with ``dynamic_size`` so are H and W (the position-embedding resize is part of the graph, see
``franca.export.interpolation``). Attention exports as ``MatMul``/``Softmax`` (opset ≥ 14), the resize as
``Range``/``Floor``/``Where``/``MatMul`` (opset ≥ 11), so opsets 14 to 20 (the exporter's newest) are accepted.
Models above protobuf's 2 GiB limit keep their weights next to the graph in one ``<file>.data`` file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from franca.export.wrapper import INPUT_NAME, ExportableBackbone

MIN_OPSET = 14
MAX_OPSET = 20
DEFAULT_OPSET = 17
EXTRA_HINT = "pip install 'franca[export]'"


class MissingExtraError(ImportError):
    """An optional dependency of the export is not installed."""


def require_onnx() -> None:
    """Raise :class:`MissingExtraError` naming the extra to install when onnx or onnxruntime is missing."""
    missing = []
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingExtraError(f"ONNX export needs {' and '.join(missing)} (the 'export' extra): {EXTRA_HINT}")


def check_opset(opset: int) -> None:
    """Reject opsets that cannot express the graph (attention needs 14) or that the exporter does not know."""
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is too old: attention needs opset {MIN_OPSET} and the position-embedding resize opset 11;"
            f" use --opset between {MIN_OPSET} and {MAX_OPSET}"
        )
    if opset > MAX_OPSET:
        raise ValueError(
            f"opset {opset} is newer than the exporter supports; use --opset between {MIN_OPSET} and {MAX_OPSET}"
        )


def _dynamic_axes(names: tuple[str, ...], dynamic_size: bool) -> dict[str, dict[int, str]]:
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}}
    for name in names:
        axes[name] = {0: "batch", 1: "num_patches"} if name == "patch_tokens" and dynamic_size else {0: "batch"}
    return axes


def _gather_external_data(path: Path, data_name: str) -> None:
    """Rewrite ``path`` so that its weights live in one ``data_name`` file beside it, when any are external."""
    import onnx

    siblings = [p for p in path.parent.iterdir() if p != path]
    if not siblings:
        return
    model = onnx.load(str(path))
    for sibling in siblings:
        sibling.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)


def write_onnx(
    module: ExportableBackbone, path: Path, example: Tensor, dynamic_size: bool, opset: int, data_name: str
) -> None:
    """Trace ``module`` on ``example`` into ``path`` (alone in its folder; external weights go to ``data_name``)."""
    check_opset(opset)
    names = module.output_names
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer notes about Python-side shape checks and the exporter's deprecation notice; the result is verified.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_axes=_dynamic_axes(names, dynamic_size),
            opset_version=opset,
            do_constant_folding=True,
        )
    _gather_external_data(path, data_name)


class OnnxRunner:
    """Runs an exported file with onnxruntime on the CPU: ``runner(images)`` → dict of named output tensors.

    ``threads`` sets onnxruntime's intra-op thread count (its default otherwise). The threads sleep between runs
    instead of spinning, so they do not slow down PyTorch work done in between (verification, benchmarks).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        outputs = self.session.run(None, {INPUT_NAME: images.detach().cpu().numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, outputs)}
