"""Linear semantic segmentation on frozen patch tokens (the DINOv2 "linear" protocol), a grid of heads in one pass.

Features: the final-norm patch tokens of the last ``n`` blocks, concatenated, (B, n·D, h, w) (with
``dims``, the first m channels of each block). Head: ``BatchNorm2d(n·m)`` then a 1×1 convolution to C
classes (DINOv2's BNHead); the logits (B, C, h, w) are upsampled bilinearly to the mask resolution and
trained with cross-entropy (ignore index 255). Every head of the grid (kept dimension × learning rate)
sees the same backbone features of each batch, so the backbone runs once per image and epoch. SGD
(momentum 0.9, no weight decay) with a cosine decay to 0; gradients are averaged over ranks. The head
with the best val mIoU is reported per kept dimension and saved.

Train images: the paired random resized crop (scale 0.5–2) with a horizontal flip and colour jitter;
val images and masks resized to S×S. Usage::

    python -m franca.eval.linear_seg --config-file D/config.yaml --pretrained-weights CKPT \\
        --train-dataset ADE20K:root=ADE:split=train --val-dataset ADE20K:root=ADE:split=val --output-dir OUT

writes ``OUT/results_eval_linear_seg.json`` and ``OUT/best_linear_seg_head.pth``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from franca import distributed
from franca.data.segmentation_transforms import HBIRD_CROP_SCALE
from franca.eval.dense import (
    PatchFeatures,
    apply_rasa_head,
    autocast,
    get_dense_args_parser,
    resolve_dims,
    truncate_blocks,
)
from franca.eval.features import shard_indices
from franca.eval.hummingbird import make_segmentation_datasets, resolve_num_classes
from franca.eval.seg_metrics import IGNORE_INDEX, SegmentationMeter
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import get_dataset_args_parser, setup_and_build_model
from franca.eval.utils import average_gradients, write_json
from franca.utils.cli import run_cli
from franca.utils.io import atomic_save

logger = logging.getLogger("franca")

RESULTS_FILENAME = "results_eval_linear_seg.json"
BEST_HEAD_FILENAME = "best_linear_seg_head.pth"
DEFAULT_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_INPUT_SIZE = 512


class LinearSegHead(nn.Module):
    """``BatchNorm2d`` + 1×1 conv on the first ``dim`` channels of each of ``n_blocks`` blocks: (B, C, h, w) logits."""

    def __init__(self, embed_dim: int, n_blocks: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.embed_dim, self.n_blocks, self.dim = embed_dim, n_blocks, dim
        self.bn = nn.BatchNorm2d(n_blocks * dim)
        self.conv = nn.Conv2d(n_blocks * dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(truncate_blocks(features, self.embed_dim, self.dim)))


def head_name(dim: int, lr: float) -> str:
    """``linear_seg_dim_<m>_lr_<lr with _ for .>``."""
    return f"linear_seg_dim_{dim}_lr_{lr:.5f}".replace(".", "_")


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, C, h, w) upsampled bilinearly to the masks (B, H, W), ignoring 255."""
    upsampled = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, masks, ignore_index=IGNORE_INDEX)


def _share(dataset: Dataset) -> Subset:
    return Subset(dataset, list(shard_indices(len(dataset), distributed.get_rank(), distributed.get_world_size())))


@torch.no_grad()
def evaluate_heads(
    feature_model: PatchFeatures,
    heads: nn.ModuleDict,
    val_dataset: Dataset,
    num_classes: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, dict]:
    """mIoU of every head on the val split (each rank its share; confusion matrices summed over ranks)."""
    heads.eval()
    meters = {name: SegmentationMeter(num_classes) for name in heads}
    for images, masks in DataLoader(_share(val_dataset), batch_size=batch_size, num_workers=num_workers):
        with autocast(device, autocast_dtype):
            features = feature_model(images.to(device)).float()
        for name, head in heads.items():
            logits = F.interpolate(head(features), size=masks.shape[-2:], mode="bilinear", align_corners=False)
            meters[name].update(logits.argmax(dim=1).cpu(), masks)
    return {name: meter.compute() for name, meter in meters.items()}


def run_linear_seg(
    backbone: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    num_classes: int,
    output_dir: str | Path,
    *,
    dims: Sequence[int] | None = None,
    n_last_blocks: int = 1,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    epochs: int = 10,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict:
    """Train the head grid on frozen features; return (and, on rank 0, write) the best mIoU per kept dimension."""
    if epochs < 1 or batch_size < 1 or not learning_rates:
        raise ValueError("linear segmentation needs epochs >= 1, batch size >= 1 and learning rates")
    device = device or torch.device("cpu")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    feature_model = PatchFeatures(backbone, n_last_blocks).eval()
    dims = list(dims) if dims else [backbone.embed_dim]
    torch.manual_seed(seed)  # identical initial heads on every rank
    heads, groups = nn.ModuleDict(), []
    for m in dims:
        for lr in learning_rates:
            head = LinearSegHead(backbone.embed_dim, n_last_blocks, m, num_classes)
            heads[head_name(m, lr)] = head
            groups.append({"params": list(head.parameters()), "lr": lr})
    heads.to(device)
    params = list(heads.parameters())
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    share = _share(train_dataset)
    steps_per_epoch = -(-len(share) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch, eta_min=0.0)
    history = []
    for epoch in range(epochs):
        torch.manual_seed(seed + 1000 * epoch + distributed.get_rank())  # crops and batch order of this epoch
        heads.train()
        total = 0.0
        for images, masks in DataLoader(share, batch_size=batch_size, shuffle=True, num_workers=num_workers):
            with torch.no_grad(), autocast(device, autocast_dtype):
                features = feature_model(images.to(device))
            features, masks = features.float(), masks.to(device)
            loss = sum(segmentation_loss(head(features), masks) for head in heads.values())
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            average_gradients(params)
            optimizer.step()
            scheduler.step()
            total += loss.item()
        history.append({"epoch": epoch + 1, "loss": total / steps_per_epoch})
        logger.info("linear_seg: %s", history[-1])

    scores = evaluate_heads(
        feature_model, heads, val_dataset, num_classes, batch_size, num_workers, device, autocast_dtype
    )
    best = {}
    for m in dims:
        name = max((head_name(m, lr) for lr in learning_rates), key=lambda n: scores[n]["mIoU"])
        best[str(m)] = {"head": name, **scores[name]}
    results = {
        "num_classes": num_classes,
        "n_last_blocks": n_last_blocks,
        "best": best,
        "heads": {name: s["mIoU"] for name, s in scores.items()},
        "history": history,
    }
    if distributed.is_main_process():
        top = best[str(max(dims))]["head"]
        head = heads[top]
        state = {
            "name": top,
            "embed_dim": backbone.embed_dim,
            "n_last_blocks": n_last_blocks,
            "dim": head.dim,
            "num_classes": num_classes,
            "mIoU": scores[top]["mIoU"],
            "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
        }
        atomic_save(state, output_dir / BEST_HEAD_FILENAME)
        write_json(output_dir / RESULTS_FILENAME, results)
    return results


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False), get_dataset_args_parser(), get_dense_args_parser()]
    parser = argparse.ArgumentParser(description="Linear segmentation", parents=parents, add_help=add_help)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=list(DEFAULT_LEARNING_RATES))
    parser.add_argument(
        "--n-last-blocks", type=int, default=1, help="concatenate the patch tokens of the last n blocks"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(crop_size=DEFAULT_INPUT_SIZE, batch_size=16, train_dataset_str=None, val_dataset_str=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.train_dataset_str or not args.val_dataset_str:
        raise ValueError("--train-dataset and --val-dataset are required (e.g. ADE20K:root=DIR:split=train)")
    setup = setup_and_build_model(args)
    backbone = apply_rasa_head(setup.backbone, args.rasa)
    train, val = make_segmentation_datasets(
        args.train_dataset_str, args.val_dataset_str, args.crop_size, HBIRD_CROP_SCALE, hflip=True
    )
    num_classes = resolve_num_classes(train, val, args.num_classes)
    results = run_linear_seg(
        backbone,
        train,
        val,
        num_classes,
        args.output_dir,
        dims=resolve_dims(args.dims, backbone.embed_dim),
        n_last_blocks=args.n_last_blocks,
        learning_rates=args.learning_rates,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=setup.device,
        autocast_dtype=setup.autocast_dtype,
        seed=args.seed,
    )
    if distributed.is_main_process():
        for m, record in results["best"].items():
            print(f"linear_seg dims {m}: mIoU {record['mIoU']:.2f} ({record['head']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
