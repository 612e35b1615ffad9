"""What RASA is judged by: how much absolute position the patch tokens still carry.

* ``position_grid``: the regression target, normalised (row, col) ∈ [0, 1]² of every patch, row-major.
* ``rasa_val_metrics``: the quantities the official loop logs per validation pass (``mse_loss``,
  ``mse_loss_pos_x``, ``mse_loss_no_pos_x`` and four mean cosine similarities).
* ``position_probe_r2``: a fresh ridge probe token → (row, col), fit on one token set, R² on another.
* ``kmeans_miou``: unsupervised segmentation — k-means over PCA-reduced, standardised patch tokens, clusters matched
  to ground-truth classes (Hungarian when k equals the class count, many-to-one otherwise), mean IoU over classes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rasa.src.rasa_head import RASAHead

IGNORE_INDEX = 255


def position_grid(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(h·w, 2) targets ``(i / (h − 1), j / (w − 1))`` for the patch at row i, column j (row-major; 0 for a 1-wide axis)."""
    rows = torch.arange(h, dtype=torch.float32, device=device) / max(h - 1, 1)
    cols = torch.arange(w, dtype=torch.float32, device=device) / max(w - 1, 1)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_r.flatten(), grid_c.flatten()], dim=-1)


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b.expand_as(a), dim=-1, eps=1e-8).mean().item()


@torch.no_grad()
def rasa_val_metrics(
    head: RASAHead, tokens: torch.Tensor, grid_hw: tuple[int, int], pos_embed: torch.Tensor | None = None
) -> dict[str, float]:
    """Official validation quantities on held-out patch tokens ``tokens`` (B, N, D), averaged over all tokens.

    ``x_pre`` = tokens with the ``pre_pos_layers`` removed; ``(x_pos, x_no_pos)`` = its split along ``pos_pred``.
    MSEs of ``forward_pos_pred`` vs the position grid for ``x_pre`` / ``x_pos`` / ``x_no_pos``; mean cosine
    similarities of ``x_pos`` and ``x_no_pos`` to the backbone's patch position embedding ``pos_embed`` (1, N, D)
    when given, and to the original tokens.
    """
    target = position_grid(*grid_hw, device=tokens.device).expand(tokens.shape[0], -1, -1)
    x_pre = head(tokens, use_pos_pred=False)
    x_pos, x_no_pos = head.decompose_pos(x_pre, head.pos_pred.weight)
    metrics = {
        "mse_loss": head.loss(x_pre, target).item(),
        "mse_loss_pos_x": head.loss(x_pos, target).item(),
        "mse_loss_no_pos_x": head.loss(x_no_pos, target).item(),
    }
    if pos_embed is not None:
        metrics["pos_x_to_pos_emb_sim"] = _mean_cosine(x_pos, pos_embed)
        metrics["no_pos_x_to_pos_emb_sim"] = _mean_cosine(x_no_pos, pos_embed)
    metrics["no_pos_x_to_x_sim"] = _mean_cosine(x_no_pos, tokens)
    metrics["pos_x_to_x_sim"] = _mean_cosine(x_pos, tokens)
    return metrics


def position_probe_r2(
    train_tokens: torch.Tensor,
    train_positions: torch.Tensor,
    test_tokens: torch.Tensor,
    test_positions: torch.Tensor,
    ridge: float = 1e-3,
) -> float:
    """R² on the test set of a ridge regression token → position (with intercept) fit on the train set.

    Tokens (…, D) and positions (…, 2) are flattened to rows. Fit in float64 on centred data:
    ``W = (XᵀX + ridge·n·I)⁻¹ Xᵀ Y``. ``R² = 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` over both coordinates (ȳ: test mean).
    """
    x = train_tokens.reshape(-1, train_tokens.shape[-1]).double()
    y = train_positions.reshape(-1, train_positions.shape[-1]).double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc = x - x_mean
    gram = xc.T @ xc + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ (y - y_mean))
    xt = test_tokens.reshape(-1, test_tokens.shape[-1]).double()
    yt = test_positions.reshape(-1, test_positions.shape[-1]).double()
    pred = (xt - x_mean) @ weight + y_mean
    residual = ((yt - pred) ** 2).sum()
    total = ((yt - yt.mean(0)) ** 2).sum()
    return (1.0 - residual / total).item()


def _pca_and_cluster(features: np.ndarray, pca_dim: int, k: int, seed: int) -> np.ndarray:
    """Cluster labels of the rows of ``features`` after PCA to ``pca_dim`` dims (faiss when installed, else sklearn)."""
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        pca = faiss.PCAMatrix(features.shape[1], pca_dim)
        pca.train(features)
        reduced = np.ascontiguousarray(pca.apply_py(features), dtype=np.float32)
        kmeans = faiss.Kmeans(pca_dim, k, niter=50, nredo=5, seed=seed, verbose=False, gpu=False, spherical=False)
        kmeans.train(reduced)
        return kmeans.index.search(reduced, 1)[1].squeeze(1)
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    reduced = PCA(n_components=pca_dim, random_state=seed).fit_transform(features)
    return KMeans(n_clusters=k, n_init=5, max_iter=50, random_state=seed).fit_predict(reduced)


def _match_and_miou(pred: np.ndarray, gt: np.ndarray, k: int, num_classes: int, mode: str) -> float:
    """Map clusters to classes and return the mean IoU over ``num_classes`` classes.

    ``mode``: ``"hungarian"`` (one-to-one by IoU, unmatched clusters → class 0), ``"iou"`` / ``"precision"``
    (each cluster to the class with the best IoU / precision, many-to-one).
    """
    conf = np.bincount(pred * num_classes + gt, minlength=k * num_classes).reshape(k, num_classes).astype(np.float64)
    pred_count, gt_count = conf.sum(1, keepdims=True), conf.sum(0, keepdims=True)
    iou = conf / np.maximum(pred_count + gt_count - conf, 1e-8)
    if mode == "hungarian":
        from scipy.optimize import linear_sum_assignment

        cluster_idx, class_idx = linear_sum_assignment(-iou)
        mapping = np.zeros(k, dtype=np.int64)
        mapping[cluster_idx] = class_idx
    else:
        score = iou if mode == "iou" else conf / np.maximum(pred_count, 1e-8)
        mapping = score.argmax(1)
    merged = np.zeros((num_classes, num_classes))
    np.add.at(merged, mapping, conf)
    tp = np.diag(merged)
    return float(np.mean(tp / np.maximum(merged.sum(0) + merged.sum(1) - tp, 1e-8)))


@torch.no_grad()
def kmeans_miou(
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    num_clusters: list[int],
    num_classes: int,
    mask_size: int | None = 100,
    pca_dim: int = 50,
    seed: int = 1,
) -> dict[str, float]:
    """Unsupervised segmentation mIoU of patch tokens ``embeddings`` (B, N, D) on a square or (h, w) grid.

    ``masks`` (B, H, W) integer class maps, ``IGNORE_INDEX`` (255) ignored; downsampled (nearest) to ``mask_size``²
    when given. Tokens are upsampled bilinearly to the mask size, standardised per feature, PCA-reduced to
    ``pca_dim`` dims and clustered for every k in ``num_clusters``. Returns ``K=<k>_miou`` (Hungarian when
    k == num_classes, else many-to-one by IoU) and, for k ≠ num_classes, ``K=<k>_prec_miou`` (many-to-one by precision).
    """
    b, n, d = embeddings.shape
    masks = masks.long()
    if mask_size is not None:
        masks = F.interpolate(masks[:, None].float(), size=(mask_size, mask_size), mode="nearest")[:, 0].long()
    h, w = masks.shape[-2:]
    grid_h = round((n * masks.shape[-2] / masks.shape[-1]) ** 0.5)
    if grid_h * (n // max(grid_h, 1)) != n:
        raise ValueError(f"cannot arrange {n} patch tokens on a grid with the masks' aspect ratio {h}x{w}")
    fmap = embeddings.transpose(1, 2).reshape(b, d, grid_h, n // grid_h).float()
    fmap = F.interpolate(fmap, size=(h, w), mode="bilinear", align_corners=False)
    features = fmap.permute(0, 2, 3, 1).reshape(-1, d).cpu().numpy()
    features = (features - features.mean(0)) / (features.std(0) + 1e-5)
    gt = masks.reshape(-1).cpu().numpy()
    valid = gt != IGNORE_INDEX
    results = {}
    for k in num_clusters:
        pred = _pca_and_cluster(np.ascontiguousarray(features, dtype=np.float32), min(pca_dim, d), k, seed)
        pred, target = pred[valid].astype(np.int64), gt[valid]
        if k == num_classes:
            results[f"K={k}_miou"] = _match_and_miou(pred, target, k, num_classes, "hungarian")
        else:
            results[f"K={k}_miou"] = _match_and_miou(pred, target, k, num_classes, "iou")
            results[f"K={k}_prec_miou"] = _match_and_miou(pred, target, k, num_classes, "precision")
    return results
