"""The training CLI as a real process: SIGKILL mid-run + automatic resume, and SIGUSR1 (save, exit, resume),
reproduce the uninterrupted losses bit for bit; a NaN loss stops with one line; bad input is one error line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_loop import LOSS_KEYS, TINY_ARCH_SOURCE, tiny_overrides

from franca.data.datasets.demo import write_demo_dataset
from franca.train.checkpointing import list_checkpoints
from franca.train.preemption import REQUEUE_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[1]
# `python -m franca.train.train`, with the tiny test architecture registered first.
LAUNCH = TINY_ARCH_SOURCE + "\nimport sys\nfrom franca.train.train import main\nsys.exit(main(sys.argv[1:]))\n"
TIMING_KEYS = ("iter_time", "data_time", "img_per_s", "max_mem_mb")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train_per_class=2, n_val_per_class=1, image_size=32)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _command(demo_root: Path, output_dir: Path, *extra: str, **overrides) -> list[str]:
    opts = [o for o in tiny_overrides(demo_root, output_dir, **overrides) if not o.startswith("train.output_dir=")]
    return [
        sys.executable,
        "-c",
        LAUNCH,
        "--config-file",
        "train/cpu_tiny",
        "--output-dir",
        str(output_dir),
        "--log-period",
        "1",
        *extra,
        *opts,
    ]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _records(output_dir: Path) -> list[dict]:
    path = output_dir / "training_metrics.json"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return records


def _values(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_sigkill_then_resume_reproduces_losses(demo_root, tmp_path):
    """Two runs side by side: one uninterrupted, one SIGKILLed once it has ≥ 3 iterations and a checkpoint,
    then restarted with the same command (automatic resume). Every per-iteration value must be identical."""
    n_iterations, k = 16, 3
    settings = {
        "optim.epochs": n_iterations // 2,
        "train.checkpoint_keep_last": 2,
        "evaluation.eval_period_iterations": 8,
    }
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _start(_command(demo_root, full, **settings))
    victim = _start(_command(demo_root, killed, **settings))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if len(_records(killed)) >= k and list_checkpoints(killed):
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    victim.stderr.close()
    done_before_kill = len(_records(killed))
    assert k <= done_before_kill < n_iterations

    resumed = _run(_command(demo_root, killed, **settings))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]
    last_ckpt_iteration = max(it for it, _ in list_checkpoints(killed))
    assert last_ckpt_iteration == n_iterations - 1

    expected = _values(_records(full))
    assert [r["iteration"] for r in expected] == list(range(n_iterations))
    assert _values(_records(killed)) == expected
    assert all(set(LOSS_KEYS) <= set(r) for r in expected)
    log = (killed / "log.txt").read_text()
    assert "Starting training at iteration 0 of 16" in log
    assert any(f"Starting training at iteration {it} of 16" in log for it in range(2, done_before_kill + 1, 2))

    a = torch.load(full / "eval" / "training_15" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(killed / "eval" / "training_15" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_cli_outputs_then_nan_stop_keeps_checkpoint(demo_root, tmp_path):
    out = tmp_path / "run"
    first = _run(_command(demo_root, out, **{"optim.epochs": 1}))
    assert first.returncode == 0, first.stderr[-3000:]
    config = (out / "config.yaml").read_text()
    assert "arch: vit_test_tiny" in config and f"output_dir: {out}" in config
    assert "lr: 0.0003125" in config  # 5e-3 · sqrt(4 / 1024) written after the scaling rule
    assert "Saved checkpoint" in (out / "log.txt").read_text()
    assert [it for it, _ in list_checkpoints(out)] == [1]

    exported = _run(_command(demo_root, out, "--eval-only", **{"optim.epochs": 1}))
    assert exported.returncode == 0, exported.stderr[-3000:]
    manual = torch.load(out / "eval" / "manual_1" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    release = torch.load(out / "eval" / "training_1" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert manual.keys() == release.keys() and all(torch.equal(manual[k], release[k]) for k in manual)

    # resume with a teacher temperature of 0: L / T is ±inf and the Sinkhorn targets NaN at iteration 2 (a tiny
    # positive T no longer overflows: the targets subtract max(L) / T before exp())
    poisoned = _run(
        _command(demo_root, out, **{"optim.epochs": 2, "teacher.teacher_temp": 0.0, "teacher.warmup_teacher_temp": 0.0})
    )
    assert poisoned.returncode == 1
    lines = [line for line in (poisoned.stdout + poisoned.stderr).splitlines() if "non-finite" in line]
    assert len(lines) == 1
    assert "non-finite loss at iteration 2: dino_local_crops_loss=" in lines[0] and "=nan" in lines[0]
    assert "Traceback" not in poisoned.stderr
    assert [it for it, _ in list_checkpoints(out)] == [1]
    assert torch.load(out / "model_0000001.pth", weights_only=True)["iteration"] == 1


def test_cli_bad_input_is_one_error_line(demo_root, tmp_path):
    def error_lines(result: subprocess.CompletedProcess) -> list[str]:
        return [line for line in (result.stdout + result.stderr).splitlines() if "error" in line.lower()]

    bad_key = _run(_command(demo_root, tmp_path / "a", "optim.base_lrr=0.1"))
    assert bad_key.returncode == 2
    (line,) = error_lines(bad_key)
    assert "unknown config key 'optim.base_lrr'" in line and "did you mean 'optim.base_lr'" in line

    no_data = _run(_command(demo_root, tmp_path / "d", **{"train.dataset_path": "ImageFolder:root=/nonexistent/x"}))
    assert no_data.returncode == 2
    (line,) = error_lines(no_data)
    assert "/nonexistent/x" in line
    assert "Traceback" not in no_data.stderr


def test_cli_argument_errors(tmp_path, capsys):
    from franca.train.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path), "--log-period", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: --log-period must be >= 1, got 0")
    with pytest.raises(SystemExit):
        main(["--config-file", "train/cpu_tiny"])
    assert "the following arguments are required: --output-dir" in capsys.readouterr().err


def test_sigusr1_saves_then_resume_reproduces_losses(demo_root, tmp_path):
    """SIGUSR1 to a running trainer (DCP format, asynchronous save): it finishes the iteration, writes a
    checkpoint off the cadence, exits with REQUEUE_EXIT_CODE; the same command resumes and every
    per-iteration value equals the uninterrupted run's."""
    n_iterations, k = 8, 3
    settings = {
        "optim.epochs": n_iterations // 2,
        "train.checkpoint_period_iterations": 8,
        "train.checkpoint_format": "dcp",
        "train.checkpoint_async": "true",
        "evaluation.eval_period_iterations": 8,
    }
    full, signalled = tmp_path / "full", tmp_path / "signalled"
    reference = _start(_command(demo_root, full, **settings))
    victim = _start(_command(demo_root, signalled, **settings))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None and len(_records(signalled)) < k:
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be signalled"
    os.kill(victim.pid, signal.SIGUSR1)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    (stop_line,) = [line for line in (signalled / "log.txt").read_text().splitlines() if "stopped by" in line]
    stopped_at = int(stop_line.split("after iteration ")[1].split(":")[0])
    assert "stopped by SIGUSR1" in stop_line and k - 1 <= stopped_at < 7  # before the periodic save (the last)
    assert [it for it, _ in list_checkpoints(signalled)] == [stopped_at]
    assert [r["iteration"] for r in _records(signalled)] == list(range(stopped_at + 1))

    resumed = _run(_command(demo_root, signalled, **settings))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err[-3000:]
    assert f"Starting training at iteration {stopped_at + 1} of 8" in (signalled / "log.txt").read_text()
    expected = _values(_records(full))
    assert [r["iteration"] for r in expected] == list(range(n_iterations))
    assert _values(_records(signalled)) == expected
    a = torch.load(full / "eval" / "training_7" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    b = torch.load(signalled / "eval" / "training_7" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def _start_ranks(cmd: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """``world_size`` trainer processes of one gloo process group (torchrun's variables)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = []
    for rank in range(world_size):
        env = dict(_env(), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        env.update(LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        proc.stderr_tail = err[-3000:]
    return [proc.returncode for proc in procs]


@pytest.mark.slow
def test_two_ranks_sigusr1_on_one_rank_then_resume_reproduces_losses(demo_root, tmp_path):
    """2 gloo ranks, DCP: SIGUSR1 reaches rank 1 only; both agree to stop after the same iteration, save and
    exit; 2 ranks resume (each its RNG streams and sampler position) and repeat the uninterrupted losses."""
    n_iterations, k = 12, 3
    settings = {
        "optim.epochs": n_iterations // 2,
        "train.checkpoint_period_iterations": 6,
        "train.checkpoint_format": "dcp",
        "evaluation.eval_period_iterations": 0,
    }
    full, signalled = tmp_path / "full", tmp_path / "signalled"
    reference = _start_ranks(_command(demo_root, full, **settings))
    victims = _start_ranks(_command(demo_root, signalled, **settings))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victims[1].poll() is None and len(_records(signalled)) < k:
        time.sleep(0.02)
    assert victims[1].poll() is None, "the run finished before it could be signalled"
    os.kill(victims[1].pid, signal.SIGUSR1)
    codes = _wait_all(victims)
    assert codes == [REQUEUE_EXIT_CODE] * 2, [p.stderr_tail for p in victims]
    (stop,) = [line for line in (signalled / "log.txt").read_text().splitlines() if "stopped by" in line]
    assert "another rank's stop signal" in stop  # rank 0 writes the log; the signal went to rank 1
    stopped_at = int(stop.split("after iteration ")[1].split(":")[0])
    assert [it for it, _ in list_checkpoints(signalled)] == [stopped_at] and stopped_at < 5

    resumed = _start_ranks(_command(demo_root, signalled, **settings))
    assert _wait_all(resumed) == [0, 0], [p.stderr_tail for p in resumed]
    assert _wait_all(reference) == [0, 0], [p.stderr_tail for p in reference]
    expected = _values(_records(full))
    assert [r["iteration"] for r in expected] == list(range(n_iterations))
    assert _values(_records(signalled)) == expected
