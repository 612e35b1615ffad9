"""The one feature extraction used by every evaluation (k-NN, linear, log-regression, Matryoshka, RASA).

A dataset of ``N`` items ``(image, label)`` is split across the ``W`` ranks by striding: rank ``r``
encodes the items ``r, r + W, r + 2W, …`` (no padding duplicates, unlike ``DistributedSampler``).
Each rank runs ``model`` on its share in batches under ``torch.no_grad`` (and autocast on a GPU),
and the shares are all-gathered back into dataset order, so every rank ends with the features
``(N, *feature_shape)`` (float32) and labels ``(N,)`` (int64) of the whole dataset.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from franca import distributed

logger = logging.getLogger("franca")


def shard_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Dataset indices encoded by ``rank``: ``rank, rank + world_size, …`` (all ranks together cover each index once)."""
    return range(rank, num_samples, world_size)


def _model_device(model: Callable) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
    return torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision on a GPU when a half dtype is asked for; full precision on CPU."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def _encode(
    model: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    indices: Sequence[int],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Features and labels of ``dataset[indices]`` in that order (features None when ``indices`` is empty)."""
    loader = DataLoader(
        Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    features, labels = [], []
    log_every = max(1, len(loader) // 10)
    for step, (images, targets) in enumerate(loader):
        with _autocast(device, autocast_dtype):
            output = model(images.to(device, non_blocking=True))
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"the feature model must return a tensor, got {type(output).__name__}")
        features.append(output.float())
        labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
        if step % log_every == 0 or step == len(loader) - 1:
            logger.info("features: batch %d/%d", step + 1, len(loader))
    if not features:
        return None, torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def _feature_shape(local: torch.Tensor | None) -> tuple[int, ...]:
    """Per-sample feature shape, agreed on by all ranks (a rank with no samples learns it from the others)."""
    shape = [] if local is None else list(local.shape[1:])
    shapes: list[list[int]] = [shape] * distributed.get_world_size()
    torch.distributed.all_gather_object(shapes, shape)
    return tuple(max(shapes, key=len))


def _gather_strided(
    local_features: torch.Tensor | None, local_labels: torch.Tensor, num_samples: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather every rank's strided share and interleave the shares back into dataset order."""
    world_size = distributed.get_world_size()
    padded_len = -(-num_samples // world_size)
    feature_shape = _feature_shape(local_features)
    padded_features = torch.zeros(padded_len, *feature_shape, device=device)
    padded_labels = torch.full((padded_len,), -1, dtype=torch.long, device=device)
    if local_features is not None:
        padded_features[: len(local_features)] = local_features
        padded_labels[: len(local_labels)] = local_labels
    all_features = [torch.empty_like(padded_features) for _ in range(world_size)]
    all_labels = [torch.empty_like(padded_labels) for _ in range(world_size)]
    torch.distributed.all_gather(all_features, padded_features)
    torch.distributed.all_gather(all_labels, padded_labels)
    features = torch.empty(num_samples, *feature_shape, device=device)
    labels = torch.empty(num_samples, dtype=torch.long, device=device)
    for rank in range(world_size):
        count = len(shard_indices(num_samples, rank, world_size))
        features[rank::world_size] = all_features[rank][:count]
        labels[rank::world_size] = all_labels[rank][:count]
    return features, labels


def extract_features(
    model: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    gather: bool = True,
    gather_on_cpu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``dataset`` with ``model`` (images ``(B, 3, H, W)`` → features ``(B, *shape)``), sharded over ranks.

    Returns ``(features (N, *shape) float32, labels (N,) int64)`` in dataset order, gathered on every
    rank; with ``gather=False`` only this rank's share (the items ``shard_indices(N, rank, W)``, in
    that order). ``device`` is where the model runs (default: where its parameters are); results stay
    there unless ``gather_on_cpu``. ``autocast_dtype`` (fp16/bf16) is used on a GPU only.
    """
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("cannot extract features: the dataset is empty")
    device = torch.device(device) if device is not None else _model_device(model)
    if isinstance(model, torch.nn.Module):
        model.eval()
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    indices = shard_indices(num_samples, rank, world_size)
    features, labels = _encode(model, dataset, indices, batch_size, num_workers, device, autocast_dtype)
    if distributed.is_enabled() and world_size > 1:
        if gather:
            features, labels = _gather_strided(features, labels, num_samples, device)
        elif num_samples < world_size:  # some ranks hold no sample: every rank joins the shape exchange
            shape = _feature_shape(features)
            features = torch.zeros(0, *shape, device=device) if features is None else features
    output_device = torch.device("cpu") if gather_on_cpu else device
    return features.to(output_device), labels.to(output_device)
