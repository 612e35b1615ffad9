"""franca.distributed: environment detection (torchrun / SLURM / local) and real gloo process groups."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import franca.distributed as distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_NUM_NODES",
    "SLURM_NNODES",
)

# Each process: enable(), all-reduce its rank, print from every rank (only rank 0 may show it).
WORKER = """
import json, torch, torch.distributed as dist
import franca.distributed as d
env = d.enable(overwrite=True)
t = torch.tensor([float(d.get_rank())])
dist.all_reduce(t)
print(json.dumps({"rank": d.get_rank(), "world": d.get_world_size(), "local": d.get_local_rank(),
                  "source": env.source, "sum": t.item(), "backend": dist.get_backend(),
                  "main": d.is_main_process()}), flush=True)
print("forced", d.get_rank(), force=True, flush=True)
d.disable()
"""


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _json_lines(text: str) -> list[dict]:
    """JSON objects printed by the workers (ranks sharing a pipe may interleave a line's text and newline)."""
    return [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", text)]


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node7", ["node7"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],b2", ["a8", "a9", "a10", "b2"]),
        ("jz[098-101]", ["jz098", "jz099", "jz100", "jz101"]),
        ("x[1,3],y[2-3]", ["x1", "x3", "y2", "y3"]),
    ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
    assert distributed.parse_slurm_nodelist(nodelist) == hosts


def test_detect_torchrun(clean_env):
    for key, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        clean_env.setenv(key, value)
    clean_env.setenv("MASTER_ADDR", "n1")
    clean_env.setenv("MASTER_PORT", "1234")
    clean_env.setenv("SLURM_JOB_ID", "9")  # torchrun inside a SLURM allocation: torchrun wins
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    env = distributed.detect_environment()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("torchrun", 3, 8, 1, 2)
    assert (env.master_addr, env.master_port) == ("n1", 1234)


def test_partial_torchrun_env_names_missing(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(KeyError, match="LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        distributed.detect_environment()


def test_bad_rank_and_non_integer(clean_env):
    for key, value in dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        clean_env.setenv(key, value)
    clean_env.setenv("MASTER_ADDR", "h")
    clean_env.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        distributed.detect_environment()
    clean_env.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK='one' is not an integer"):
        distributed.detect_environment()


def test_detect_slurm(clean_env):
    slurm = dict(
        SLURM_JOB_ID="4242",
        SLURM_PROCID="5",
        SLURM_NTASKS="8",
        SLURM_LOCALID="1",
        SLURM_JOB_NODELIST="gpu[07-10]",
        SLURM_JOB_NUM_NODES="4",
    )
    for key, value in slurm.items():
        clean_env.setenv(key, value)
    env = distributed.detect_environment()
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 8, 1, 2)
    assert env.master_addr == "gpu07"
    assert 20_000 <= env.master_port <= 60_000
    assert distributed.detect_environment().master_port == env.master_port  # every task derives the same port
    clean_env.setenv("SLURM_JOB_ID", "4243")
    assert distributed.detect_environment().master_port != env.master_port
    clean_env.setenv("MASTER_PORT", "29555")
    assert distributed.detect_environment().master_port == 29555
    clean_env.delenv("SLURM_JOB_NODELIST")
    with pytest.raises(KeyError, match="SLURM_JOB_NODELIST"):
        distributed.detect_environment()


def test_detect_local_and_defaults_without_group(clean_env):
    env = distributed.detect_environment()
    assert (env.source, env.rank, env.world_size, env.master_addr) == ("local", 0, 1, "127.0.0.1")
    assert not distributed.is_enabled()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (0, 1, 0)
    assert distributed.is_main_process()


def test_single_local_process_group():
    out = subprocess.run([sys.executable, "-c", WORKER], env=_child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (record,) = _json_lines(out.stdout)
    assert record == {
        "rank": 0,
        "world": 1,
        "local": 0,
        "source": "local",
        "sum": 0.0,
        "backend": "gloo",
        "main": True,
    }


def test_two_slurm_tasks_only_rank0_prints():
    """Two processes as srun would start them: SLURM variables only, gloo on CPU."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            env=_child_env(
                SLURM_JOB_ID="77",
                SLURM_PROCID=str(rank),
                SLURM_LOCALID=str(rank),
                SLURM_NTASKS="2",
                SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_NUM_NODES="1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    rank0 = _json_lines(outputs[0][0])
    assert rank0 == [
        {"rank": 0, "world": 2, "local": 0, "source": "slurm", "sum": 1.0, "backend": "gloo", "main": True}
    ]
    assert _json_lines(outputs[1][0]) == []  # rank 1's plain print is silenced
    assert "forced 1" in outputs[1][0]


def test_torchrun_two_processes():
    """``python -m torch.distributed.run --nproc_per_node=2``: the torchrun variables, gloo on CPU."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    out = subprocess.run(
        [*launcher, "--no-python", sys.executable, "-c", WORKER],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    records = _json_lines(out.stdout)
    assert records == [
        {"rank": 0, "world": 2, "local": 0, "source": "torchrun", "sum": 1.0, "backend": "gloo", "main": True}
    ]
