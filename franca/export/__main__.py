"""Command line: ``python -m franca.export --weights FILE --arch vit_base --format onnx --out backbone.onnx``.

Formats: ``onnx``, ``exported`` (torch.export), ``hf`` (a transformers folder), ``timm`` (a state dict + ``.json``),
``safetensors``, ``coreml`` (an ``.mlpackage``); see docs/export.md.

Exit status 0 when the verified file is written, 1 when the verification fails (nothing written), 2 for bad
arguments, missing files, checkpoints that do not fit, or a missing optional dependency (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from franca.export.api import FORMATS, ExportResult, export_backbone
from franca.export.baking import native_img_size
from franca.export.build import HUB_ENTRY_POINTS, build_backbone, parse_model_args
from franca.export.interop import require_format
from franca.export.onnx_export import DEFAULT_OPSET, MissingExtraError, check_opset, require_onnx
from franca.export.verify import TOLERANCE, VerificationError
from franca.hub.releases import Weights

DEFAULT_IMG_SIZE = 224


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m franca.export",
        description="Export a Franca backbone (optionally with a folded RASA head) to ONNX, torch.export, Hugging Face "
        "transformers, timm, safetensors or Core ML, verified against PyTorch before anything is written. "
        "Outputs: cls_token (B, D), patch_tokens (B, N, D) [, register_tokens (B, R, D)].",
    )
    model = parser.add_argument_group("model (one of --hub, --arch, --config-file)")
    model.add_argument(
        "--weights", help="backbone checkpoint (.pth, .safetensors, or a folder of *.tar.gz.part_* pieces)"
    )
    model.add_argument(
        "--hub",
        choices=sorted(HUB_ENTRY_POINTS),
        help="hub model; downloads the release file unless --weights is given",
    )
    model.add_argument(
        "--hub-weights",
        default=None,
        help=f"release weights of --hub ({', '.join(w.name for w in Weights)}); default: the entry point's",
    )
    model.add_argument(
        "--arch", help="builder in franca.models.vision_transformer (vit_small, vit_base, ...), release settings"
    )
    model.add_argument("--config-file", help="training config whose 'student' section describes the backbone")
    model.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture override, repeatable (patch_size=14, num_register_tokens=4, embed_dim=64, img_size=518, ...)",
    )
    model.add_argument("--rasa", help="RASA head file to fold into the final norm (debiased patch tokens)")
    export = parser.add_argument_group("export")
    export.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="onnx (onnxruntime-checked), exported (torch.export .pt2), hf (transformers folder), timm (state dict "
        "+ .json), safetensors, coreml (.mlpackage)",
    )
    export.add_argument(
        "--img-size",
        type=int,
        default=None,
        help=f"image side in pixels, a multiple of the patch size (default {DEFAULT_IMG_SIZE} for onnx/exported; "
        "the checkpoint's native size for the others, whose position embedding is baked at this size)",
    )
    export.add_argument("--dynamic-size", action="store_true", help="accept any multiple of the patch size for H and W")
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    export.add_argument("--fp16", action="store_true", help="coreml: float16 weights and compute (default float32)")
    export.add_argument("--out", required=True, help="file (or folder, for hf and coreml) to write")
    return parser


def _summary(result: ExportResult, img_size: int) -> str:
    extra = f" (+ {', '.join(str(p) for p in result.extra_files)})" if result.extra_files else ""
    outputs = ", ".join(result.output_names)
    if result.format not in ("onnx", "exported"):
        checked = f"max relative error {result.max_error:.2e}" if result.max_error is not None else result.note
        return f"wrote {result.path}{extra} ({result.format}, {img_size}²): {outputs}; {checked}"
    form = f"onnx, opset {result.opset}" if result.opset is not None else "torch.export"
    size = "dynamic H×W" if len({(c.height, c.width) for c in result.checks}) > 1 else f"{result.checks[0].height}²"
    return (
        f"wrote {result.path}{extra} ({form}, dynamic batch, {size}): input images → {outputs}; "
        f"max relative error {result.max_error:.2e} (tolerance {TOLERANCE:.0e})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.format == "onnx":
            require_onnx()
            check_opset(args.opset)
        require_format(args.format)
        backbone = build_backbone(
            weights=args.weights,
            hub_name=args.hub,
            hub_weights=args.hub_weights,
            arch=args.arch,
            config_file=args.config_file,
            model_args=parse_model_args(args.model_arg),
            rasa=args.rasa,
        )
        img_size = args.img_size
        if img_size is None:
            img_size = DEFAULT_IMG_SIZE if args.format in ("onnx", "exported") else native_img_size(backbone)
        result = export_backbone(
            backbone,
            args.out,
            format=args.format,
            img_size=img_size,
            dynamic_size=args.dynamic_size,
            opset=args.opset,
            fp16=args.fp16,
        )
    except VerificationError as error:
        print(f"error: verification failed, nothing written: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, MissingExtraError, ConnectionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    for check in result.checks:
        print(f"checked batch {check.batch} at {check.height}×{check.width}: max relative error {check.error:.2e}")
    if result.note:
        print(f"note: {result.note}")
    print(_summary(result, img_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
