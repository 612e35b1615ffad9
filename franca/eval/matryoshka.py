"""Matryoshka truncation: k-NN accuracy when only the first ``m`` features of the class token are kept.

Franca trains nested (Matryoshka) heads, so the leading coordinates of its representation should
carry most of the information. For ``m`` = d, d/2, …, d/64 the class tokens (train and val) are cut
to their first ``m`` coordinates, L2-renormalised (``x[:m] / ||x[:m]||``) and classified with the
weighted k-NN of :mod:`franca.eval.knn`. Works for any backbone whose ``model(images)`` returns a
(B, d) feature; the table is printed and saved.

Usage::

    python -m franca.eval.matryoshka --config-file D/config.yaml --pretrained-weights CKPT \\
        --train-dataset ImageFolder:root=DATA/train --val-dataset ImageFolder:root=DATA/val --output-dir OUT

writes ``OUT/results_eval_matryoshka.json``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from franca import distributed
from franca.eval.features import extract_features
from franca.eval.knn import BACKENDS, knn_classify
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import get_dataset_args_parser, make_eval_dataset, setup_and_build_model
from franca.eval.utils import check_same_classes, check_val_labels, write_json
from franca.utils.cli import run_cli

logger = logging.getLogger("franca")

RESULTS_FILENAME = "results_eval_matryoshka.json"
DEFAULT_LEVELS = 7  # d, d/2, …, d/64


def nested_dims(dim: int, levels: int = DEFAULT_LEVELS) -> list[int]:
    """``[d, d // 2, …, d // 2**(levels-1)]``, dropping sizes below 1 and repeats."""
    if dim < 1 or levels < 1:
        raise ValueError(f"need a feature dimension >= 1 and at least one level, got dim={dim}, levels={levels}")
    return list(dict.fromkeys(dim >> i for i in range(levels) if dim >> i >= 1))


def truncated_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    dims: Sequence[int],
    nb_knn: Sequence[int] = (20,),
    temperature: float = 0.07,
    backend: str = "auto",
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"<m>": {"<k>": {"top-1": %, "top-5": %}}}`` for raw features truncated to their first m coordinates."""
    num_classes = check_val_labels(train_labels.cpu(), val_labels.cpu())
    if max(dims) > train_features.shape[1]:
        raise ValueError(f"cannot keep {max(dims)} features of {train_features.shape[1]}-dimensional features")
    results = {}
    for m in dims:
        train_m = F.normalize(train_features[:, :m], dim=1)
        val_m = F.normalize(val_features[:, :m], dim=1)
        accuracies = knn_classify(train_m, train_labels, val_m, val_labels, nb_knn, temperature, num_classes, backend)
        results[str(m)] = {str(k): acc for k, acc in accuracies.items()}
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows = kept dimensions, columns = top-1 (%) per k."""
    ks = list(next(iter(results.values())))
    header = f"{'dims':>6} | " + " | ".join(f"k={k} top-1".rjust(11) for k in ks)
    rows = [f"{m:>6} | " + " | ".join(f"{per_k[k]['top-1']:11.2f}" for k in ks) for m, per_k in results.items()]
    return "\n".join([header, "-" * len(header), *rows])


def eval_matryoshka(
    model: torch.nn.Module,
    train_dataset,
    val_dataset,
    nb_knn: Sequence[int] = (20,),
    temperature: float = 0.07,
    levels: int = DEFAULT_LEVELS,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    gather_on_cpu: bool = False,
    backend: str = "auto",
) -> dict[str, dict[str, dict[str, float]]]:
    """Extract raw class tokens of both splits (val sharded over ranks) and run :func:`truncated_knn`."""
    check_same_classes(train_dataset, val_dataset)
    if max(nb_knn) > len(train_dataset):
        raise ValueError(f"--nb_knn {max(nb_knn)} exceeds the {len(train_dataset)} samples of the train split")
    common = dict(device=device, autocast_dtype=autocast_dtype, gather_on_cpu=gather_on_cpu)
    train_f, train_l = extract_features(model, train_dataset, batch_size, num_workers, **common)
    val_f, val_l = extract_features(model, val_dataset, batch_size, num_workers, gather=False, **common)
    if train_f.ndim != 2:
        raise ValueError(f"the model must return one feature vector per image, got shape {tuple(train_f.shape[1:])}")
    dims = nested_dims(train_f.shape[1], levels)
    return truncated_knn(train_f, train_l, val_f, val_l, dims, nb_knn, temperature, backend)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False), get_dataset_args_parser()]
    parser = argparse.ArgumentParser(description="Matryoshka truncation k-NN", parents=parents, add_help=add_help)
    parser.add_argument("--nb_knn", nargs="+", type=int, default=[20], help="numbers of neighbours")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="halvings of d to try (7: d … d/64)")
    parser.add_argument("--gather-on-cpu", action="store_true", help="keep the train features in CPU memory")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="nearest-neighbour search")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup = setup_and_build_model(args)
    results = eval_matryoshka(
        setup.backbone,
        make_eval_dataset(args.train_dataset_str, args.crop_size),
        make_eval_dataset(args.val_dataset_str, args.crop_size),
        nb_knn=args.nb_knn,
        temperature=args.temperature,
        levels=args.levels,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=setup.device,
        autocast_dtype=setup.autocast_dtype,
        gather_on_cpu=args.gather_on_cpu,
        backend=args.backend,
    )
    if distributed.is_main_process():
        print(format_table(results))
        payload = {"embed_dim": setup.backbone.embed_dim, "temperature": args.temperature, "results": results}
        write_json(Path(args.output_dir) / RESULTS_FILENAME, payload)
    return 0


if __name__ == "__main__":
    run_cli(main)
