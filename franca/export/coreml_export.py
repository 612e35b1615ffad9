"""Core ML packages (``.mlpackage``, ML program): image input ``images``, outputs ``cls_token``/``patch_tokens``.

The input is an RGB image of ``S × S`` pixels (``S`` the export size, its position embedding baked there);
Core ML scales it to ``[0, 1]`` (``ImageType(scale=1/255)``) and the program normalises it itself,
``(x − mean) / std`` with the ImageNet statistics of training, so the outputs equal ``forward_features`` of the
normalised image: ``cls_token`` (1, D), ``patch_tokens`` (1, N, D) [, ``register_tokens`` (1, R, D)]. A folded
RASA norm is part of the program. ``fp16`` stores weights and computes in float16 (the Core ML default);
otherwise float32.

Running a package needs macOS: there the export predicts on a random image and compares with PyTorch (tolerance
``1e-4`` in float32, ``1e-2`` in float16). On other systems only the conversion and the program's declared inputs
and outputs are checked, and the command says so.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import Tensor, nn
from torch._decomp import get_decompositions

from franca.export.verify import TOLERANCE, Check, VerificationError, reference_outputs, relative_error
from franca.export.wrapper import ExportableBackbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FP16_TOLERANCE = 1e-2
MACOS_ONLY = "numerical verification of a Core ML package needs macOS (conversion and program inputs/outputs checked)"


class CoreMLBackbone(nn.Module):
    """``images (1, 3, S, S)`` in ``[0, 1]`` → ``(cls_token, patch_tokens[, register_tokens])``, fixed size.

    ImageNet-normalises the image, then runs :class:`ExportableBackbone` with the stored (baked) position table.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.tokens = ExportableBackbone(backbone, static_size=True)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.tokens((images - self.mean) / self.std).values())


def write_coreml(backbone: nn.Module, path: Path, img_size: int, names: tuple[str, ...], fp16: bool) -> list[Path]:
    """Convert ``backbone`` (its ``pos_embed`` already at ``img_size``) and save the package at ``path``."""
    import coremltools as ct

    example = torch.rand(1, 3, img_size, img_size)
    # coremltools has no converter for aten.addcmul (the blocks' LayerScale residual): decompose it only
    addcmul = get_decompositions([torch.ops.aten.addcmul.default])
    program = torch.export.export(CoreMLBackbone(backbone), (example,)).run_decompositions(addcmul)
    model = ct.convert(
        program,
        inputs=[ct.ImageType(name="images", shape=example.shape, scale=1 / 255, color_layout=ct.colorlayout.RGB)],
        outputs=[ct.TensorType(name=name) for name in names],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.macOS13,
    )
    model.save(str(path))
    return [path]


def check_program(path: Path, img_size: int, names: tuple[str, ...]) -> None:
    """The saved package declares one RGB image input ``images`` of ``img_size²`` and exactly ``names`` as outputs."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    inputs = [(i.name, i.type.WhichOneof("Type")) for i in spec.description.input]
    if inputs != [("images", "imageType")]:
        raise VerificationError(f"the Core ML program's inputs are {inputs}, expected one image input 'images'")
    image = spec.description.input[0].type.imageType
    if (image.height, image.width) != (img_size, img_size):
        raise VerificationError(f"the Core ML image input is {image.height}×{image.width}, expected {img_size}²")
    outputs = tuple(o.name for o in spec.description.output)
    if outputs != names:
        raise VerificationError(f"the Core ML program's outputs are {list(outputs)}, expected {list(names)}")


def can_predict() -> bool:
    """Core ML packages run only on macOS."""
    return platform.system() == "Darwin"


@torch.no_grad()
def predict_check(path: Path, backbone: nn.Module, img_size: int, names: tuple[str, ...], fp16: bool) -> Check:
    """macOS: predict on a random image and compare every output with ``backbone`` (the exported one, unbaked)."""
    import coremltools as ct
    import numpy as np
    from PIL import Image

    pixels = torch.randint(0, 256, (img_size, img_size, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy().astype(np.uint8))  # (H, W, 3) uint8: RGB
    predicted = ct.models.MLModel(str(path)).predict({"images": image})
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = (pixels.permute(2, 0, 1)[None].float() / 255 - mean) / std
    expected = reference_outputs(backbone, normalised, names)
    tolerance = FP16_TOLERANCE if fp16 else TOLERANCE
    errors = {
        name: relative_error(torch.from_numpy(predicted[name]).reshape(ref.shape).float(), ref)
        for name, ref in expected.items()
    }
    worst = max(errors, key=errors.get)
    if errors[worst] > tolerance:
        raise VerificationError(
            f"{worst} differs from PyTorch by {errors[worst]:.2e} (relative); tolerance {tolerance:.0e}"
        )
    return Check(1, img_size, img_size, errors[worst])
