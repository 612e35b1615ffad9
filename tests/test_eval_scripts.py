"""The SLURM scripts build the right evaluation command and refuse to run without their settings."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "eval"


def _fake_slurm(tmp_path: Path) -> dict:
    """PATH with `scontrol` and `srun` stand-ins; srun writes its arguments one per line to srun.args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node001\n")
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node001", "SLURM_JOB_ID": "42"}


@pytest.mark.parametrize(
    ("script", "module", "subdir"), [("eval_knn.sh", "knn", "knn"), ("eval_linear.sh", "linear", "linear")]
)
def test_script_runs_the_evaluation_of_the_checkpoint(tmp_path, script, module, subdir):
    env = {
        **_fake_slurm(tmp_path),
        "OUTPUT_DIR": "/runs/r1",
        "ITERATION": "99",
        "TRAIN_DATASET": "ImageFolder:root=/d/train",
        "VAL_DATASET": "ImageFolder:root=/d/val",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    done = subprocess.run(
        ["bash", str(SCRIPTS / script), "--batch-size", "64"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:3] == ["python", "-m", f"franca.eval.{module}"]

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert value("--config-file") == "/runs/r1/config.yaml"
    assert value("--pretrained-weights") == "/runs/r1/eval/training_99/teacher_checkpoint.pth"
    assert value("--output-dir") == f"/runs/r1/eval/training_99/{subdir}"
    assert value("--train-dataset") == "ImageFolder:root=/d/train" and value("--batch-size") == "64"


@pytest.mark.parametrize("script", ["eval_knn.sh", "eval_linear.sh"])
def test_script_names_the_missing_setting(tmp_path, script):
    env = {**_fake_slurm(tmp_path), "ITERATION": "99"}
    done = subprocess.run(["bash", str(SCRIPTS / script)], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "set OUTPUT_DIR to the training output folder" in done.stderr
    assert not (tmp_path / "srun.args").exists()
