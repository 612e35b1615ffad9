"""``python -m demo --compare``: the paper's controlled comparison in miniature, on the embedded demo data.

Two runs of the real trainer with the same budget (``configs/train/cpu_tiny.yaml``, same data, iterations,
batch and seed): a DINOv2 baseline — one DINO head of K prototypes (``dino.MRL=false``) and plain random
block masking (``train.use_block_masking=false``, no inverse block, no roll) — and Franca (Matryoshka heads
and CyclicMask, the config as shipped). For each teacher: k-NN top-1 (k = 20), in-context (HummingBird)
mIoU on the shapes' masks, and both at the Matryoshka truncations d … d/16, printed side by side and
written to ``OUT/compare.json``. Each run lives in ``OUT/<variant>/train`` and resumes like the demo's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from demo.dense import hummingbird_miou_per_dim
from demo.run import KNN_K, _knn_top1, _latest_teacher_checkpoint, _run_training
from franca.data.datasets.demo import write_demo_dataset
from franca.eval.dense import DENSE_LEVELS
from franca.eval.matryoshka import eval_matryoshka, nested_dims
from franca.eval.setup import build_model_for_eval, make_eval_dataset
from franca.utils.config import load_config_file

logger = logging.getLogger("demo")

VARIANTS: dict[str, tuple[str, ...]] = {
    "dinov2": ("dino.MRL=false", "train.use_block_masking=false", "train.use_inverse_block=false", "train.roll=false"),
    "franca": (),
}


def evaluate_variant(run_dir: Path, data_root: Path) -> dict[str, object]:
    """k-NN top-1 and in-context mIoU of the newest teacher of ``run_dir/train``, per truncation."""
    cfg = load_config_file(str(run_dir / "train" / "config.yaml"), [])
    teacher = build_model_for_eval(cfg, _latest_teacher_checkpoint(run_dir / "train"), torch.device("cpu"))
    size = cfg.crops.global_crops_size
    train_set = make_eval_dataset(f"ImageFolder:root={data_root / 'train'}", crop_size=size, resize_ratio=1.0)
    val_set = make_eval_dataset(f"ImageFolder:root={data_root / 'val'}", crop_size=size, resize_ratio=1.0)
    dims = nested_dims(teacher.embed_dim, DENSE_LEVELS)
    knn = eval_matryoshka(teacher, train_set, val_set, nb_knn=(KNN_K,), levels=DENSE_LEVELS, batch_size=128)
    return {
        "knn_top1": _knn_top1(teacher, train_set, val_set),
        "knn_top1_per_dim": {m: per_k[str(KNN_K)]["top-1"] for m, per_k in knn.items()},
        "hummingbird_miou_per_dim": hummingbird_miou_per_dim(teacher, data_root, size, dims),
    }


def format_comparison(rows: dict[str, dict]) -> str:
    """One line per kept dimension: k-NN top-1 and in-context mIoU of every variant."""
    names = list(rows)
    header = f"{'dims':>6} | " + " | ".join(f"{n} k-NN  {n} mIoU" for n in names)
    lines = [header, "-" * len(header)]
    for m in next(iter(rows.values()))["knn_top1_per_dim"]:
        cells = [
            f"{rows[n]['knn_top1_per_dim'][m]:>{len(n) + 5}.1f}  {rows[n]['hummingbird_miou_per_dim'][m]:>{len(n) + 5}.1f}"
            for n in names
        ]
        lines.append(f"{m:>6} | " + " | ".join(cells))
    return "\n".join(lines)


def run_compare(
    out: Path, train_overrides: Sequence[str] = (), train_per_class: int = 500, val_per_class: int = 50
) -> dict[str, dict]:
    """Train and evaluate every variant into ``out``; return (and write, and print) the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    data_root = write_demo_dataset(out / "data", n_train_per_class=train_per_class, n_val_per_class=val_per_class)
    rows = {}
    for name, variant in VARIANTS.items():
        run_dir = out / name
        run_dir.mkdir(exist_ok=True)
        seconds = _run_training(run_dir, data_root, [*variant, *train_overrides])
        rows[name] = {
            "overrides": list(variant),
            "train_seconds": round(seconds, 1),
            **evaluate_variant(run_dir, data_root),
        }
        logger.info("compare: %s %s", name, rows[name])
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    print("\nDINOv2 baseline vs Franca, same budget (k-NN top-1 % and in-context mIoU % per kept dimension):")
    print(format_comparison(rows), flush=True)
    return rows
