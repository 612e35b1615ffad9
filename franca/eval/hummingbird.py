"""HummingBird in-context segmentation (the open-hummingbird-eval protocol): dense nearest-neighbour retrieval.

Memory: every train image is seen ``augmentation_epochs`` times through the paired augmentation
(``RandomResizedCrop(S, scale=(0.5, 2))`` + colour jitter); its patch tokens (B, h·w, D) are
L2-normalised and stored with their patch label, the fraction of the patch's p×p pixels in each class
(ignored pixels count as class 0, as in the protocol). With a bounded ``memory_size`` each image keeps
``memory_size // (N_train · epochs)`` patches: patch score = Σ over the classes in the patch of the number
of patches of this image containing the class, times U(0, 1); the lowest scores are kept (rare classes first).

Query: each val patch token q (val images resized to S×S) retrieves its ``k`` = 30 nearest memory keys by
cosine similarity (faiss ``IndexFlatIP`` when installed, else torch), label ŷ = Σ_j softmax_j(q·k_j / T) y_j
with T = 0.02, the (C, h, w) label map is upsampled bilinearly to S×S and its argmax is compared with the
mask (255 ignored): confusion matrix → mIoU. Matryoshka truncation (``dims``) keeps the first m
coordinates of keys and queries and renormalises them; one memory serves every m.

Differences from open-hummingbird-eval: images are normalised with the ImageNet std (0.229, 0.224, 0.225)
(its transforms have 0.255 for blue); mIoU is read off the confusion matrix directly (its ``PredsmIoU`` first
matches predicted to true classes with the Hungarian algorithm, which is the identity for predictions made
in label space); the default 512-px crops and 10 240 000-patch memory are the published HummingBird setting
(the library's function defaults are 224 px and an unbounded memory).

Ranks: each rank encodes its strided share of the train images, the shares are all-gathered into one
memory on every rank, each rank queries its share of the val images and the confusion matrices are summed.

Usage::

    python -m franca.eval.hummingbird --config-file D/config.yaml --pretrained-weights CKPT \\
        --train-dataset VOC2012:root=VOC:split=trainaug --val-dataset VOC2012:root=VOC:split=val --output-dir OUT

writes ``OUT/results_eval_hummingbird.json``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from franca import distributed
from franca.data.loaders import make_dataset
from franca.data.segmentation_transforms import (
    HBIRD_CROP_SCALE,
    make_segmentation_eval_transform,
    make_segmentation_train_transform,
)
from franca.eval.dense import PatchFeatures, apply_rasa_head, autocast, get_dense_args_parser, resolve_dims
from franca.eval.features import shard_indices
from franca.eval.knn import faiss_index, faiss_module, faiss_search, search_neighbors
from franca.eval.seg_metrics import IGNORE_INDEX, SegmentationMeter
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import get_dataset_args_parser, setup_and_build_model
from franca.eval.utils import write_json
from franca.utils.cli import run_cli

logger = logging.getLogger("franca")

RESULTS_FILENAME = "results_eval_hummingbird.json"
DEFAULT_INPUT_SIZE = 512
DEFAULT_MEMORY_SIZE = 10_240_000
DEFAULT_NUM_NEIGHBOURS = 30
DEFAULT_TEMPERATURE = 0.02


def patch_label_fractions(masks: torch.Tensor, patch_size: int, num_classes: int) -> torch.Tensor:
    """Masks (B, H, W) → per-patch class fractions (B, h·w, C); ignored pixels (255) count as class 0."""
    batch, height, width = masks.shape
    masks = torch.where(masks == IGNORE_INDEX, torch.zeros_like(masks), masks)
    if int(masks.max()) >= num_classes or int(masks.min()) < 0:
        raise ValueError(f"mask labels must lie in [0, {num_classes}) or be {IGNORE_INDEX}")
    one_hot = F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()  # (B, C, H, W)
    fractions = F.avg_pool2d(one_hot, patch_size)  # (B, C, h, w)
    return fractions.flatten(2).transpose(1, 2)


def sample_patches(fractions: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (B, count) of the patches each image keeps: lowest ``Σ_{c in patch} freq_c × U(0, 1)`` first,
    ``freq_c`` the number of the image's patches that contain class c."""
    present = (fractions > 0).float()  # (B, N, C)
    class_frequency = present.sum(dim=1, keepdim=True)  # (B, 1, C)
    scores = (present * class_frequency).sum(dim=2)
    scores = scores * torch.rand(scores.shape, generator=generator).to(scores.device)
    return scores.topk(count, dim=1, largest=False).indices


def _loader(dataset: Dataset, indices: Sequence[int], batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _gather_memory(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's memory share (in rank order) on every rank."""
    if not (distributed.is_enabled() and distributed.get_world_size() > 1):
        return features, labels
    shares: list = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(shares, (features.cpu(), labels.cpu()))
    return torch.cat([f for f, _ in shares]), torch.cat([lab for _, lab in shares])


@torch.no_grad()
def build_memory(
    feature_model: PatchFeatures,
    train_dataset: Dataset,
    num_classes: int,
    memory_size: int | None = DEFAULT_MEMORY_SIZE,
    augmentation_epochs: int = 1,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory of the train split: unit-norm keys (M, D) and patch class fractions (M, C), on the CPU."""
    device = device or torch.device("cpu")
    patches_per_image = None
    if memory_size:
        patches_per_image = memory_size // (len(train_dataset) * augmentation_epochs)
        if patches_per_image < 1:
            raise ValueError(
                f"memory size {memory_size} is below one patch per image ({len(train_dataset)} images × "
                f"{augmentation_epochs} augmentation epochs)"
            )
    rank, world = distributed.get_rank(), distributed.get_world_size()
    generator = torch.Generator().manual_seed(seed + rank)
    torch.manual_seed(seed + rank)  # the random crops of this rank's share
    keys, labels = [], []
    for epoch in range(augmentation_epochs):
        loader = _loader(train_dataset, shard_indices(len(train_dataset), rank, world), batch_size, num_workers)
        for images, masks in loader:
            with autocast(device, autocast_dtype):
                features = feature_model(images.to(device))  # (B, D, h, w)
            features = F.normalize(features.float().flatten(2).transpose(1, 2), dim=-1).cpu()  # (B, N, D)
            fractions = patch_label_fractions(masks, feature_model.patch_size, num_classes)
            if fractions.shape[1] != features.shape[1]:
                raise ValueError(f"masks give {fractions.shape[1]} patches, features {features.shape[1]}")
            if patches_per_image is not None and patches_per_image < features.shape[1]:
                keep = sample_patches(fractions, patches_per_image, generator)
                features = features.gather(1, keep[..., None].expand(-1, -1, features.shape[2]))
                fractions = fractions.gather(1, keep[..., None].expand(-1, -1, fractions.shape[2]))
            keys.append(features.flatten(0, 1))
            labels.append(fractions.flatten(0, 1))
        logger.info("hummingbird: memory epoch %d/%d done", epoch + 1, augmentation_epochs)
    empty = (torch.zeros(0, feature_model.embed_dim), torch.zeros(0, num_classes))
    local_keys, local_labels = (torch.cat(keys), torch.cat(labels)) if keys else empty
    return _gather_memory(local_keys, local_labels)


class MemoryIndex:
    """Exact inner-product search over fixed keys: one faiss ``IndexFlatIP`` when faiss is installed, else torch."""

    def __init__(self, keys: torch.Tensor, backend: str = "auto") -> None:
        self.keys = keys.contiguous()
        self.backend = backend
        faiss = faiss_module(on_gpu=False) if backend in ("auto", "faiss") else None
        if backend == "faiss" and faiss is None:
            raise ValueError("--backend faiss asked but faiss is not installed")
        self.index = faiss_index(faiss, self.keys) if faiss is not None else None

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and indices (Q, k) of each query's k nearest keys."""
        if self.index is not None:
            return faiss_search(self.index, queries, k)
        return search_neighbors(queries, self.keys, k, backend="torch")


def propagate_labels(sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft labels (Q, C) = Σ_j softmax_j(sims / T) · neighbour_labels[:, j] from (Q, k) and (Q, k, C)."""
    weights = torch.softmax(sims / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels)


@torch.no_grad()
def evaluate_in_context(
    feature_model: PatchFeatures,
    val_dataset: Dataset,
    memory_keys: torch.Tensor,
    memory_labels: torch.Tensor,
    dims: Sequence[int],
    num_neighbours: int = DEFAULT_NUM_NEIGHBOURS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> dict[str, dict]:
    """``{"<m>": {"mIoU": %, "pixel_accuracy": %, "per_class_iou": […]}}`` on this rank's share of the val split."""
    device = device or torch.device("cpu")
    if num_neighbours > len(memory_keys):
        raise ValueError(f"k={num_neighbours} neighbours asked but the memory holds {len(memory_keys)} patches")
    num_classes = memory_labels.shape[1]
    embed_dim = memory_keys.shape[1]
    indices = {
        m: MemoryIndex(F.normalize(memory_keys[:, :m], dim=1) if m < embed_dim else memory_keys, backend) for m in dims
    }
    meters = {m: SegmentationMeter(num_classes) for m in dims}
    rank, world = distributed.get_rank(), distributed.get_world_size()
    for images, masks in _loader(val_dataset, shard_indices(len(val_dataset), rank, world), batch_size, num_workers):
        with autocast(device, autocast_dtype):
            features = feature_model(images.to(device))
        batch, _, rows, cols = features.shape
        queries = features.float().flatten(2).transpose(1, 2).flatten(0, 1).cpu()  # (B·h·w, D)
        for m, index in indices.items():
            sims, idx = index.search(F.normalize(queries[:, :m], dim=1), num_neighbours)
            soft = propagate_labels(sims, memory_labels[idx], temperature)  # (B·h·w, C)
            label_map = soft.view(batch, rows, cols, num_classes).permute(0, 3, 1, 2)
            upsampled = F.interpolate(label_map, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            meters[m].update(upsampled.argmax(dim=1), masks)
    return {str(m): meter.compute() for m, meter in meters.items()}


def eval_hummingbird(
    backbone: torch.nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset,
    num_classes: int,
    dims: Sequence[int] | None = None,
    memory_size: int | None = DEFAULT_MEMORY_SIZE,
    augmentation_epochs: int = 1,
    num_neighbours: int = DEFAULT_NUM_NEIGHBOURS,
    temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> dict[str, dict]:
    """Build the memory from ``train_dataset`` and return the in-context mIoU per kept dimension (see module doc).

    Both datasets yield ``(normalised image (3, S, S), int64 mask (S, S))`` (paired transforms applied).
    """
    feature_model = PatchFeatures(backbone).eval()
    dims = list(dims) if dims else [backbone.embed_dim]
    keys, labels = build_memory(
        feature_model, train_dataset, num_classes, memory_size, augmentation_epochs, batch_size, num_workers,
        device, autocast_dtype, seed,
    )  # fmt: skip
    logger.info("hummingbird: memory of %d patches, %d classes", len(keys), num_classes)
    return evaluate_in_context(
        feature_model, val_dataset, keys, labels, dims, num_neighbours, temperature, batch_size, num_workers,
        device, autocast_dtype, backend,
    )  # fmt: skip


def format_table(results: dict[str, dict]) -> str:
    """Rows = kept dimensions, column = mIoU (%)."""
    return "\n".join(["  dims |   mIoU", "-" * 15, *(f"{m:>6} | {r['mIoU']:6.2f}" for m, r in results.items())])


def make_segmentation_datasets(
    train_dataset_str: str, val_dataset_str: str, input_size: int, crop_scale: Sequence[float], hflip: bool = False
) -> tuple[Dataset, Dataset]:
    """The train split with the memory augmentation and the val split resized to ``input_size``."""
    train = make_dataset(
        train_dataset_str, transforms=make_segmentation_train_transform(input_size, crop_scale, hflip=hflip)
    )
    val = make_dataset(val_dataset_str, transforms=make_segmentation_eval_transform(input_size))
    return train, val


def resolve_num_classes(train_dataset: Dataset, val_dataset: Dataset, num_classes: int | None) -> int:
    """``--num-classes`` when given, else the dataset's declared count, else 1 + the largest label of both splits."""
    if num_classes is not None:
        if num_classes < 2:
            raise ValueError(f"--num-classes must be >= 2, got {num_classes}")
        return num_classes
    return max(train_dataset.scan_num_classes(), val_dataset.scan_num_classes())


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False), get_dataset_args_parser(), get_dense_args_parser()]
    parser = argparse.ArgumentParser(
        description="HummingBird in-context segmentation", parents=parents, add_help=add_help
    )
    parser.add_argument(
        "--memory-size", type=int, default=DEFAULT_MEMORY_SIZE, help="patches kept in memory (0: all; %(default)s)"
    )
    parser.add_argument("--augmentation-epochs", type=int, default=1, help="augmented passes over the train split")
    parser.add_argument("--num-neighbours", type=int, default=DEFAULT_NUM_NEIGHBOURS)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument(
        "--crop-scale", nargs=2, type=float, default=list(HBIRD_CROP_SCALE), help="RandomResizedCrop scale"
    )
    parser.add_argument(
        "--backend", choices=("auto", "torch", "faiss"), default="auto", help="nearest-neighbour search"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(crop_size=DEFAULT_INPUT_SIZE, batch_size=64, train_dataset_str=None, val_dataset_str=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.train_dataset_str or not args.val_dataset_str:
        raise ValueError("--train-dataset and --val-dataset are required (e.g. VOC2012:root=DIR:split=trainaug)")
    if args.augmentation_epochs < 1 or args.num_neighbours < 1 or args.temperature <= 0:
        raise ValueError("need --augmentation-epochs >= 1, --num-neighbours >= 1 and --temperature > 0")
    setup = setup_and_build_model(args)
    backbone = apply_rasa_head(setup.backbone, args.rasa)
    train, val = make_segmentation_datasets(
        args.train_dataset_str, args.val_dataset_str, args.crop_size, args.crop_scale
    )
    num_classes = resolve_num_classes(train, val, args.num_classes)
    results = eval_hummingbird(
        backbone,
        train,
        val,
        num_classes,
        dims=resolve_dims(args.dims, backbone.embed_dim),
        memory_size=args.memory_size or None,
        augmentation_epochs=args.augmentation_epochs,
        num_neighbours=args.num_neighbours,
        temperature=args.temperature,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=setup.device,
        autocast_dtype=setup.autocast_dtype,
        backend=args.backend,
        seed=args.seed,
    )
    if distributed.is_main_process():
        print(format_table(results))
        payload = {
            "embed_dim": backbone.embed_dim,
            "num_classes": num_classes,
            "input_size": args.crop_size,
            "memory_size": args.memory_size,
            "num_neighbours": args.num_neighbours,
            "temperature": args.temperature,
            "rasa": args.rasa,
            "results": results,
        }
        write_json(Path(args.output_dir) / RESULTS_FILENAME, payload)
    return 0


if __name__ == "__main__":
    run_cli(main)
