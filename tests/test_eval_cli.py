"""The evaluation commands end to end on a checkpoint in the official format and generated images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from franca.eval import knn, linear, log_regression, matryoshka, visualize_pca
from franca.models import build_model_from_cfg
from franca.utils.config import load_config_file, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"blue": (40, 60, 210), "red": (210, 50, 40)}


def _write_split(root: Path, per_class: int, seed: int, classes=tuple(COLOURS)) -> Path:
    """ImageFolder split of 40×40 pictures: a flat colour per class plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = torch.randint(-25, 26, (40, 40, 3), generator=g)
            pixels = (torch.tensor(COLOURS[name]) + noise).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training output folder: config.yaml and eval/training_0/teacher_checkpoint.pth (official format)."""
    root = tmp_path_factory.mktemp("eval_cli")
    cfg = load_config_file("train/cpu_tiny")
    write_config(cfg, root)
    torch.manual_seed(0)
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    # at initialisation LayerScale (1e-5) hides the blocks; open it so the class token sees the image
    state = {f"backbone.{k}": v.fill_(1.0) if ".gamma" in k else v for k, v in teacher.state_dict().items()}
    state["dino_head.mlp.0.weight"] = torch.zeros(2, 2)  # heads travel in official files and are ignored
    ckpt = root / "eval" / "training_0" / "teacher_checkpoint.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save({"teacher": state}, ckpt)
    _write_split(root / "data" / "train", 8, 0)
    _write_split(root / "data" / "val", 4, 1)
    _write_split(root / "data" / "val_one_class", 2, 2, classes=("red",))
    return root


def _common(run_dir: Path, out: str) -> list[str]:
    return [
        "--config-file",
        str(run_dir / "config.yaml"),
        "--pretrained-weights",
        str(run_dir / "eval" / "training_0" / "teacher_checkpoint.pth"),
        "--output-dir",
        str(run_dir / out),
        "--train-dataset",
        f"ImageFolder:root={run_dir / 'data' / 'train'}",
        "--val-dataset",
        f"ImageFolder:root={run_dir / 'data' / 'val'}",
        "--crop-size",
        "32",
        "--batch-size",
        "6",
        "--num-workers",
        "0",
    ]


def test_knn_cli(run_dir):
    assert knn.main([*_common(run_dir, "knn"), "--nb_knn", "3", "5", "--temperature", "0.07"]) == 0
    payload = json.loads((run_dir / "knn" / knn.RESULTS_FILENAME).read_text())
    assert payload["temperature"] == 0.07 and payload["val_dataset"].startswith("ImageFolder:")
    assert set(payload["results"]["full"]) == {"3", "5"}
    assert payload["results"]["full"]["3"]["top-1"] == 100.0 and payload["results"]["full"]["3"]["top-5"] == 100.0


def test_matryoshka_cli(run_dir, capsys):
    assert matryoshka.main([*_common(run_dir, "mrl"), "--nb_knn", "3", "--levels", "3"]) == 0
    payload = json.loads((run_dir / "mrl" / matryoshka.RESULTS_FILENAME).read_text())
    dim = payload["embed_dim"]
    assert list(payload["results"]) == [str(dim), str(dim // 2), str(dim // 4)]
    assert "k=3 top-1" in capsys.readouterr().out


def test_linear_cli(run_dir):
    args = [*_common(run_dir, "linear"), "--epochs", "2", "--learning-rates", "0.1", "--no-augmentation"]
    assert linear.main(args) == 0
    results = json.loads((run_dir / "linear" / linear.RESULTS_FILENAME).read_text())
    assert len(results["classifiers"]) == 4 and results["top-1"] == 100.0
    assert (run_dir / "linear" / linear.BEST_CLASSIFIER_FILENAME).is_file()
    assert torch.load(run_dir / "linear" / linear.CHECKPOINT_FILENAME, weights_only=True)["epoch"] == 2


def test_log_regression_cli(run_dir):
    args = [*_common(run_dir, "logreg"), "--finetune-on-val", "--max-train-iters", "100", "--c-values", "1e-6", "1"]
    assert log_regression.main(args) == 0
    results = json.loads((run_dir / "logreg" / log_regression.RESULTS_FILENAME).read_text())
    assert results["backend"] == "sklearn" and results["top-1"] == 100.0
    held_out = {float(c): top1 for c, top1 in results["held_out_top1"].items()}
    assert list(held_out) == [1e-6, 1.0]
    assert results["best_C"] == min(c for c, top1 in held_out.items() if top1 == max(held_out.values()))


def test_visualize_pca_cli(run_dir):
    args = [*_common(run_dir, "pca")[:6], "--image-size", "40", str(run_dir / "data" / "val" / "red")]
    assert visualize_pca.main([*args, "--remove-background"]) == 0
    pictures = sorted((run_dir / "pca").glob("*_pca.png"))
    assert len(pictures) == 4
    with Image.open(pictures[0]) as picture:
        assert picture.size == (40, 40)


def test_knn_cli_on_a_checkpoint_written_by_the_trainer(run_dir, tmp_path):
    from franca.train.ssl_meta_arch import SSLMetaArch
    from franca.train.train import save_teacher_checkpoint

    cfg = load_config_file(run_dir / "config.yaml")
    torch.manual_seed(0)
    checkpoint = save_teacher_checkpoint(SSLMetaArch(cfg), tmp_path, "training_7")
    args = _common(run_dir, "knn_trainer")
    args[args.index("--pretrained-weights") + 1] = str(checkpoint)
    assert knn.main([*args, "--nb_knn", "3"]) == 0
    results = json.loads((run_dir / "knn_trainer" / knn.RESULTS_FILENAME).read_text())["results"]
    assert 0.0 <= results["full"]["3"]["top-1"] <= 100.0 and results["full"]["3"]["top-5"] == 100.0


def test_class_mismatch_between_splits_is_one_clear_error(run_dir):
    args = _common(run_dir, "mismatch")
    args[args.index("--val-dataset") + 1] = f"ImageFolder:root={run_dir / 'data' / 'val_one_class'}"
    with pytest.raises(ValueError, match=r"class mismatch between splits: train has 2 classes, val has 1"):
        knn.main([*args, "--nb_knn", "3"])


def test_missing_checkpoint_is_one_error_line(run_dir):
    args = _common(run_dir, "missing")
    args[args.index("--pretrained-weights") + 1] = str(run_dir / "nope.pth")
    done = subprocess.run(
        [sys.executable, "-m", "franca.eval.knn", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"error: pretrained weights not found: {run_dir / 'nope.pth'}"
    assert "Traceback" not in done.stderr
