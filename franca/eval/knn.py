"""Weighted k-NN classification on frozen class-token features (the DINO / DINOv2 protocol).

Features are the teacher's class token, L2-normalised, so the similarity is the cosine
``s_ij = <q_i, x_j>``. For a query ``i`` with its ``K = max(nb_knn)`` nearest training features
``j_1..j_K`` (sorted by similarity), the vote weights are ``w_il = softmax_l(s_ij_l / T)``
(``exp(s/T)`` up to a per-query constant) and the score of class ``c`` with ``k`` neighbours is
``sum_{l<=k} w_il [y_j_l = c]``; top-1/top-5 accuracy is read off these scores for every ``k``.

Usage::

    python -m franca.eval.knn --config-file D/config.yaml --pretrained-weights CKPT \\
        --train-dataset ImageFolder:root=DATA/train --val-dataset ImageFolder:root=DATA/val \\
        --nb_knn 10 20 100 200 --temperature 0.07 --output-dir OUT

writes ``OUT/results_eval_knn.json``.
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
from franca.eval.metrics import TopkAccuracy
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import get_dataset_args_parser, make_eval_dataset, setup_and_build_model
from franca.eval.utils import check_same_classes, check_val_labels, write_json
from franca.utils.cli import run_cli

logger = logging.getLogger("franca")

RESULTS_FILENAME = "results_eval_knn.json"
BACKENDS = ("auto", "torch", "faiss")


def faiss_module(on_gpu: bool):
    """faiss when installed (with GPU support when ``on_gpu``), else None."""
    try:
        import faiss
    except ImportError:
        return None
    if on_gpu and not hasattr(faiss, "StandardGpuResources"):
        return None
    return faiss


def faiss_index(faiss, keys: torch.Tensor):
    """An exact inner-product index (``IndexFlatIP``) over the keys (N, D), on the keys' GPU with faiss-gpu."""
    index = faiss.IndexFlatIP(keys.shape[1])
    if keys.device.type == "cuda":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), keys.device.index or 0, index)
    index.add(keys.float().cpu().contiguous().numpy())
    return index


def faiss_search(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and indices (Q, k) of each query's ``k`` nearest keys in ``index``, on the queries' device."""
    sims, idx = index.search(queries.float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(sims).to(queries.device), torch.from_numpy(idx).long().to(queries.device)


def _search_torch(
    queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    keys_t = keys.t().contiguous()
    sims, idx = [], []
    for start in range(0, len(queries), chunk_size):
        top = torch.mm(queries[start : start + chunk_size], keys_t).topk(k, dim=1, largest=True, sorted=True)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


def search_neighbors(
    queries: torch.Tensor, keys: torch.Tensor, k: int, backend: str = "auto", chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query (Q, D) with the keys (N, D): sims and indices, (Q, k) each.

    ``backend``: ``"faiss"`` (exact ``IndexFlatIP``; on the GPU with faiss-gpu), ``"torch"`` (chunked
    matmul + top-k, ``chunk_size`` queries at a time) or ``"auto"`` (faiss when it is installed for the
    keys' device — about twice as fast as torch on CPU — else torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}: expected one of {BACKENDS}")
    if not 1 <= k <= len(keys):
        raise ValueError(f"k={k} nearest neighbours asked but there are {len(keys)} training samples")
    faiss = faiss_module(on_gpu=keys.device.type == "cuda") if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ValueError("k-NN backend 'faiss' asked but faiss (faiss-gpu for GPU features) is not installed")
    if faiss is not None:
        return faiss_search(faiss_index(faiss, keys), queries, k)
    return _search_torch(queries, keys, k, chunk_size)


def weighted_votes(
    neighbor_sims: torch.Tensor,
    neighbor_labels: torch.Tensor,
    nb_knn: Sequence[int],
    temperature: float,
    num_classes: int,
) -> dict[int, torch.Tensor]:
    """Class scores (Q, C) for each ``k`` in ``nb_knn`` from the sorted neighbours' similarities and labels (Q, K).

    Weights ``softmax(sims / T)`` over all K neighbours; the score of class c with k neighbours is the
    sum of the weights of the first k neighbours labelled c.
    """
    max_k = neighbor_sims.shape[1]
    if max(nb_knn) > max_k:
        raise ValueError(f"k={max(nb_knn)} asked but only {max_k} neighbours were retrieved")
    weights = torch.softmax(neighbor_sims / temperature, dim=1)
    scores = {}
    for k in nb_knn:
        votes = torch.zeros(len(weights), num_classes, dtype=weights.dtype, device=weights.device)
        scores[k] = votes.scatter_add_(1, neighbor_labels[:, :k], weights[:, :k])
    return scores


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    nb_knn: Sequence[int],
    temperature: float,
    num_classes: int,
    backend: str = "auto",
    query_chunk: int = 4096,
) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (%) of the weighted k-NN classifier for every k; features L2-normalised by the caller.

    ``val_features`` may be this rank's share only: hit counts are summed over ranks.
    """
    train_labels = train_labels.to(train_features.device)
    meters = {k: TopkAccuracy() for k in nb_knn}
    max_k = max(nb_knn)
    for start in range(0, len(val_features), query_chunk):
        queries = val_features[start : start + query_chunk].to(train_features.device)
        sims, idx = search_neighbors(queries, train_features, max_k, backend=backend)
        scores = weighted_votes(sims, train_labels[idx], nb_knn, temperature, num_classes)
        for k in nb_knn:
            meters[k].update(scores[k], val_labels[start : start + query_chunk])
    return {k: meters[k].compute() for k in nb_knn}


def sample_per_class(labels: torch.Tensor, n_per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``n_per_class`` samples drawn at random (seeded) from every class present in ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for label in torch.unique(labels):
        members = (labels == label).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:n_per_class]])
    return torch.cat(chosen).sort().values


def _few_shot_ks(nb_knn: Sequence[int], n_per_class: int) -> list[int]:
    """k values used with ``n_per_class`` samples per class: nb_knn ∪ {n_per_class}, at most n_per_class."""
    return sorted(k for k in set(nb_knn) | {n_per_class} if k <= n_per_class)


def knn_results(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    nb_knn: Sequence[int],
    temperature: float,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    backend: str = "auto",
) -> dict[str, dict[str, dict[str, float]]]:
    """``{"full" | "<n> per class": {"<k>": {"top-1": %, "top-5": %}}}``; few-shot results averaged over ``n_tries``."""
    num_classes = check_val_labels(train_labels, val_labels)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for n_per_class in n_per_class_list:
        if n_per_class < 0:
            name, ks, train_subsets = "full", nb_knn, [slice(None)]
        else:
            name, ks = f"{n_per_class} per class", _few_shot_ks(nb_knn, n_per_class)
            train_subsets = (
                sample_per_class(train_labels, n_per_class, seed).to(train_features.device) for seed in range(n_tries)
            )
        tries = [
            knn_classify(
                train_features[keep],
                train_labels[keep],
                val_features,
                val_labels,
                ks,
                temperature,
                num_classes,
                backend,
            )
            for keep in train_subsets
        ]
        results[name] = {str(k): {key: sum(t[k][key] for t in tries) / len(tries) for key in tries[0][k]} for k in ks}
    return results


class _NormalizedClassToken(torch.nn.Module):
    """``model(x)`` (the class token) L2-normalised along the feature axis."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model(images).float(), dim=-1)


def eval_knn(
    model: torch.nn.Module,
    train_dataset,
    val_dataset,
    nb_knn: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    gather_on_cpu: bool = False,
    n_per_class_list: Sequence[int] = (-1,),
    n_tries: int = 1,
    backend: str = "auto",
) -> dict[str, dict[str, dict[str, float]]]:
    """Extract normalised class tokens of both splits (train gathered on every rank, val sharded) and run k-NN."""
    check_same_classes(train_dataset, val_dataset)
    if any(k < 1 for k in nb_knn) or temperature <= 0:
        raise ValueError(f"--nb_knn values must be >= 1 and --temperature > 0, got {list(nb_knn)} and {temperature}")
    full_run = any(n < 0 for n in n_per_class_list)
    if full_run and max(nb_knn) > len(train_dataset):
        raise ValueError(f"--nb_knn {max(nb_knn)} exceeds the {len(train_dataset)} samples of the train split")
    feature_model = _NormalizedClassToken(model)
    common = dict(device=device, autocast_dtype=autocast_dtype, gather_on_cpu=gather_on_cpu)
    logger.info("k-NN: extracting train features (%d images)", len(train_dataset))
    train_features, train_labels = extract_features(feature_model, train_dataset, batch_size, num_workers, **common)
    logger.info("k-NN: extracting val features (%d images)", len(val_dataset))
    val_features, val_labels = extract_features(
        feature_model, val_dataset, batch_size, num_workers, gather=False, **common
    )
    return knn_results(
        train_features, train_labels, val_features, val_labels, nb_knn, temperature, n_per_class_list, n_tries, backend
    )


def format_results(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One line per (training subset, k): ``full  k=20  top-1 78.10  top-5 91.00``."""
    return "\n".join(
        f"{subset:>14}  k={k:<4} top-1 {acc['top-1']:6.2f}  top-5 {acc['top-5']:6.2f}"
        for subset, per_k in results.items()
        for k, acc in per_k.items()
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False), get_dataset_args_parser()]
    parser = argparse.ArgumentParser(description="Weighted k-NN evaluation", parents=parents, add_help=add_help)
    parser.add_argument("--nb_knn", nargs="+", type=int, default=[10, 20, 100, 200], help="numbers of neighbours")
    parser.add_argument("--temperature", type=float, default=0.07, help="temperature T of the vote weights exp(s/T)")
    parser.add_argument("--gather-on-cpu", action="store_true", help="keep the train features in CPU memory")
    parser.add_argument("--n-per-class-list", nargs="+", type=int, default=[-1], help="few-shot sizes; -1 = all")
    parser.add_argument("--n-tries", type=int, default=1, help="random draws per few-shot size")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="nearest-neighbour search")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup = setup_and_build_model(args)
    train_dataset = make_eval_dataset(args.train_dataset_str, args.crop_size)
    val_dataset = make_eval_dataset(args.val_dataset_str, args.crop_size)
    results = eval_knn(
        setup.backbone,
        train_dataset,
        val_dataset,
        nb_knn=args.nb_knn,
        temperature=args.temperature,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=setup.device,
        autocast_dtype=setup.autocast_dtype,
        gather_on_cpu=args.gather_on_cpu,
        n_per_class_list=args.n_per_class_list,
        n_tries=args.n_tries,
        backend=args.backend,
    )
    if distributed.is_main_process():
        logger.info("k-NN results (T=%g)\n%s", args.temperature, format_results(results))
        payload = {
            "train_dataset": args.train_dataset_str,
            "val_dataset": args.val_dataset_str,
            "temperature": args.temperature,
            "results": results,
        }
        path = write_json(Path(args.output_dir) / RESULTS_FILENAME, payload)
        logger.info("k-NN results written to %s", path)
    return 0


if __name__ == "__main__":
    run_cli(main)
