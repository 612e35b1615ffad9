"""The ``make demo`` pipeline at reduced size (the full-size run is the slow test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from demo.compare import run_compare
from demo.run import _latest_teacher_checkpoint, _run_training, run_demo
from franca.data.datasets.demo import write_demo_dataset
from franca.utils.config import load_config_file

SUMMARY_KEYS = {
    "knn_top1_random_init",
    "knn_top1_trained",
    "matryoshka_knn",
    "rasa_position_r2_before",
    "rasa_position_r2_after",
    "train_seconds",
    "hummingbird_miou_random_init",
    "hummingbird_miou_trained",
    "hummingbird_miou_rasa",
    "linear_seg_miou_trained",
}
DENSE_KEYS = sorted(key for key in SUMMARY_KEYS if "miou" in key)
TINY_RUN = [
    "optim.epochs=1",
    "train.OFFICIAL_EPOCH_LENGTH=4",
    "evaluation.eval_period_iterations=2",
    "optim.warmup_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0",
    "optim.freeze_last_layer_epochs=0",
    "train.num_workers=0",
]


@pytest.fixture(autouse=True)
def _repo_on_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo starts the trainer and RASA as child processes: they must import this checkout."""
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def test_reduced_demo_writes_every_artefact_and_is_idempotent(tmp_path: Path) -> None:
    summary = run_demo(tmp_path, TINY_RUN, rasa_iterations=2, train_per_class=10, val_per_class=4)
    assert SUMMARY_KEYS <= summary.keys()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for key in ("teacher_checkpoint", "rasa_folded_checkpoint", "pca_picture", "training_metrics"):
        assert Path(summary[key]).is_file(), key
    assert list(summary["matryoshka_knn"]) == ["128", "64", "32", "16", "8"]
    assert all(0.0 <= v <= 100.0 for v in summary["matryoshka_knn"].values())
    assert 0.0 <= summary["knn_top1_random_init"] <= 100.0 and 0.0 <= summary["knn_top1_trained"] <= 100.0
    assert summary["rasa_position_r2_after"] < summary["rasa_position_r2_before"]
    assert all(0.0 < summary[key] <= 100.0 for key in DENSE_KEYS)
    trained_seconds = summary["train_seconds"]
    assert trained_seconds > 0

    again = run_demo(tmp_path, TINY_RUN, rasa_iterations=2, train_per_class=10, val_per_class=4)
    assert again["teacher_checkpoint"] == summary["teacher_checkpoint"]
    assert again["knn_top1_trained"] == summary["knn_top1_trained"]
    assert again["rasa_position_r2_after"] == summary["rasa_position_r2_after"]
    assert [again[key] for key in DENSE_KEYS] == [summary[key] for key in DENSE_KEYS]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the whole demo: ~13 minutes on 2 quiet cores
def test_full_demo_trained_teacher_beats_random_init(tmp_path: Path) -> None:
    """The trained teacher must be clearly better than the random-init network: one k-NN accuracy on the 500
    held-out images has a standard error of ~2 points, so 6 points is 2σ of the difference. Measured: +11.2
    (16.8 → 28.0 %, docs/benchmarks.md); the issue's aim of +15 is not reached in 10 minutes on 2 cores."""
    summary = run_demo(tmp_path)
    assert summary["knn_top1_trained"] - summary["knn_top1_random_init"] >= 6.0
    assert summary["rasa_position_r2_after"] < 0.2 * summary["rasa_position_r2_before"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compare_trains_the_baseline_and_franca_with_equal_budget(tmp_path: Path) -> None:
    rows = run_compare(tmp_path, TINY_RUN, train_per_class=10, val_per_class=4)
    assert list(rows) == ["dinov2", "franca"]
    assert json.loads((tmp_path / "compare.json").read_text()) == rows
    baseline = load_config_file(str(tmp_path / "dinov2" / "train" / "config.yaml"))
    franca = load_config_file(str(tmp_path / "franca" / "train" / "config.yaml"))
    assert not baseline.dino.MRL and not baseline.train.use_block_masking and not baseline.train.roll
    assert franca.dino.MRL and franca.train.use_inverse_block and franca.train.roll
    for row in rows.values():
        assert list(row["knn_top1_per_dim"]) == list(row["hummingbird_miou_per_dim"]) == ["128", "64", "32", "16", "8"]
        assert all(0.0 < v <= 100.0 for v in row["hummingbird_miou_per_dim"].values())


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("separate_head", [True, False])
@pytest.mark.parametrize("mrl", [True, False])
@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_every_head_combination_trains(tmp_path: Path, centering: str, mrl: bool, separate_head: bool) -> None:
    data_root = write_demo_dataset(tmp_path / "data", n_train_per_class=4, n_val_per_class=1, image_size=48)
    overrides = [*TINY_RUN, f"train.centering={centering}", f"dino.MRL={mrl}", f"ibot.separate_head={separate_head}"]
    assert _run_training(tmp_path, data_root, overrides) > 0
    assert _latest_teacher_checkpoint(tmp_path / "train").is_file()
