"""``.safetensors`` backbone files: the flat DINOv2-named state dict, readable wherever a ``.pth`` is accepted.

Keys are those of ``franca.export.layout.flat_state_dict`` (``blocks.<i>.…``; a folded RASA norm adds
``norm.patch_proj.{weight,bias}``), metadata ``{"format": "pt"}``. The check reloads the file through the one
checkpoint reader (``franca.hub.loading.read_checkpoint``) into a fresh copy of the architecture.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from franca.export.layout import flat_state_dict
from franca.export.verify import reference_outputs
from franca.utils.io import atomic_write


def save_safetensors(tensors: dict[str, Tensor], path: Path) -> Path:
    """``tensors`` (contiguous copies) to ``path`` with metadata ``{"format": "pt"}``, atomically."""
    from safetensors.torch import save

    data = save({key: value.detach().clone().contiguous() for key, value in tensors.items()}, {"format": "pt"})
    return atomic_write(path, lambda file: file.write(data))


def write_safetensors(backbone: nn.Module, path: Path) -> list[Path]:
    """Write the backbone's weights to ``path``."""
    return [save_safetensors(flat_state_dict(backbone), path)]


class SafetensorsRunner:
    """``backbone``'s architecture (weights reset) loaded strictly from ``path``; ``runner(images)`` → tokens."""

    def __init__(self, path: Path, backbone: nn.Module, names: tuple[str, ...]) -> None:
        from franca.hub.loading import load_backbone_weights

        model = copy.deepcopy(backbone)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        load_backbone_weights(model, path)
        self.model = model.eval()
        self.names = names

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        return reference_outputs(self.model, images, self.names)
