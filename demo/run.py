"""``make demo``: the newcomer's end-to-end run on a laptop CPU, no download needed.

Steps (each reusing what an earlier run of the same ``--output-dir`` already finished):

1. write the procedural demo dataset as an image folder (``OUT/data/{train,val}/<class>/*.png``);
2. train a tiny Franca model with ``configs/train/cpu_tiny.yaml`` through the real trainer
   (``python -m franca.train.train``: Matryoshka heads, Sinkhorn-Knopp, CyclicMask, iBOT, KoLeo);
3. k-NN top-1 of a randomly initialised backbone vs the trained teacher on the held-out split;
4. the Matryoshka truncation table (k-NN with the first m features, m = d … d/16);
5. a few RASA iterations on the teacher through RASA's Python API (``rasa.train.run_rasa``; patch-position
   probe R² before / after) and the folded checkpoint;
6. a PCA picture of the teacher's patch features;
7. dense evaluations on the shapes' masks (``demo/dense.py``): in-context mIoU of the random init, the
   teacher and the RASA-folded teacher, and linear-segmentation mIoU of the teacher;
8. a closing summary, also written as ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from demo.dense import run_dense_evals
from franca.configs import CONFIG_DIR
from franca.data.datasets.demo import write_demo_dataset
from franca.eval.knn import eval_knn
from franca.eval.matryoshka import eval_matryoshka, format_table
from franca.eval.setup import build_model_for_eval, make_eval_dataset
from franca.eval.visualize_pca import visualize_pca
from franca.models import build_model_from_cfg
from franca.utils.config import load_config_file
from rasa.train import load_rasa_config, run_rasa

logger = logging.getLogger("demo")

TRAIN_CONFIG = CONFIG_DIR / "train" / "cpu_tiny.yaml"
KNN_K = 20
PCA_IMAGES_PER_CLASS = 1


def _run_training(out: Path, data_root: Path, overrides: Sequence[str]) -> float:
    """Train (or resume) with the real trainer in a child process; return the seconds spent training in total."""
    train_dir = out / "train"
    timing_file = train_dir / "demo_train_seconds.json"
    previous = json.loads(timing_file.read_text())["seconds"] if timing_file.is_file() else 0.0
    command = [
        sys.executable,
        "-m",
        "franca.train.train",
        "--config-file",
        str(TRAIN_CONFIG),
        "--output-dir",
        str(train_dir),
        f"train.dataset_path=ImageFolder:root={data_root / 'train'}",
        *overrides,
    ]
    logger.info("training: %s", " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = previous + time.perf_counter() - start
    timing_file.write_text(json.dumps({"seconds": seconds}))
    return seconds


def _latest_teacher_checkpoint(train_dir: Path) -> Path:
    """The teacher checkpoint of the highest iteration under ``train_dir/eval/training_<it>/``."""
    candidates = sorted(
        train_dir.glob("eval/training_*/teacher_checkpoint.pth"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    if not candidates:
        raise FileNotFoundError(f"the trainer wrote no teacher checkpoint under {train_dir / 'eval'}")
    return candidates[-1]


def _knn_top1(model: torch.nn.Module, train_set, val_set) -> float:
    results = eval_knn(model, train_set, val_set, nb_knn=(KNN_K,), temperature=0.07, batch_size=128)
    return results["full"][str(KNN_K)]["top-1"]


def _rasa_overrides(cfg: DictConfig, weights: Path, data_root: Path, out_dir: Path, iterations: int) -> list[str]:
    """RASA config overrides (``key=value``) describing the trained student architecture and the demo images."""
    student = cfg.student
    size = cfg.crops.global_crops_size
    return [
        "device=cpu",
        "num_workers=0",
        f"backbone.arch={student.arch}",
        f"backbone.weights={weights}",
        f"backbone.img_size={size}",
        f"backbone.patch_size={student.patch_size}",
        f"backbone.ffn_layer={student.ffn_layer}",
        f"backbone.block_chunks={student.block_chunks}",
        f"backbone.init_values={student.layerscale}",
        f"backbone.num_register_tokens={student.num_register_tokens}",
        f"backbone.qkv_bias={student.qkv_bias}",
        f"backbone.proj_bias={student.proj_bias}",
        f"backbone.ffn_bias={student.ffn_bias}",
        f"backbone.interpolate_offset={student.interpolate_offset}",
        f"backbone.interpolate_antialias={student.interpolate_antialias}",
        "data.dataset_name=folder",
        f"data.data_dir={data_root / 'train'}",
        f"data.val_data_dir={data_root / 'val'}",
        f"data.size_crops={size}",
        f"data.size_crops_val={size}",
        "train.batch_size=64",
        "train.max_epochs=2",
        "train.lr_heads=0.01",
        f"train.end_pos_layers={iterations}",
        f"train.output_dir={out_dir}",
        "val.val_iters=4",
        "val.val_iters_u_segm=0",
    ]


def _run_rasa(cfg: DictConfig, weights: Path, data_root: Path, out: Path, iterations: int) -> dict[str, object]:
    """Run RASA post-training (``rasa.train.run_rasa``) unless its folded checkpoint exists; read the probe R²."""
    rasa_dir = out / "rasa"
    folded = rasa_dir / "folded_teacher_checkpoint.pth"
    if not folded.is_file():
        if (rasa_dir / "metrics.jsonl").exists():
            (rasa_dir / "metrics.jsonl").unlink()
        overrides = _rasa_overrides(cfg, weights, data_root, rasa_dir, iterations)
        logger.info("RASA: %s", " ".join(overrides))
        run_rasa(load_rasa_config(None, overrides))
    records = [json.loads(line) for line in (rasa_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    r2 = [r["probe_r2"] for r in records if r.get("probe_r2") is not None]
    return {
        "rasa_position_r2_before": r2[0],
        "rasa_position_r2_after": r2[-1],
        "rasa_iterations": len(records) - 1,
        "rasa_head": str(rasa_dir / "rasa_head.pth"),
        "rasa_folded_checkpoint": str(folded),
    }


def _pca_images(data_root: Path) -> list[Path]:
    """The first ``PCA_IMAGES_PER_CLASS`` held-out images of every class."""
    return [
        image
        for class_dir in sorted((data_root / "val").iterdir())
        for image in sorted(class_dir.glob("*.png"))[:PCA_IMAGES_PER_CLASS]
    ]


def run_demo(
    out: Path,
    train_overrides: Sequence[str] = (),
    rasa_iterations: int = 8,
    train_per_class: int = 500,
    val_per_class: int = 50,
) -> dict[str, object]:
    """Run every step of the demo into ``out``; return (and write) the summary."""
    out.mkdir(parents=True, exist_ok=True)
    data_root = write_demo_dataset(out / "data", n_train_per_class=train_per_class, n_val_per_class=val_per_class)
    train_seconds = _run_training(out, data_root, train_overrides)

    train_dir = out / "train"
    cfg = load_config_file(str(train_dir / "config.yaml"), [])
    checkpoint = _latest_teacher_checkpoint(train_dir)
    size = cfg.crops.global_crops_size
    train_set = make_eval_dataset(f"ImageFolder:root={data_root / 'train'}", crop_size=size, resize_ratio=1.0)
    val_set = make_eval_dataset(f"ImageFolder:root={data_root / 'val'}", crop_size=size, resize_ratio=1.0)

    torch.manual_seed(cfg.train.seed)
    random_model, _ = build_model_from_cfg(cfg, only_teacher=True)
    knn_random = _knn_top1(random_model.eval(), train_set, val_set)
    teacher = build_model_for_eval(cfg, checkpoint, torch.device("cpu"))
    knn_trained = _knn_top1(teacher, train_set, val_set)

    matryoshka = eval_matryoshka(teacher, train_set, val_set, nb_knn=(KNN_K,), levels=5, batch_size=128)
    (out / "matryoshka_knn.json").write_text(json.dumps(matryoshka, indent=2))

    rasa = _run_rasa(cfg, checkpoint, data_root, out, rasa_iterations)
    pca_dir = out / "pca"
    visualize_pca(teacher, _pca_images(data_root), pca_dir, image_size=4 * size)
    rasa_teacher = build_model_for_eval(cfg, rasa["rasa_folded_checkpoint"], torch.device("cpu"))
    dense = run_dense_evals(random_model, teacher, rasa_teacher, data_root, size, out)

    summary = {
        "knn_top1_random_init": knn_random,
        "knn_top1_trained": knn_trained,
        "knn_k": KNN_K,
        "matryoshka_knn": {dim: per_k[str(KNN_K)]["top-1"] for dim, per_k in matryoshka.items()},
        **rasa,
        **dense,
        "train_seconds": round(train_seconds, 1),
        "teacher_checkpoint": str(checkpoint),
        "training_metrics": str(train_dir / "training_metrics.json"),
        "config": str(train_dir / "config.yaml"),
        "dataset": str(data_root),
        "pca_picture": str(pca_dir / "pca_grid.png"),
        "summary": str(out / "summary.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, matryoshka)
    return summary


def _print_summary(summary: dict[str, object], matryoshka: dict) -> None:
    lines = [
        "",
        "=" * 72,
        "Franca CPU demo: summary",
        "=" * 72,
        f"k-NN top-1 (k={KNN_K}) on held-out images: random init {summary['knn_top1_random_init']:.1f} %"
        f"  ->  trained teacher {summary['knn_top1_trained']:.1f} %",
        f"training time: {summary['train_seconds']:.0f} s",
        "",
        "Matryoshka truncation (k-NN with the first m features of the class token):",
        format_table(matryoshka),
        "",
        f"RASA: patch-position probe R^2 {summary['rasa_position_r2_before']:.3f} -> "
        f"{summary['rasa_position_r2_after']:.3f} after {summary['rasa_iterations']} iterations",
        "",
        "in-context (HummingBird) mIoU on the shapes' masks: random init "
        f"{summary['hummingbird_miou_random_init']:.1f} %  ->  trained {summary['hummingbird_miou_trained']:.1f} %"
        f"  ->  with RASA {summary['hummingbird_miou_rasa']:.1f} %",
        f"linear segmentation mIoU of the trained teacher: {summary['linear_seg_miou_trained']:.1f} %",
        "",
        "artefacts:",
        *(
            f"  {key:<24} {summary[key]}"
            for key in (
                "dataset",
                "config",
                "training_metrics",
                "teacher_checkpoint",
                "rasa_head",
                "rasa_folded_checkpoint",
                "pca_picture",
                "summary",
            )
        ),
    ]
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Franca end-to-end CPU demo (data, training, k-NN, RASA, PCA).")
    parser.add_argument(
        "--output-dir", default="demo_output", help="where everything is written (default: %(default)s)"
    )
    parser.add_argument(
        "--rasa-iterations", type=int, default=8, help="RASA iterations (2-D directions removed, default: 8)"
    )
    parser.add_argument("--train-per-class", type=int, default=500, help="demo training images per class")
    parser.add_argument("--val-per-class", type=int, default=50, help="demo held-out images per class")
    parser.add_argument(
        "--compare", action="store_true", help="train a DINOv2 baseline and Franca with equal budget and compare them"
    )
    parser.add_argument("opts", nargs="*", help="training config overrides key=value (e.g. optim.epochs=5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.compare:
            from demo.compare import run_compare  # demo.compare builds on this module

            run_compare(Path(args.output_dir).resolve(), args.opts, args.train_per_class, args.val_per_class)
            return 0
        run_demo(
            Path(args.output_dir).resolve(),
            args.opts,
            args.rasa_iterations,
            args.train_per_class,
            args.val_per_class,
        )
    except subprocess.CalledProcessError as error:
        print(f"error: demo step failed (exit {error.returncode}): {' '.join(error.cmd[1:4])} ...", file=sys.stderr)
        return error.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
