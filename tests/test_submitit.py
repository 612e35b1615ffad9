"""The submitit launcher: a real 2-task job through submitit's local executor, requeue, SLURM variables."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from test_train_loop import tiny_overrides

from franca.data.datasets.demo import write_demo_dataset
from franca.run import submit as run_submit
from franca.run.train import TrainJob, get_args_parser
from franca.run.train import main as launch
from franca.train.checkpointing import list_checkpoints
from franca.train.preemption import REQUEUE_EXIT_CODE
from franca.train.train import main as train_main
from franca.utils.config import resolve_config_file

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_overrides(data_root: Path, output_dir: Path, **extra) -> list[str]:
    """test_train_loop's tiny run with the shipped vit_pico (the job's processes do not know vit_test_tiny),
    batch 2 per rank, one epoch of 2 iterations, no warm-up, teacher export at iteration 2."""
    values = {
        "student.arch": "vit_pico",
        "train.batch_size_per_gpu": 2,
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
        "teacher.warmup_teacher_temp_epochs": 0,
        **extra,
    }
    return tiny_overrides(data_root, output_dir, **values)


def test_local_executor_runs_a_two_rank_job_with_checkpoint_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    data = write_demo_dataset(tmp_path / "demo", n_train_per_class=2, n_val_per_class=1, image_size=32)
    output = tmp_path / "run"
    argv = ["--cluster", "local", "--nodes", "1", "--ngpus", "2", "--timeout", "5", "--wait"]
    argv += ["--config-file", "train/cpu_tiny", "--output-dir", str(output), *_tiny_overrides(data, output)]
    assert launch(argv) == 0

    checkpoints = list_checkpoints(output)
    assert [iteration for iteration, _ in checkpoints] == [1]
    saved = torch.load(checkpoints[-1][1], weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2  # both tasks joined one process group
    assert saved["sampler_advance"] == 2 * 2  # per rank: 2 iterations × batch 2
    assert any(name.startswith("student.backbone.blocks.") for name in saved["model"])
    metrics = [json.loads(line) for line in (output / "training_metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics][-1] == 1 and all(m["total_loss"] > 0 for m in metrics)
    teacher = torch.load(output / "eval" / "training_1" / "teacher_checkpoint.pth", weights_only=True)
    assert list(teacher) == ["teacher"] and "backbone.cls_token" in teacher["teacher"]
    logs = sorted((output / "submitit").glob("*/*_log.out"))
    assert len(logs) == 2  # one log per task, under the output directory

    # saved by 2 ranks, resumed by 1 process: continues at iteration 2 with the 2 ranks' samples skipped
    more = {"optim.epochs": 2, "evaluation.eval_period_iterations": 4}
    resumed = train_main(
        ["--config-file", "train/cpu_tiny", "--output-dir", str(output), *_tiny_overrides(data, output, **more)]
    )
    assert resumed == 0
    checkpoints = list_checkpoints(output)
    assert [iteration for iteration, _ in checkpoints] == [1, 3]
    saved = torch.load(checkpoints[-1][1], weights_only=True)
    assert saved["world_size"] == 1 and saved["sampler_advance"] == 2 * 2 * 2 + 2 * 2
    metrics = [json.loads(line) for line in (output / "training_metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics][-1] == 3


def test_requeue_resumes_the_same_training_and_pickles():
    job = TrainJob(["--config-file", "F", "--output-dir", "/out", "--no-resume", "optim.epochs=3"], master_port=12345)
    delayed = job.checkpoint()
    requeued = pickle.loads(pickle.dumps(delayed))
    assert isinstance(requeued.function, TrainJob)
    assert requeued.function.train_argv == ["--config-file", "F", "--output-dir", "/out", "optim.epochs=3"]
    assert isinstance(requeued.function.master_port, int)  # a local cluster picks a fresh free port
    slurm_job = TrainJob(["--config-file", "F", "--output-dir", "/out"], master_port=None)
    assert slurm_job.checkpoint().function.master_port is None  # derived from the job id on every node


def test_slurm_task_exports_torchrun_variables(monkeypatch):
    for key, value in {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    variables = run_submit.export_process_group_env(master_port=None)
    assert variables == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(run_submit.port_for_job("4242")),
    }
    assert 20_000 <= int(variables["MASTER_PORT"]) <= 60_000


def test_slurm_parameters_reach_the_sbatch_file(tmp_path, monkeypatch):
    from submitit.slurm import slurm

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # no srun on this machine
    args = get_args_parser().parse_args(
        "--nodes 16 --ngpus 4 --timeout 1200 --partition gpu --qos high --account proj --exclude n[1-2] "
        "--cluster slurm --config-file train/IN21K/vitb14 --output-dir D".split()
    )
    executor = run_submit.make_executor(args, tmp_path)
    sbatch = slurm._make_sbatch_string(command="python -m x", folder=tmp_path, **executor._executor.parameters)
    for line in (
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=1200",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --account=proj",
        "#SBATCH --exclude='n[1-2]'",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in sbatch


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", "local", "--nodes", "2"], "--cluster local runs on this machine only: use --nodes 1, got 2"),
        (["--ngpus", "0"], "--ngpus must be >= 1, got 0"),
    ],
)
def test_bad_launcher_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch([*argv, "--config-file", "F", "--output-dir", "D"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "franca.run.train", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert result.returncode == 0 and "--partition" in result.stdout and "--config-file" in result.stdout


OFFICIAL_NODES = {  # scripts/In-21K/*.sh and scripts/LAION/*.sh of the official release: nodes × 4 GPUs
    "franca-B-in21k": ("train/IN21K/vitb14", 16),
    "franca-L-in21k": ("train/IN21K/vitl14", 24),
    "franca-G-in21k": ("train/IN21K/vitg14", 24),
    "franca-L-laion": ("train/LAION/vitl14", 32),
    "franca-G-laion": ("train/LAION/vitg14", 32),
}


def _fake_srun(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun_args.txt"
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    srun.chmod(0o755)
    return bin_dir, record


@pytest.mark.parametrize("name", sorted(OFFICIAL_NODES))
def test_sbatch_scripts_run_the_trainer_with_the_official_layout(name, tmp_path):
    config, nodes = OFFICIAL_NODES[name]
    script = REPO_ROOT / "scripts" / "slurm" / f"{name}.sbatch"
    text = script.read_text()
    assert f"#SBATCH --nodes={nodes}\n" in text and "#SBATCH --ntasks-per-node=4\n" in text
    assert "#SBATCH --gpus-per-node=4\n" in text and "/home/" not in text and "$WORK" not in text
    resolve_config_file(config)  # the shipped config exists

    bin_dir, record = _fake_srun(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "FRANCA_OUTPUT_DIR": str(tmp_path / "out"),
        "FRANCA_PYTHON": "python3",
        "FRANCA_DATASET": "ImageFolder:root=/data/x",
    }
    result = subprocess.run(
        ["bash", str(script), "optim.epochs=1"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    args = record.read_text().splitlines()
    assert args == [
        "--kill-on-bad-exit=1",
        "python3",
        "-m",
        "franca.train.train",
        "--config-file",
        config,
        "--output-dir",
        str(tmp_path / "out"),
        "optim.epochs=1",
        "train.dataset_path=ImageFolder:root=/data/x",
    ]

    del env["FRANCA_OUTPUT_DIR"]
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "set FRANCA_OUTPUT_DIR" in result.stderr


@pytest.mark.parametrize("status", [REQUEUE_EXIT_CODE, 0])
def test_preempted_training_hands_over_to_submitit_requeue(status, monkeypatch):
    """The trainer saved on the signal and returned REQUEUE_EXIT_CODE: then (only then) submitit's handler runs."""
    calls = []
    monkeypatch.setattr("franca.run.train.export_process_group_env", lambda port: {})
    monkeypatch.setattr("franca.train.train.main", lambda argv: calls.append(("train", list(argv))) or status)
    preempt_signal = submitit.JobEnvironment._usr_sig()
    previous = signal.signal(preempt_signal, lambda signum, frame: calls.append(("submitit", signum)))
    try:
        assert TrainJob(["--output-dir", "/out"])() == status
    finally:
        signal.signal(preempt_signal, previous)
    expected = [("train", ["--output-dir", "/out"])]
    assert calls == (expected + [("submitit", preempt_signal)] if status else expected)


def test_sbatch_usr1_checkpoints_before_the_requeue(tmp_path):
    """common.sh: SIGUSR1 to the batch shell → scancel --signal=USR1 to the tasks → they exit after their
    checkpoint → then scontrol requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file, calls, saved = tmp_path / "srun.pid", tmp_path / "calls.txt", tmp_path / "saved"
    scripts = {
        "srun": f"#!/bin/bash\necho $$ > {pid_file}\ntrap 'touch {saved}; exit 3' USR1\n"
        "while true; do sleep 0.05; done\n",
        "scancel": f'#!/bin/bash\necho "scancel $*" >> {calls}\nkill -USR1 "$(cat {pid_file})"\n',
        "scontrol": f'#!/bin/bash\necho "scontrol $* saved=$(test -e {saved} && echo yes)" >> {calls}\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_SUBMIT_DIR": str(REPO_ROOT),
        "SLURM_JOB_ID": "77",
        "FRANCA_OUTPUT_DIR": str(tmp_path / "out"),
    }
    script = REPO_ROOT / "scripts" / "slurm" / "franca-B-in21k.sbatch"
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGUSR1)
    out, err = job.communicate(timeout=30)
    assert job.returncode == REQUEUE_EXIT_CODE, err
    assert "time limit near" in out
    assert calls.read_text().splitlines() == ["scancel --signal=USR1 77", "scontrol requeue 77 saved=yes"]
