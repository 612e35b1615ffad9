"""The dense evaluation commands end to end: a cpu_tiny checkpoint, a RASA head file, SegFolder images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from franca.eval import hummingbird, linear_seg
from franca.layers.rasa_head import RASAHead
from franca.models import build_model_from_cfg
from franca.utils.config import load_config_file, write_config
from tests.dense_fixtures import write_colour_patch_folder

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """config.yaml, a teacher checkpoint (official format), a RASA head file and two SegFolder splits."""
    root = tmp_path_factory.mktemp("dense_cli")
    cfg = load_config_file("train/cpu_tiny")
    write_config(cfg, root)
    torch.manual_seed(0)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}}, root / "teacher.pth")
    head = RASAHead(teacher.embed_dim, n_pos_layers=1)
    torch.save(head.state_dict(), root / "rasa_head.pth")
    write_colour_patch_folder(root / "train", 6, seed=0)
    write_colour_patch_folder(root / "val", 3, seed=1)
    return root


def _common(run_dir: Path, out: str) -> list[str]:
    return [
        *("--config-file", str(run_dir / "config.yaml"), "--pretrained-weights", str(run_dir / "teacher.pth")),
        *("--output-dir", str(run_dir / out), "--crop-size", "32", "--batch-size", "4", "--num-workers", "0"),
        *(
            "--train-dataset",
            f"SegFolder:root={run_dir / 'train'}",
            "--val-dataset",
            f"SegFolder:root={run_dir / 'val'}",
        ),
    ]


def test_hummingbird_cli_nested_dims_and_rasa(run_dir: Path) -> None:
    args = [*_common(run_dir, "hb"), "--dims", "nested", "--memory-size", "0", "--num-neighbours", "5"]
    assert hummingbird.main(args) == 0
    payload = json.loads((run_dir / "hb" / hummingbird.RESULTS_FILENAME).read_text())
    assert payload["num_classes"] == 4 and list(payload["results"]) == ["128", "64", "32", "16", "8"]
    assert all(0.0 <= r["mIoU"] <= 100.0 for r in payload["results"].values())
    assert hummingbird.main([*_common(run_dir, "hb_rasa"), "--rasa", str(run_dir / "rasa_head.pth")]) == 0
    rasa = json.loads((run_dir / "hb_rasa" / hummingbird.RESULTS_FILENAME).read_text())
    assert rasa["rasa"].endswith("rasa_head.pth") and list(rasa["results"]) == ["128"]


def test_linear_seg_cli(run_dir: Path) -> None:
    args = [*_common(run_dir, "ls"), "--epochs", "1", "--learning-rates", "0.01", "--dims", "128", "32"]
    assert linear_seg.main(args) == 0
    payload = json.loads((run_dir / "ls" / linear_seg.RESULTS_FILENAME).read_text())
    assert list(payload["best"]) == ["128", "32"] and payload["num_classes"] == 4
    assert (run_dir / "ls" / linear_seg.BEST_HEAD_FILENAME).is_file()


def test_bad_input_is_one_error_line(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="--dims takes integers"):
        hummingbird.main([*_common(run_dir, "bad"), "--dims", "half"])
    command = [sys.executable, "-m", "franca.eval.hummingbird", *_common(run_dir, "bad")]
    command[command.index("--pretrained-weights") + 1] = str(run_dir / "missing.pth")
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: pretrained weights not found")
