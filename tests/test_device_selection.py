"""``train.device`` / ``franca.distributed.select_device``: no silent CPU training when a launch asks for GPUs.

CUDA availability is patched, so these run on any machine; the end-to-end case runs the real training entry
point as a 2-rank torchrun-style launch on a CPU-only host and expects one error line and exit status 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import franca.distributed as distributed
from franca.distributed import DistributedEnvironment, select_device

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(local_world_size: int = 1, local_rank: int = 0) -> DistributedEnvironment:
    return DistributedEnvironment("torchrun", local_rank, local_world_size, local_rank, local_world_size, "h", 1)


@pytest.fixture
def no_cuda(monkeypatch):
    """A host without CUDA and without any launcher or device variable."""
    for name in list(os.environ):
        if name.startswith("SLURM_GPUS") or name in ("CUDA_VISIBLE_DEVICES", distributed.DEVICE_ENV_VAR):
            monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


@pytest.mark.parametrize(
    ("setting", "local_world_size", "backend", "cause"),
    [
        ({}, 2, None, "2 local ranks"),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 1, None, "CUDA_VISIBLE_DEVICES=0,1"),
        ({"SLURM_GPUS_ON_NODE": "4"}, 1, None, "SLURM_GPUS_ON_NODE=4"),
        ({}, 1, "nccl", "backend=nccl"),
    ],
)
def test_a_gpu_launch_without_cuda_stops_naming_the_cause(no_cuda, setting, local_world_size, backend, cause):
    for name, value in setting.items():
        no_cuda.setenv(name, value)
    no_cuda.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(ValueError) as error:
        select_device("auto", _env(local_world_size), backend)
    message = str(error.value)
    assert "\n" not in message and cause in message
    assert "CUDA 13.0" in message and "driver >= 580" in message and "train.device=cpu" in message


def test_cpu_only_torch_build_is_named(no_cuda):
    no_cuda.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="CPU-only build"):
        select_device("cuda", _env())


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_cpu_is_chosen_when_nothing_asks_for_a_gpu(no_cuda, hidden):
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", hidden)  # empty or -1 hides every GPU: not a request
    no_cuda.setenv("SLURM_GPUS_PER_NODE", "0")
    assert select_device("auto", _env()) == torch.device("cpu")


def test_explicit_cpu_wins_over_a_gpu_launch(no_cuda):
    no_cuda.setenv("SLURM_GPUS_PER_NODE", "8")
    assert select_device("cpu", _env(8, 3)) == torch.device("cpu")
    no_cuda.setenv(distributed.DEVICE_ENV_VAR, "cpu")
    assert select_device("auto", _env(8, 3)) == torch.device("cpu")
    with pytest.raises(ValueError, match="NCCL needs CUDA"):
        select_device("cpu", _env(), "nccl")
    no_cuda.setenv(distributed.DEVICE_ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="FRANCA_DEVICE=gpu is not one of auto, cuda, cpu"):
        select_device("auto", _env())


def test_gpu_binding_wraps_local_rank_by_device_count(monkeypatch):
    monkeypatch.delenv(distributed.DEVICE_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert select_device("auto", _env(8, 6)) == torch.device("cuda", 2)
    assert select_device("cuda", _env(8, 3)) == torch.device("cuda", 3)


def test_training_entry_point_refuses_a_two_rank_launch_without_cuda(tmp_path):
    """Two local ranks (torchrun variables) on this CUDA-less host, train.device left at auto: exit 2, one line."""
    if torch.cuda.is_available():
        pytest.skip("needs a host without CUDA")
    env = {k: v for k, v in os.environ.items() if k != distributed.DEVICE_ENV_VAR and not k.startswith("SLURM_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
        RANK="0",
        WORLD_SIZE="2",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="1",  # never reached: the check comes before the process group
    )
    command = [
        sys.executable,
        "-m",
        "franca.train.train",
        "--config-file",
        "train/cpu_tiny",
        "--output-dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: this launch asks for GPUs (2 local ranks)"), done.stderr
    assert "train.device=cpu" in lines[0]
