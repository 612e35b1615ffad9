"""Whole training loop throughput on the ``train/cpu_tiny`` config: images/s and the share spent waiting for data.

Runs :func:`franca.train.train.do_train` (data loader, augmentation, collate + CyclicMask, step, EMA,
metrics, one checkpoint at the end) on the generated demo image folder, once per DataLoader worker
count. From the per-iteration JSON lines (the first ``warmup`` iterations dropped):

* ``img_per_s`` = batch / median iteration time;
* ``data_wait_share`` = Σ data_time / Σ iter_time (time the loop blocked on the loader);
* ``step_seconds`` = median (iter_time − data_time).

    python -m benchmarks.train_loop [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import median, peak_memory_mb
from franca.data.datasets.demo import write_demo_dataset
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import METRICS_FILE, do_train
from franca.utils.config import apply_scaling_rules_to_cfg, load_config_file

CONFIG = "train/cpu_tiny"


def _measure(data_root: Path, out_dir: Path, num_workers: int, iterations: int, warmup: int) -> dict:
    cfg = load_config_file(
        CONFIG,
        [
            f"train.dataset_path=ImageFolder:root={data_root}/train",
            f"train.output_dir={out_dir}",
            f"train.num_workers={num_workers}",
            f"train.OFFICIAL_EPOCH_LENGTH={iterations}",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "teacher.warmup_teacher_temp_epochs=0",
            "optim.freeze_last_layer_epochs=0",
            "train.saveckp_freq=1",
            "evaluation.eval_period_iterations=0",
        ],
    )
    apply_scaling_rules_to_cfg(cfg, world_size=1)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.prepare_for_distributed_training()
    do_train(cfg, model, resume=False, log_period=1)
    records = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()][warmup:]
    iter_times = [r["iter_time"] for r in records]
    data_times = [r["data_time"] for r in records]
    batch = cfg.train.batch_size_per_gpu
    seconds = median(iter_times)
    return {
        "workload": f"cpu_tiny_loop_b{batch}_workers{num_workers}",
        "seconds": seconds,
        "img_per_s": batch / seconds,
        "gflops": None,
        "peak_mem_mb": peak_memory_mb(),
        "data_wait_share": sum(data_times) / sum(iter_times),
        "step_seconds": median([i - d for i, d in zip(iter_times, data_times)]),
        "iterations": len(records),
        "arch": cfg.student.arch,
        "global_crops_size": cfg.crops.global_crops_size,
        "local_crops": f"{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
    }


def run(quick: bool = False) -> list[dict]:
    iterations, warmup = (6, 2) if quick else (30, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="franca_train_loop_") as tmp:
        tmp_path = Path(tmp)
        data_root = write_demo_dataset(tmp_path / "demo", n_train_per_class=10, n_val_per_class=1, image_size=64)
        for num_workers in (0, 2):
            rows.append(_measure(data_root, tmp_path / f"run_w{num_workers}", num_workers, iterations, warmup))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    for row in run(quick=parser.parse_args().quick):
        print(json.dumps(row))
