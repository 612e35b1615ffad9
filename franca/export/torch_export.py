"""``torch.export`` programs of an :class:`ExportableBackbone`, saved as ``.pt2`` files and reloaded to run.

The program takes ``images`` (B, 3, H, W) and returns the wrapper's dict of named outputs. The batch axis is
always symbolic; with ``dynamic_size`` H and W are ``patch_size × rows`` and ``patch_size × cols`` for symbolic
``rows, cols ≥ 2`` (other sizes are rejected by the program's input guards).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.export import Dim

from franca.export.wrapper import INPUT_NAME, ExportableBackbone


def _dynamic_shapes(patch_size: int, dynamic_size: bool) -> dict[str, dict[int, object]]:
    axes: dict[int, object] = {0: Dim("batch", min=1)}
    if dynamic_size:
        axes[2] = patch_size * Dim("rows", min=2)
        axes[3] = patch_size * Dim("cols", min=2)
    return {INPUT_NAME: axes}


def write_exported(module: ExportableBackbone, path: Path, example: Tensor, dynamic_size: bool) -> None:
    """Export ``module`` traced on ``example`` and save the program to ``path``."""
    with torch.no_grad():
        program = torch.export.export(
            module, (example,), dynamic_shapes=_dynamic_shapes(module.backbone.patch_size, dynamic_size)
        )
    torch.export.save(program, str(path))


class ExportedRunner:
    """Reloads a saved program: ``runner(images)`` → dict of named output tensors."""

    def __init__(self, path: str | Path) -> None:
        self.module = torch.export.load(str(path)).module()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        return dict(self.module(images))
