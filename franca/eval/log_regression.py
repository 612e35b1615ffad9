"""L2-regularised logistic regression on frozen class tokens (the DINOv2 protocol).

The inverse regularisation ``C`` is swept over ``10 ** linspace(-6, 5, 45)``: each value is fitted
on the train features and scored (top-1) on a held-out set — a seeded random 10 % of the train
split, or a separate ``--finetune-dataset``, or the val split with ``--finetune-on-val``. The best
``C`` is refitted on train ∪ held-out and its top-1/top-5 on the val split are reported. The solver
is cuML's ``LogisticRegression`` when cuML is installed and the features are on a GPU, scikit-learn's
otherwise; both give the same results format. Ranks share the sweep (rank r fits every W-th C).

Usage::

    python -m franca.eval.log_regression --config-file D/config.yaml --pretrained-weights CKPT \\
        --train-dataset ImageFolder:root=DATA/train --val-dataset ImageFolder:root=DATA/val --output-dir OUT

writes ``OUT/results_eval_log_regression.json``.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from franca import distributed
from franca.eval.features import extract_features
from franca.eval.metrics import DEFAULT_TOPK, topk_correct
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import get_dataset_args_parser, make_eval_dataset, setup_and_build_model
from franca.eval.utils import check_same_classes, check_val_labels, write_json
from franca.utils.cli import run_cli

logger = logging.getLogger("franca")

RESULTS_FILENAME = "results_eval_log_regression.json"
DEFAULT_C_VALUES = tuple((10 ** torch.linspace(-6, 5, 45, dtype=torch.float64)).tolist())
DEFAULT_MAX_ITER = 1000
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _cuml_class():
    """cuML's ``LogisticRegression`` class, or None when cuML is not installed."""
    try:
        from cuml.linear_model import LogisticRegression
    except ImportError:
        return None
    return LogisticRegression


def select_backend(device: torch.device | str) -> str:
    """``"cuml"`` for features on a GPU with cuML installed, else ``"sklearn"``."""
    if torch.device(device).type == "cuda" and _cuml_class() is not None:
        return "cuml"
    return "sklearn"


class LogisticRegressionProbe:
    """One L2 logistic regression of inverse strength ``C`` on features (N, D) → class probabilities (N, num_classes)."""

    def __init__(self, C: float, backend: str, max_iter: int = DEFAULT_MAX_ITER, dtype: torch.dtype = torch.float64):
        self.backend, self.dtype = backend, dtype
        if backend == "cuml":
            self.estimator = _cuml_class()(
                penalty="l2", C=C, max_iter=max_iter, output_type="numpy", tol=1e-12, linesearch_max_iter=50
            )
        elif backend == "sklearn":
            from sklearn.linear_model import LogisticRegression

            self.estimator = LogisticRegression(C=C, max_iter=max_iter, tol=1e-12)
        else:
            raise ValueError(f"unknown logistic-regression backend {backend!r}: expected 'cuml' or 'sklearn'")

    def _as_input(self, tensor: torch.Tensor):
        if self.backend == "cuml":  # cuML reads CUDA tensors through __cuda_array_interface__
            return tensor.to(device="cuda", dtype=self.dtype).contiguous()
        return tensor.to(device="cpu", dtype=self.dtype).numpy()

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> LogisticRegressionProbe:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(converge|max_iter).*")
            self.estimator.fit(self._as_input(features), self._as_input(labels))
        return self

    def predict_proba(self, features: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Probabilities (N, num_classes); classes absent from the fit get probability 0."""
        probas = torch.as_tensor(np.asarray(self.estimator.predict_proba(self._as_input(features))))
        classes = torch.as_tensor(np.asarray(self.estimator.classes_)).long()
        full = torch.zeros(len(probas), num_classes, dtype=probas.dtype)
        full[:, classes] = probas
        return full


def _accuracy(probe: LogisticRegressionProbe, features, labels, num_classes: int) -> dict[str, float]:
    """Top-1/top-5 (%) of ``probe`` on features held in full by this rank (no cross-rank sum)."""
    correct = topk_correct(probe.predict_proba(features, num_classes), labels.cpu(), DEFAULT_TOPK)
    return {f"top-{k}": 100.0 * c.item() / len(labels) for k, c in zip(DEFAULT_TOPK, correct)}


def sweep_c(
    train: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    backend: str,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
    max_iter: int = DEFAULT_MAX_ITER,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, dict[float, float]]:
    """Best ``C`` by held-out top-1 (smallest C on ties) and the top-1 of every C, sweep shared over ranks."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    scores = {}
    for C in list(c_values)[rank::world_size]:
        probe = LogisticRegressionProbe(C, backend, max_iter, dtype).fit(*train)
        scores[C] = _accuracy(probe, *held_out, num_classes)["top-1"]
        logger.info("log-regression: C=%.6g held-out top-1 %.2f", C, scores[C])
    if distributed.is_enabled() and world_size > 1:
        parts: list[dict] = [{}] * world_size
        torch.distributed.all_gather_object(parts, scores)
        scores = {c: s for part in parts for c, s in part.items()}
    best_c = max(sorted(scores), key=lambda c: scores[c])
    return best_c, {c: scores[c] for c in sorted(scores)}


def _split_held_out(features: torch.Tensor, labels: torch.Tensor, fraction: float = 0.1, seed: int = 0):
    """A seeded random ``fraction`` of the samples as held-out set: ((train_f, train_l), (held_f, held_l))."""
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).to(features.device)
    cut = int(len(features) * fraction)
    if cut == 0:
        raise ValueError(f"the train split has {len(features)} samples: too few to hold out 10 % for choosing C")
    held, kept = order[:cut], order[cut:]
    return (features[kept], labels[kept]), (features[held], labels[held])


def eval_log_regression(
    model: torch.nn.Module,
    train_dataset,
    val_dataset,
    finetune_dataset=None,
    finetune_on_val: bool = False,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    train_features_device: torch.device | str = "cpu",
    train_dtype: torch.dtype = torch.float64,
    max_iter: int = DEFAULT_MAX_ITER,
    c_values: Sequence[float] = DEFAULT_C_VALUES,
) -> dict:
    """``{"top-1", "top-5", "best_C", "backend", "held_out_top1": {C: %}}`` of the logistic-regression probe."""
    check_same_classes(train_dataset, val_dataset)
    train_features_device = torch.device(train_features_device)
    extract = dict(
        num_workers=num_workers,
        device=device,
        autocast_dtype=autocast_dtype,
        gather_on_cpu=train_features_device.type == "cpu",
    )
    train_f, train_l = extract_features(model, train_dataset, batch_size, **extract)
    val_f, val_l = extract_features(model, val_dataset, batch_size, **extract)
    num_classes = check_val_labels(train_l.cpu(), val_l.cpu())
    if finetune_dataset is not None:
        held_out = extract_features(model, finetune_dataset, batch_size, **extract)
        train = (train_f, train_l)
    elif finetune_on_val:
        held_out, train = (val_f, val_l), (train_f, train_l)
    else:
        train, held_out = _split_held_out(train_f, train_l)
    train = tuple(t.to(train_features_device) for t in train)
    backend = select_backend(train_features_device)
    logger.info("log-regression: %s backend, features %s", backend, tuple(train[0].shape))
    best_c, held_out_top1 = sweep_c(train, held_out, num_classes, backend, c_values, max_iter, train_dtype)
    if not finetune_on_val:
        train = tuple(torch.cat([t, h.to(train_features_device)]) for t, h in zip(train, held_out))
    final = LogisticRegressionProbe(best_c, backend, max_iter, train_dtype).fit(*train)
    accuracy = _accuracy(final, val_f, val_l, num_classes)
    logger.info("log-regression: C=%.6g val top-1 %.2f top-5 %.2f", best_c, accuracy["top-1"], accuracy["top-5"])
    return {
        **accuracy,
        "best_C": best_c,
        "backend": backend,
        "held_out_top1": {str(c): s for c, s in held_out_top1.items()},
    }


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False), get_dataset_args_parser()]
    parser = argparse.ArgumentParser(description="Logistic-regression evaluation", parents=parents, add_help=add_help)
    parser.add_argument("--finetune-dataset", dest="finetune_dataset_str", default=None, help="held-out set for C")
    parser.add_argument("--finetune-on-val", action="store_true", help="choose C on the val split")
    parser.add_argument("--train-features-device", default="cpu", help="where the solver runs (cpu, cuda)")
    parser.add_argument("--train-dtype", choices=sorted(_DTYPES), default="float64")
    parser.add_argument("--max-train-iters", type=int, default=DEFAULT_MAX_ITER)
    parser.add_argument(
        "--c-values", nargs="+", type=float, default=list(DEFAULT_C_VALUES), help="C grid (default: 45 values 1e-6…1e5)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup = setup_and_build_model(args)
    datasets = [
        make_eval_dataset(name, args.crop_size, resize_ratio=1.0) if name else None
        for name in (args.train_dataset_str, args.val_dataset_str, args.finetune_dataset_str)
    ]
    results = eval_log_regression(
        setup.backbone,
        *datasets[:2],
        finetune_dataset=datasets[2],
        finetune_on_val=args.finetune_on_val,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=setup.device,
        autocast_dtype=setup.autocast_dtype,
        train_features_device=args.train_features_device,
        train_dtype=_DTYPES[args.train_dtype],
        max_iter=args.max_train_iters,
        c_values=args.c_values,
    )
    if distributed.is_main_process():
        write_json(Path(args.output_dir) / RESULTS_FILENAME, results)
    return 0


if __name__ == "__main__":
    run_cli(main)
