"""Check an exported backbone against PyTorch before it is written.

The exported graph runs on random images (fixed seed) at batch sizes 1 and 3 — the graph was traced at batch 2 —
and, for a size-dynamic export, at a second, non-square image size. Every output must match the backbone's own
``forward_features`` (``x_norm_clstoken`` / ``x_norm_patchtokens`` / ``x_norm_regtokens``) with

    error = max |exported − pytorch| / max |pytorch|  ≤  1e-4

per output and per check; the reported error is the largest of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TOLERANCE = 1e-4
VERIFY_BATCH_SIZES = (1, 3)
_FEATURE_KEYS = {
    "cls_token": "x_norm_clstoken",
    "patch_tokens": "x_norm_patchtokens",
    "register_tokens": "x_norm_regtokens",
}


class VerificationError(RuntimeError):
    """The exported graph disagrees with PyTorch (error above the tolerance, or wrong output names/shapes)."""


@dataclass(frozen=True)
class Check:
    """One comparison: batch size, image height and width, and the largest relative error over the outputs."""

    batch: int
    height: int
    width: int
    error: float


def verification_sizes(img_size: int, patch_size: int, dynamic_size: bool) -> list[tuple[int, int]]:
    """The traced ``img_size²``, plus ``(img_size + 2p) × (img_size + p)`` for a size-dynamic export."""
    sizes = [(img_size, img_size)]
    if dynamic_size:
        sizes.append((img_size + 2 * patch_size, img_size + patch_size))
    return sizes


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``max |actual − expected| / max |expected|`` (in float64)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def reference_outputs(backbone: nn.Module, images: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The named outputs computed by ``backbone.forward_features`` in PyTorch."""
    features = backbone.forward_features(images)
    return {name: features[_FEATURE_KEYS[name]] for name in names}


def verify(
    run: Callable[[Tensor], dict[str, Tensor]],
    backbone: nn.Module,
    names: tuple[str, ...],
    sizes: list[tuple[int, int]],
    tolerance: float = TOLERANCE,
) -> list[Check]:
    """Compare ``run(images)`` with PyTorch at every batch size of ``VERIFY_BATCH_SIZES`` and every ``(H, W)``.

    Returns the checks; raises :class:`VerificationError` on the first output over ``tolerance``.
    """
    generator = torch.Generator().manual_seed(0)
    checks = []
    for height, width in sizes:
        for batch in VERIFY_BATCH_SIZES:
            images = torch.randn(batch, 3, height, width, generator=generator)
            expected = reference_outputs(backbone, images, names)
            actual = run(images)
            if tuple(actual) != names:
                raise VerificationError(f"exported outputs are {list(actual)}, expected {list(names)}")
            errors = {}
            for name in names:
                if tuple(actual[name].shape) != tuple(expected[name].shape):
                    raise VerificationError(
                        f"{name} has shape {tuple(actual[name].shape)} at batch {batch}, {height}×{width}; "
                        f"PyTorch gives {tuple(expected[name].shape)}"
                    )
                errors[name] = relative_error(actual[name], expected[name])
            worst = max(errors, key=errors.get)
            if errors[worst] > tolerance:
                raise VerificationError(
                    f"{worst} differs from PyTorch by {errors[worst]:.2e} (relative) at batch {batch}, "
                    f"{height}×{width}; tolerance {tolerance:.0e}"
                )
            checks.append(Check(batch, height, width, errors[worst]))
    return checks
