"""A rank that raises ends the whole job with that rank's error instead of leaving the others blocked.

Rank 1 raises after the FSDP model is built, while rank 0 goes into the training step (all-gathers,
Sinkhorn-Knopp all-reduces). Under torchrun the elastic agent stops the other workers and reports the
failing rank; under the submitit launcher rank 0's pending gloo collective fails when rank 1's process
is gone, and the launcher reports every task's error. Each run is bounded by a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_fsdp import free_port

from franca.run import submit as run_submit
from franca.run.train import TrainJob, task_failures

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 90
ERROR = "rank 1 found a corrupt batch"


def _train_until_rank1_fails() -> None:
    """Both ranks build the sharded tiny model; rank 1 raises, rank 0 runs a step (collectives)."""
    import torch
    from test_fsdp import build_model, rank_batch, tiny_cfg

    import franca.distributed as distributed

    distributed.enable(overwrite=True)
    try:
        torch.set_num_threads(1)
        cfg = tiny_cfg()
        model = build_model(cfg)
        if distributed.get_rank() == 1:
            raise ValueError(ERROR)
        time.sleep(1)  # rank 1 is gone before rank 0's first collective of the step
        model.forward_backward(rank_batch(cfg, 0), teacher_temp=0.05)
    finally:
        distributed.disable()


class FailingTrainJob(TrainJob):
    """The launcher's job with the training replaced by :func:`_train_until_rank1_fails`."""

    def __call__(self) -> int:
        run_submit.export_process_group_env(self.master_port)
        _train_until_rank1_fails()
        return 0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]), "OMP_NUM_THREADS": "1"}


def test_torchrun_job_fails_with_the_raising_rank_error(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("from test_distributed_failure import _train_until_rank1_fails\n_train_until_rank1_fails()\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env(), cwd=tmp_path)
    assert result.returncode != 0
    assert time.monotonic() - start < TIMEOUT_S
    output = result.stdout + result.stderr
    assert f"ValueError: {ERROR}" in output
    assert "rank      : 1" in output  # torchrun's failure summary names the failing rank


def test_submitit_job_fails_with_the_raising_rank_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = run_submit.get_launcher_parser("test").parse_args(["--cluster", "local", "--ngpus", "2", "--timeout", "3"])
    executor = run_submit.make_executor(args, tmp_path / "submitit")
    start = time.monotonic()
    job = executor.submit(FailingTrainJob([], run_submit.free_port()))
    while not job.done():
        assert time.monotonic() - start < TIMEOUT_S, "the job is blocked after rank 1 failed"
        time.sleep(0.5)
    failures = task_failures(job)
    assert any(f.startswith("task 1: ") and f"ValueError: {ERROR}" in f for f in failures), failures
    assert any(f.startswith("task 0: ") for f in failures), failures  # rank 0 did not succeed or hang
