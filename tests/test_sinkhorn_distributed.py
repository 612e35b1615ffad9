"""Two real processes (gloo) give the same Sinkhorn-Knopp targets, losses and centre as one process on the
concatenated batch: the row sums, maxima and masked-patch counts are all-reduced, nothing else."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from franca.loss import MRLDINOLoss, MRLiBOTPatchLoss

WORLD_SIZE = 2
BATCH = 3  # images per rank and global crop
N_LOCAL = 2
PATCHES = 8
LEVELS = (12, 24)
TEMP = 0.05
MASKED = (5, 7)  # masked patches on rank 0 / rank 1
PADDING = (2, 1)  # zero-padding rows up to each rank's upperbound


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _masks(n_masked: int, generator: torch.Generator) -> torch.Tensor:
    """(2·BATCH) × PATCHES masks with ``n_masked`` True, at least one per image of the first crop."""
    masks = torch.zeros(2 * BATCH * PATCHES, dtype=torch.bool)
    masks[torch.randperm(masks.numel(), generator=generator)[:n_masked]] = True
    return masks.view(2 * BATCH, PATCHES)


def _rank_data(rank: int) -> dict:
    """Per-rank inputs: crop-major rows (crop 0 images, then crop 1 images), like the training step."""
    g = torch.Generator().manual_seed(100 + rank)
    masks = _masks(MASKED[rank], g)
    per_image = 1.0 / masks.sum(-1).clamp(min=1)
    rows = MASKED[rank] + PADDING[rank]
    return {
        "dino_logits": [torch.randn(2, BATCH, k, generator=g) for k in LEVELS],
        "student_local": [torch.randn(N_LOCAL, BATCH, k, generator=g) for k in LEVELS],
        "student_global": [torch.randn(2, BATCH, k, generator=g) for k in LEVELS],
        "ibot_logits": [torch.randn(rows, k, generator=g) for k in LEVELS],
        "student_patch": [torch.randn(rows, k, generator=g) for k in LEVELS],
        "masks": masks,
        "masks_weight": per_image.unsqueeze(-1).expand_as(masks)[masks],
    }


def _compute(data: dict, n_masked: int) -> dict:
    """Targets, losses and updated DINO centre for one process's share of the batch."""
    dino_loss = MRLDINOLoss(LEVELS[-1], n_prototypes_per_level=LEVELS)
    ibot_loss = MRLiBOTPatchLoss(LEVELS[-1])
    flat = [t.reshape(-1, t.shape[-1]) for t in data["dino_logits"]]
    dino_targets = dino_loss.sinkhorn_knopp_teacher(flat, TEMP, n_global_crops_teacher=2)
    ibot_targets = ibot_loss.sinkhorn_knopp_teacher(data["ibot_logits"], TEMP, torch.tensor([n_masked]))
    local = dino_loss([t.reshape(-1, t.shape[-1]) for t in data["student_local"]], dino_targets, n_crops=(N_LOCAL, 2))
    glob = dino_loss(
        [t.reshape(-1, t.shape[-1]) for t in data["student_global"]], dino_targets, n_crops=2, teacher_global=True
    )
    ibot = ibot_loss(
        data["student_patch"], ibot_targets, data["masks"], n_masked_patches=n_masked, masks_weight=data["masks_weight"]
    )
    dino_loss.update_center(flat)
    dino_loss.apply_center_update()
    return {
        "dino_targets": [t.view(2, -1, t.shape[-1]) for t in dino_targets],
        "ibot_targets": list(ibot_targets),
        "losses": torch.stack([local, glob, ibot]),
        "center": dino_loss.center.clone(),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(_compute(_rank_data(rank), MASKED[rank]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _concatenated() -> tuple[dict, list[dict]]:
    """The whole batch in one process: images of both ranks side by side, real masked rows before padding."""
    shards = [_rank_data(rank) for rank in range(WORLD_SIZE)]
    data = {
        key: [torch.cat([s[key][j] for s in shards], dim=1) for j in range(len(LEVELS))]
        for key in ("dino_logits", "student_local", "student_global")
    }
    for key in ("ibot_logits", "student_patch"):
        data[key] = [
            torch.cat(
                [s[key][j][: MASKED[r]] for r, s in enumerate(shards)]
                + [s[key][j][MASKED[r] :] for r, s in enumerate(shards)]
            )
            for j in range(len(LEVELS))
        ]
    data["masks"] = torch.cat([s["masks"] for s in shards])
    data["masks_weight"] = torch.cat([s["masks_weight"] for s in shards])
    return data, shards


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-6 * scale


@pytest.mark.timeout(180)
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    assert not dist.is_initialized()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    data, _ = _concatenated()
    single = _compute(data, sum(MASKED))
    offsets = [0, MASKED[0]]
    for j in range(len(LEVELS)):
        for rank, result in enumerate(per_rank):
            images = slice(rank * BATCH, (rank + 1) * BATCH)
            _assert_close(result["dino_targets"][j], single["dino_targets"][j][:, images])
            real = slice(offsets[rank], offsets[rank] + MASKED[rank])
            _assert_close(result["ibot_targets"][j][: MASKED[rank]], single["ibot_targets"][j][real])
            start = sum(MASKED) + sum(PADDING[:rank])
            padding = slice(start, start + PADDING[rank])
            _assert_close(result["ibot_targets"][j][MASKED[rank] :], single["ibot_targets"][j][padding])
    # Each rank's loss is a mean over its images, so the data-parallel objective is the mean over ranks.
    _assert_close(torch.stack([r["losses"] for r in per_rank]).mean(0), single["losses"])
    for result in per_rank:
        _assert_close(result["center"], single["center"])


def test_rank_shards_are_not_trivially_equal():
    """Guard for the test above: without the all-reduce a rank's targets differ from the global ones."""
    data, shards = _concatenated()
    single = _compute(data, sum(MASKED))
    alone = _compute(shards[0], MASKED[0])
    assert not torch.allclose(alone["dino_targets"][0], single["dino_targets"][0][:, :BATCH], atol=1e-4)
    assert not torch.allclose(alone["ibot_targets"][0][: MASKED[0]], single["ibot_targets"][0][: MASKED[0]], atol=1e-4)
