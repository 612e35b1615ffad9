"""franca.train.checkpointing: atomic writes (real SIGKILL during saves), keep-last-N, RNG and state round trips."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from franca.train import checkpointing
from franca.train.checkpointing import (
    Checkpointer,
    atomic_save,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    restore_rng_state,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist()


def _tiny_training_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "is_last_layer": False},
            {"params": model[2].parameters(), "is_last_layer": True},
        ]
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
    return model, optimizer, scaler


def _train_steps(model, optimizer, scaler, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(5, 4)).square().mean()).backward()
        scaler.step(optimizer)
        scaler.update()


def test_rng_round_trip_is_weights_only_loadable(tmp_path):
    random.gauss(0, 1)  # leave a cached gaussian in the Python generator
    np.random.randn()
    state = capture_rng_state()
    expected = _draws()
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    _draws()
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert _draws() == expected


def test_save_load_round_trip(tmp_path):
    model, optimizer, scaler = _tiny_training_state()
    _train_steps(model, optimizer, scaler, 3)
    ckpt = Checkpointer(tmp_path, model=model, optimizer=optimizer, grad_scaler=scaler)
    path = ckpt.save(2, sampler_advance=24)
    assert path == tmp_path / "model_0000002.pth"
    raw = torch.load(path, weights_only=True)
    assert raw["iteration"] == 2 and raw["world_size"] == 1 and raw["sampler_advance"] == 24

    expected_params = [p.detach().clone() for p in model.parameters()]
    expected_opt = copy.deepcopy(optimizer.state_dict())
    _train_steps(model, optimizer, scaler, 2)
    scaler.update(new_scale=1.0)

    extra = ckpt.resume()
    assert extra["iteration"] == 2 and extra["sampler_advance"] == 24
    assert set(extra["rng"]) == {"python", "numpy", "torch", "cuda"}
    for p, e in zip(model.parameters(), expected_params):
        assert torch.equal(p, e)
    assert scaler.get_scale() == 128.0
    loaded_opt = optimizer.state_dict()
    assert [g["is_last_layer"] for g in loaded_opt["param_groups"]] == [False, True]
    for key, value in expected_opt["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded_opt["state"][key][name], value[name])


def test_keep_last_n_and_latest(tmp_path):
    model, _, _ = _tiny_training_state()
    ckpt = Checkpointer(tmp_path, max_to_keep=2, model=model)
    assert ckpt.resume() is None and latest_checkpoint(tmp_path) is None
    for it in [9, 19, 29, 39]:
        ckpt.save(it)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [29, 39]
    assert latest_checkpoint(tmp_path) == tmp_path / "model_0000039.pth"


def test_stray_temporary_file_is_ignored_then_cleaned(tmp_path):
    model, _, _ = _tiny_training_state()
    ckpt = Checkpointer(tmp_path, model=model)
    ckpt.save(4)
    stray = tmp_path / ".model_0000009.pth.12345.tmp"
    stray.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path) == tmp_path / "model_0000004.pth"
    ckpt.save(9)
    assert not stray.exists()


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, _, _ = _tiny_training_state()
    ckpt = Checkpointer(tmp_path, model=model)
    ckpt.save(1)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000001.pth"]
    monkeypatch.undo()
    assert ckpt.resume()["iteration"] == 1


def test_bad_inputs(tmp_path):
    model, _, _ = _tiny_training_state()
    with pytest.raises(ValueError, match="max_to_keep must be >= 1, got 0"):
        Checkpointer(tmp_path, max_to_keep=0, model=model)
    with pytest.raises(ValueError, match=r"names \['iteration'\] are reserved"):
        Checkpointer(tmp_path, iteration=model)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*model_0000003.pth"):
        Checkpointer(tmp_path, model=model).load(tmp_path / "model_0000003.pth")
    Checkpointer(tmp_path, model=model).save(3)
    with pytest.raises(KeyError, match="has no entry 'optimizer'"):
        Checkpointer(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)).resume()


# A child that saves ~16 MiB checkpoints in a loop: tensor i is filled with the iteration number.
SAVER = """
import sys, torch
from franca.train.checkpointing import Checkpointer

class Blob:
    def __init__(self):
        self.it = 0
    def state_dict(self):
        return {"w": torch.full((4 * 2**20,), float(self.it))}
    def load_state_dict(self, sd):
        pass

blob = Blob()
ckpt = Checkpointer(sys.argv[1], max_to_keep=2, model=blob)
it = 0
while True:
    blob.it = it
    ckpt.save(it)
    print(it, flush=True)
    it += 1
"""


def test_sigkill_during_saves_never_breaks_latest(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for attempt in range(3):
        out_dir = tmp_path / f"run{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(out_dir)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "0"  # first checkpoint complete
            time.sleep(0.05 + 0.07 * attempt)  # land somewhere inside a later save
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        checkpoints = list_checkpoints(out_dir)
        assert 1 <= len(checkpoints) <= 3  # pruning runs right after each rename
        for iteration, path in checkpoints:
            data = torch.load(path, weights_only=True)
            assert data["iteration"] == iteration
            assert torch.all(data["model"]["w"] == float(iteration))


# Two gloo ranks: each seeds its RNG differently, saves (rank 0 writes), draws, then loads and must
# see its *own* stream again; parameters are identical across ranks and round-trip too.
TWO_RANKS = """
import json, random, sys, torch
import franca.distributed as d
from franca.train.checkpointing import Checkpointer, restore_rng_state
d.enable(overwrite=True)
rank = d.get_rank()
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
random.seed(100 + rank)
torch.manual_seed(200 + rank)
ckpt = Checkpointer(sys.argv[1], model=model)
ckpt.save(7)
expected = [random.random(), torch.rand(1).item()]
with torch.no_grad():
    model.weight.zero_()
extra = ckpt.resume()
restore_rng_state(extra["rng"])
got = [random.random(), torch.rand(1).item()]
print(json.dumps({"rank": rank, "same_stream": got == expected, "weight_sum": model.weight.sum().item(),
                  "world_size": extra["world_size"]}), flush=True, force=True)
d.disable()
"""


def test_two_ranks_save_once_and_resume_each_rank_stream(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))
    }
    procs = []
    for rank in range(2):
        env = dict(base, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2")
        env.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", TWO_RANKS, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    records = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    torch.manual_seed(0)
    weight_sum = torch.nn.Linear(3, 2).weight.sum().item()
    for rank, record in enumerate(records):
        assert record == {"rank": rank, "same_stream": True, "weight_sum": weight_sum, "world_size": 2}
    saved = torch.load(tmp_path / "model_0000007.pth", weights_only=True)
    assert len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000007.pth"]


def test_initial_weights_are_memory_mapped(tmp_path):
    """``student.pretrained_weights`` (``read_checkpoint``) and checkpoints map the file: the ranks of a node
    share its pages instead of each holding a copy."""
    from franca.hub.loading import read_checkpoint

    path = tmp_path / "teacher_checkpoint.pth"
    atomic_save({"teacher": {"backbone.cls_token": torch.arange(4096.0)}}, path)
    state = read_checkpoint(path)
    assert str(path) in Path("/proc/self/maps").read_text()
    assert torch.equal(state["backbone.cls_token"], torch.arange(4096.0))
