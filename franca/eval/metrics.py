"""Top-k classification accuracy, counted locally and summed over ranks.

Every evaluation reports ``top-1`` / ``top-5`` accuracy in percent: a sample counts as correct at
``k`` when its label is among the ``k`` highest-scoring classes. With fewer than ``k`` classes the
count uses all classes (so top-5 is 100 % for a two-class problem).
"""

from __future__ import annotations

import torch

from franca import distributed

DEFAULT_TOPK = (1, 5)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = DEFAULT_TOPK) -> torch.Tensor:
    """Number of samples whose label is in the top-k of ``scores`` (N, C), for each k; float64 (len(ks),)."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    max_k = min(max(ks), scores.shape[1])
    ranked = scores.topk(max_k, dim=1).indices
    hits = ranked.eq(labels.to(ranked.device).view(-1, 1))
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks]).double()


class TopkAccuracy:
    """Accumulates top-k hit counts over batches; :meth:`compute` sums them over ranks and returns percents."""

    def __init__(self, ks: tuple[int, ...] = DEFAULT_TOPK) -> None:
        self.ks = tuple(ks)
        self.correct = torch.zeros(len(self.ks), dtype=torch.float64)
        self.total = 0

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += topk_correct(scores, labels, self.ks).cpu()
        self.total += labels.numel()

    def compute(self) -> dict[str, float]:
        """``{"top-1": %, "top-5": %}`` over every sample seen by every rank."""
        counts = torch.cat([self.correct, torch.tensor([float(self.total)], dtype=torch.float64)])
        if distributed.is_enabled():
            on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
            counts = counts.to(torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
            torch.distributed.all_reduce(counts)
        correct, total = counts[:-1].cpu(), counts[-1].item()
        if total == 0:
            raise ValueError("no samples were evaluated: the validation dataset is empty")
        return {f"top-{k}": 100.0 * c.item() / total for k, c in zip(self.ks, correct)}
