"""RASA metrics: position targets, the official validation quantities, the position probe, k-means mIoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rasa.metrics import kmeans_miou, position_grid, position_probe_r2, rasa_val_metrics
from rasa.src.rasa_head import RASAHead


def test_position_grid_is_row_major_and_normalised():
    grid = position_grid(3, 4)
    assert grid.shape == (12, 2)
    torch.testing.assert_close(grid[0], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(grid[1], torch.tensor([0.0, 1 / 3]))
    torch.testing.assert_close(grid[4], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(grid[-1], torch.tensor([1.0, 1.0]))


def _positional_tokens(n_images: int, h: int = 6, dim: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens = content noise + a linear code of (row, col) along two fixed directions."""
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(2, dim, generator=torch.Generator().manual_seed(123))
    pos = position_grid(h, h).expand(n_images, -1, -1)
    return torch.randn(n_images, h * h, dim, generator=g) * 0.3 + pos @ code * 3, pos


def test_probe_r2_detects_linear_position_and_its_removal():
    train_x, train_p = _positional_tokens(20, seed=0)
    test_x, test_p = _positional_tokens(10, seed=1)
    assert position_probe_r2(train_x, train_p, test_x, test_p) > 0.95
    noise_r2 = position_probe_r2(torch.randn_like(train_x), train_p, torch.randn_like(test_x), test_p)
    assert noise_r2 < 0.05
    # removing the exact position code leaves nothing linear to decode
    code = torch.randn(2, 24, generator=torch.Generator().manual_seed(123))
    head = RASAHead(24, 0)
    with torch.no_grad():
        head.pos_pred.weight.copy_(code)
        assert position_probe_r2(head(train_x), train_p, head(test_x), test_p) < 0.05


def test_val_metrics_keys_and_values():
    tokens, _ = _positional_tokens(4)
    head = RASAHead(24, 1)
    metrics = rasa_val_metrics(head, tokens, (6, 6), pos_embed=torch.randn(1, 36, 24))
    assert set(metrics) == {
        "mse_loss",
        "mse_loss_pos_x",
        "mse_loss_no_pos_x",
        "pos_x_to_pos_emb_sim",
        "no_pos_x_to_pos_emb_sim",
        "no_pos_x_to_x_sim",
        "pos_x_to_x_sim",
    }
    x_pre = head(tokens, use_pos_pred=False)
    target = position_grid(6, 6).expand(4, -1, -1)
    assert metrics["mse_loss"] == pytest.approx(
        ((torch.sigmoid(x_pre @ head.pos_pred.weight.T) - target) ** 2).mean().item()
    )
    assert -1 <= metrics["pos_x_to_x_sim"] <= 1


def test_kmeans_miou_recovers_separable_segments():
    torch.manual_seed(0)
    b, h, dim, classes = 4, 8, 16, 3
    masks = torch.zeros(b, h, h, dtype=torch.long)
    masks[:, :, 3:5] = 1
    masks[:, :, 5:] = 2
    masks[:, 0, 0] = 255  # ignored pixel
    centers = torch.randn(classes, dim) * 5
    tokens = centers[masks.clamp(max=2).reshape(b, -1)] + 0.05 * torch.randn(b, h * h, dim)
    result = kmeans_miou(tokens, masks, [3, 6], classes, mask_size=None, pca_dim=4)
    assert set(result) == {"K=3_miou", "K=6_miou", "K=6_prec_miou"}
    assert result["K=3_miou"] > 0.99 and result["K=6_miou"] > 0.99
    shuffled = tokens[:, torch.randperm(h * h)]
    assert kmeans_miou(shuffled, masks, [3], classes, mask_size=None, pca_dim=4)["K=3_miou"] < 0.7
    assert np.isfinite(list(result.values())).all()
