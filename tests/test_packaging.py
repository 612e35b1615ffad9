"""pyproject.toml cannot break torch: the floor the FSDP2 code needs, no extra that pulls torch, and GPU extras
whose CUDA builds all belong to one CUDA major."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
GPU_EXTRAS = {"gpu": "13", "gpu-cu12": "12"}


def _requirement(spec: str) -> tuple[str, str]:
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    return name.lower(), spec[len(name) :].strip()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def test_torch_floor_is_the_fsdp2_version_the_code_relies_on():
    requirements = dict(_requirement(spec) for spec in PYPROJECT["project"]["dependencies"])
    assert requirements["torch"] == ">=2.8"  # reshard_after_forward honoured on FSDP2 root modules
    assert _version(torch.__version__) >= (2, 8)


def test_no_extra_pulls_torch():
    for name, specs in PYPROJECT["project"]["optional-dependencies"].items():
        packages = {_requirement(spec)[0] for spec in specs}
        assert not packages & {"torch", "torchvision"}, name


@pytest.mark.parametrize("extra", GPU_EXTRAS)
def test_gpu_extra_has_one_cuda_major_and_a_bounded_xformers(extra):
    specs = dict(_requirement(spec) for spec in PYPROJECT["project"]["optional-dependencies"][extra])
    majors = {m for name in specs for m in re.findall(r"-cu(\d+)$", name)}
    assert majors == {GPU_EXTRAS[extra]}, specs
    assert specs["xformers"] == ">=0.0.35,<0.0.36"  # 0.0.35 declares torch>=2.10; later ones are unknown
