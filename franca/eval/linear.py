"""Linear probes on frozen features: a grid of classifiers trained together (the DINOv2 protocol).

Grid: learning rate × ``n`` last blocks ∈ {1, 4} × average-pooled patch tokens {no, yes}. The input
of classifier ``(n, avgpool)`` is the concatenation of the class tokens of the last ``n`` blocks
(after the final norm) and, with ``avgpool``, the mean patch token of the last block. All of them are
slices of one vector per image, ``[cls_{L-N+1} … cls_L, mean(patches_L)]`` with ``N = max(n)``,
so the backbone runs once per image and epoch (through ``get_intermediate_layers``) and the
features are reused by every classifier. The features of the train split are extracted once per
epoch (random train augmentation; once for the whole run with ``--no-augmentation``), each rank
keeps its share and the classifier gradients are averaged over ranks.

Each classifier: ``nn.Linear`` (weights N(0, 0.01²), bias 0), SGD momentum 0.9, no weight decay,
learning rate ``lr × global_batch / 256`` with a cosine decay to 0, cross-entropy summed over the
grid. The classifier with the best val top-1 is reported and saved. A checkpoint is written after
every epoch and a rerun with the same output folder resumes from it.

Usage::

    python -m franca.eval.linear --config-file D/config.yaml --pretrained-weights CKPT \\
        --train-dataset ImageFolder:root=DATA/train --val-dataset ImageFolder:root=DATA/val --output-dir OUT

writes ``OUT/results_eval_linear.json``, ``OUT/best_linear_classifier.pth`` and the running
checkpoint ``OUT/linear_checkpoint.pth``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from franca import distributed
from franca.data.transforms import make_classification_train_transform
from franca.eval.features import extract_features
from franca.eval.metrics import TopkAccuracy
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import get_dataset_args_parser, make_eval_dataset, setup_and_build_model
from franca.eval.utils import average_gradients, check_same_classes, check_val_labels, write_json
from franca.utils.cli import run_cli
from franca.utils.io import atomic_save

logger = logging.getLogger("franca")

RESULTS_FILENAME = "results_eval_linear.json"
CHECKPOINT_FILENAME = "linear_checkpoint.pth"
BEST_CLASSIFIER_FILENAME = "best_linear_classifier.pth"
DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_N_LAST_BLOCKS = (1, 4)


class IntermediateLayerFeatures(nn.Module):
    """Images (B, 3, H, W) → ``[cls_{L-N+1} … cls_L, mean(patches_L)]`` (B, (N + 1)·D) from the last N blocks."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int) -> None:
        super().__init__()
        if not 1 <= n_last_blocks <= backbone.n_blocks:
            raise ValueError(f"cannot use the last {n_last_blocks} blocks of a {backbone.n_blocks}-block backbone")
        self.backbone = backbone
        self.n_last_blocks = n_last_blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.backbone.get_intermediate_layers(images, self.n_last_blocks, return_class_token=True)
        class_tokens = [cls for _, cls in outputs]
        return torch.cat([*class_tokens, outputs[-1][0].mean(dim=1)], dim=-1).float()


class LinearClassifier(nn.Module):
    """A linear layer on the slice of the shared feature vector that belongs to ``(n_last_blocks, avgpool)``."""

    def __init__(self, embed_dim: int, max_blocks: int, n_last_blocks: int, avgpool: bool, num_classes: int) -> None:
        super().__init__()
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool
        self.start = (max_blocks - n_last_blocks) * embed_dim
        self.stop = (max_blocks + int(avgpool)) * embed_dim
        self.linear = nn.Linear(self.stop - self.start, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features[:, self.start : self.stop])


def classifier_name(n_last_blocks: int, avgpool: bool, lr: float) -> str:
    """``classifier_<n>_blocks_avgpool_<bool>_lr_<lr with _ for .>`` as in DINOv2's logs."""
    return f"classifier_{n_last_blocks}_blocks_avgpool_{avgpool}_lr_{lr:.5f}".replace(".", "_")


def build_classifier_grid(
    embed_dim: int,
    num_classes: int,
    learning_rates: Sequence[float],
    n_last_blocks_list: Sequence[int],
    lr_scale: float,
) -> tuple[nn.ModuleDict, list[dict]]:
    """All classifiers of the grid and one SGD parameter group per classifier (its scaled learning rate)."""
    max_blocks = max(n_last_blocks_list)
    classifiers, groups = nn.ModuleDict(), []
    for n in n_last_blocks_list:
        for avgpool in (False, True):
            for base_lr in learning_rates:
                lr = base_lr * lr_scale
                head = LinearClassifier(embed_dim, max_blocks, n, avgpool, num_classes)
                classifiers[classifier_name(n, avgpool, lr)] = head
                groups.append({"params": list(head.parameters()), "lr": lr})
    return classifiers, groups


def _train_one_epoch(
    classifiers: nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """``steps`` SGD steps on random batches of this rank's features; returns the mean summed loss."""
    classifiers.train()
    params = list(classifiers.parameters())
    order = torch.randperm(len(features), generator=generator)
    total = 0.0
    for step in range(steps):
        batch = order[step * batch_size : (step + 1) * batch_size].to(features.device)
        x, y = features[batch], labels[batch]
        loss = sum(F.cross_entropy(head(x), y) for head in classifiers.values())
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        average_gradients(params)
        optimizer.step()
        scheduler.step()
        total += loss.item()
    return total / max(steps, 1)


@torch.no_grad()
def evaluate_classifiers(
    classifiers: nn.ModuleDict, features: torch.Tensor, labels: torch.Tensor, chunk: int = 4096
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 (%) of every classifier on (this rank's share of) the val features, summed over ranks."""
    classifiers.eval()
    meters = {name: TopkAccuracy() for name in classifiers}
    for start in range(0, len(features), chunk):
        x, y = features[start : start + chunk], labels[start : start + chunk]
        for name, head in classifiers.items():
            meters[name].update(head(x), y)
    return {name: meter.compute() for name, meter in meters.items()}


def _best(accuracies: dict[str, dict[str, float]]) -> str:
    """Name of the classifier with the highest top-1 (first in grid order on ties)."""
    return max(accuracies, key=lambda name: accuracies[name]["top-1"])


def _seed_augmentations(seed: int, epoch: int) -> None:
    """Seed the random train augmentations of ``epoch`` on this rank (a resumed run sees the same crops)."""
    torch.manual_seed(seed + 1000 * epoch + distributed.get_rank())


def _load_checkpoint(path: Path, classifiers: nn.ModuleDict, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Restore the running state; returns (epochs done, evaluation history)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if sorted(state["classifiers"]) != sorted(classifiers.state_dict()):
        raise ValueError(
            f"the linear checkpoint {path} was written for another classifier grid "
            "(learning rates, blocks or classes differ): pass --no-resume or another --output-dir"
        )
    classifiers.load_state_dict(state["classifiers"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), list(state["history"])


def run_linear_eval(
    model: nn.Module,
    train_dataset,
    val_dataset,
    output_dir: str | os.PathLike,
    *,
    augmented_train: bool = True,
    epochs: int = 10,
    batch_size: int = 128,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    n_last_blocks_list: Sequence[int] = DEFAULT_N_LAST_BLOCKS,
    eval_period_epochs: int = 1,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    resume: bool = True,
    seed: int = 0,
) -> dict:
    """Train the classifier grid on frozen features of ``model``; return (and, on rank 0, write) the results.

    ``augmented_train``: the train transform is random, so the train features are re-extracted every
    epoch; otherwise they are extracted once. The val features are extracted once.
    """
    if epochs < 1 or batch_size < 1 or not learning_rates or not n_last_blocks_list:
        raise ValueError("linear evaluation needs epochs >= 1, batch size >= 1, learning rates and block counts")
    check_same_classes(train_dataset, val_dataset)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    world_size = distributed.get_world_size()
    feature_model = IntermediateLayerFeatures(model, max(n_last_blocks_list))
    extract = dict(num_workers=num_workers, device=device, autocast_dtype=autocast_dtype, gather=False)

    logger.info("linear: extracting val features (%d images)", len(val_dataset))
    val_features, val_labels = extract_features(feature_model, val_dataset, batch_size, **extract)
    _seed_augmentations(seed, 0)
    train_features, train_labels = extract_features(feature_model, train_dataset, batch_size, **extract)
    features_epoch = 0
    all_train_labels = train_labels
    if world_size > 1:
        gathered = [torch.empty(0)] * world_size
        torch.distributed.all_gather_object(gathered, train_labels.cpu())
        all_train_labels = torch.cat(gathered)
    num_classes = check_val_labels(all_train_labels.cpu(), val_labels.cpu())

    per_rank = len(train_dataset) // world_size
    step_batch = min(batch_size, per_rank)
    steps_per_epoch = per_rank // step_batch
    lr_scale = step_batch * world_size / 256.0
    embed_dim = model.embed_dim
    torch.manual_seed(seed)  # identical initial heads on every rank
    classifiers, groups = build_classifier_grid(embed_dim, num_classes, learning_rates, n_last_blocks_list, lr_scale)
    classifiers.to(train_features.device)
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch, eta_min=0.0)

    checkpoint_path = output_dir / CHECKPOINT_FILENAME
    start_epoch, history = 0, []
    if resume and checkpoint_path.is_file():
        start_epoch, history = _load_checkpoint(checkpoint_path, classifiers, optimizer, scheduler)
        logger.info("linear: resuming from %s after epoch %d", checkpoint_path, start_epoch)

    accuracies: dict[str, dict[str, float]] = {}
    for epoch in range(start_epoch, epochs):
        if augmented_train and epoch != features_epoch:
            _seed_augmentations(seed, epoch)
            train_features, train_labels = extract_features(feature_model, train_dataset, batch_size, **extract)
            features_epoch = epoch
        generator = torch.Generator().manual_seed(seed + 1000 * epoch + distributed.get_rank())
        loss = _train_one_epoch(
            classifiers, optimizer, scheduler, train_features, train_labels, steps_per_epoch, step_batch, generator
        )
        record = {"epoch": epoch + 1, "loss": loss}
        if (epoch + 1) % eval_period_epochs == 0 or epoch + 1 == epochs:
            accuracies = evaluate_classifiers(classifiers, val_features, val_labels)
            best = _best(accuracies)
            record.update(best_classifier=best, **accuracies[best])
        history.append(record)
        logger.info("linear: %s", record)
        if distributed.is_main_process():
            state = {
                "classifiers": classifiers.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
            }
            atomic_save(state, checkpoint_path)

    if not accuracies:
        accuracies = evaluate_classifiers(classifiers, val_features, val_labels)
    best = _best(accuracies)
    head = classifiers[best]
    results = {
        "best_classifier": best,
        "top-1": accuracies[best]["top-1"],
        "top-5": accuracies[best]["top-5"],
        "num_classes": num_classes,
        "classifiers": accuracies,
        "history": history,
    }
    if distributed.is_main_process():
        best_state = {
            "name": best,
            "n_last_blocks": head.n_last_blocks,
            "avgpool": head.avgpool,
            "embed_dim": embed_dim,
            "num_classes": num_classes,
            "top-1": accuracies[best]["top-1"],
            "state_dict": {k: v.cpu() for k, v in head.linear.state_dict().items()},
        }
        atomic_save(best_state, output_dir / BEST_CLASSIFIER_FILENAME)
        write_json(output_dir / RESULTS_FILENAME, results)
    logger.info("linear: best classifier %s top-1 %.2f top-5 %.2f", best, results["top-1"], results["top-5"])
    return results


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False), get_dataset_args_parser()]
    parser = argparse.ArgumentParser(description="Linear-probe evaluation", parents=parents, add_help=add_help)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=list(DEFAULT_LEARNING_RATES))
    parser.add_argument("--n-last-blocks", nargs="+", type=int, default=list(DEFAULT_N_LAST_BLOCKS))
    parser.add_argument("--eval-period-epochs", type=int, default=1, help="evaluate the grid every N epochs")
    parser.add_argument(
        "--no-augmentation",
        action="store_true",
        help="train on centre crops (the eval transform), extracting the train features only once",
    )
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(batch_size=128, num_workers=8)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup = setup_and_build_model(args)
    augmentation = None if args.no_augmentation else make_classification_train_transform(crop_size=args.crop_size)
    results = run_linear_eval(
        setup.backbone,
        make_eval_dataset(args.train_dataset_str, args.crop_size, transform=augmentation),
        make_eval_dataset(args.val_dataset_str, args.crop_size),
        args.output_dir,
        augmented_train=not args.no_augmentation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rates=args.learning_rates,
        n_last_blocks_list=args.n_last_blocks,
        eval_period_epochs=args.eval_period_epochs,
        num_workers=args.num_workers,
        device=setup.device,
        autocast_dtype=setup.autocast_dtype,
        resume=not args.no_resume,
        seed=args.seed,
    )
    logger.info("linear: %s top-1 %.2f", results["best_classifier"], results["top-1"])
    return 0


if __name__ == "__main__":
    run_cli(main)
