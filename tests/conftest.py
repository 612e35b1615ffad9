"""Shared test fixtures: reference tensors from the official code and tiny model settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("FRANCA_REFERENCE_DIR", REPO_ROOT / "tests" / "fixtures" / "reference"))

torch.set_num_threads(min(2, torch.get_num_threads()))

# The test suite runs on the CPU (export FRANCA_DEVICE=auto to change that): several local ranks without CUDA are then
# an explicit CPU run, not the misconfigured GPU launch that franca.distributed.select_device rejects.
# Spawned ranks and subprocesses inherit it; tests of the GPU-launch check remove it.
os.environ.setdefault("FRANCA_DEVICE", "cpu")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of tensors produced by the official Franca code (see its README.md)."""
    return REFERENCE_DIR


def load_reference(name: str) -> dict:
    """Load one reference fixture file with ``weights_only=True``."""
    return torch.load(REFERENCE_DIR / name, map_location="cpu", weights_only=True)


def rasa_head_file_state(n_pre_pos_layers: int, width: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A standalone RASA head state dict as the releases store it: ``pos_pred.weight`` and the ``pre_pos_layers``.

    The official release notes (valeoai/Franca ``release_checkpoints.md``) describe two layouts: legacy heads with
    8 pre-position layers (9 tensors) and current ones with 9 (10 tensors).
    """
    generator = torch.Generator().manual_seed(seed)
    state = {f"pre_pos_layers.{i}.weight": torch.randn(2, width, generator=generator) for i in range(n_pre_pos_layers)}
    state["pos_pred.weight"] = torch.randn(2, width, generator=generator)
    return state
