"""Shared test fixtures: reference tensors from the official code and tiny model settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("FRANCA_REFERENCE_DIR", REPO_ROOT / "tests" / "fixtures" / "reference"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of tensors produced by the official Franca code (see its README.md)."""
    return REFERENCE_DIR


def load_reference(name: str) -> dict:
    """Load one reference fixture file with ``weights_only=True``."""
    return torch.load(REFERENCE_DIR / name, map_location="cpu", weights_only=True)
