"""RASA post-training: ``python -m rasa.train --config F [key=value …]`` (console script ``rasa-train``).

The backbone is loaded (any checkpoint ``franca.hub.loading`` reads) and frozen. For every iteration
``i ∈ [start_pos_layers, end_pos_layers)`` a fresh bias-free ``pos_pred`` (D → 2) is fit with AdamW and a cosine
learning rate (``lr_heads`` → ``final_lr`` over ``max_epochs`` epochs, per step) to minimise
``MSE(sigmoid(pos_pred(x̃)), p)``, where ``x̃`` are the patch tokens of augmented training views with the ``i`` earlier
directions removed and ``p`` the normalised (row, col) of each patch. It is then appended to ``pre_pos_layers``.
After each iteration the head is saved (``rasa_head_iter<i>.pth`` and ``rasa_head.pth``, the official head file
format), the held-out metrics are appended to ``metrics.jsonl``, and a progress line is logged.

Speed (CPU): the backbone is frozen and the head is linear, so its tokens need computing only once per augmentation
pass. With ``train.feature_cache`` ``memory`` (or ``auto`` when the tokens fit in ``cache_max_gb``) the tokens of the
``max_epochs`` augmentation passes are computed once and reused by every iteration: epoch ``e`` of every iteration
sees augmentation pass ``e`` (reshuffled into new batches), and after each iteration the new direction is projected
out of the cached tokens in place. The official loop instead draws new augmentations for every epoch of every
iteration; the number of passes per fit, the batches per epoch and the optimisation are the same. With ``none`` every
epoch runs the backbone on fresh views, as the official loop does. Held-out and probe tokens are always computed once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from franca.eval.features import extract_features
from franca.models import get_architecture
from franca.utils.config import ConfigError, merge_configs, parse_overrides
from franca.utils.io import atomic_save
from rasa.data import (
    ImageFiles,
    build_train_dataset,
    build_val_dataset,
    make_rasa_train_transform,
)
from rasa.fold import fold, load_folded_backbone, save_folded_backbone
from rasa.metrics import kmeans_miou, position_grid, position_probe_r2, rasa_val_metrics
from rasa.src.rasa_head import RASAHead, load_rasa_head

logger = logging.getLogger("rasa")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "rasa_default.yaml"
_ARCH_KEYS = (
    "img_size",
    "patch_size",
    "init_values",
    "ffn_layer",
    "block_chunks",
    "qkv_bias",
    "proj_bias",
    "ffn_bias",
    "num_register_tokens",
    "interpolate_antialias",
    "interpolate_offset",
)
# Keys whose default is a value but which also take null (all held-out batches; no read-out activation).
_NULLABLE_KEYS = ("val.val_iters", "train.pos_out_act_layer")


# ----------------------------------------------------------------------------- configuration
def load_rasa_config(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Default config ⊕ ``config_file`` ⊕ ``key=value`` overrides through franca's one validated merge
    (:func:`franca.utils.config.merge_configs`): an unknown key is one error naming the closest, a value must have the
    default's type; ``backbone.kwargs`` takes any builder keyword."""
    layers = []
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"RASA config file not found: {config_file}")
        layers.append((OmegaConf.load(config_file), f"config file '{config_file}'"))
    if overrides:
        layers.append((parse_overrides(overrides), "the command-line overrides"))
    cfg = merge_configs(OmegaConf.load(DEFAULT_CONFIG), layers, label="RASA config", nullable=_NULLABLE_KEYS)
    _check_config(cfg)
    return cfg


def _check_config(cfg: DictConfig) -> None:
    if cfg.data.data_dir is None:
        raise ConfigError("data.data_dir is not set: give the root of the training images")
    if not 0 <= cfg.train.start_pos_layers < cfg.train.end_pos_layers:
        raise ConfigError(
            f"need 0 <= train.start_pos_layers < train.end_pos_layers, got {cfg.train.start_pos_layers} and "
            f"{cfg.train.end_pos_layers}"
        )
    if cfg.train.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"train.optimizer must be adamw or sgd, got {cfg.train.optimizer!r}")
    if cfg.train.feature_cache not in ("auto", "memory", "none"):
        raise ConfigError(f"train.feature_cache must be auto, memory or none, got {cfg.train.feature_cache!r}")


# ----------------------------------------------------------------------------- backbone and tokens
def build_backbone(backbone_cfg: DictConfig) -> nn.Module:
    """``franca.models.vision_transformer.<arch>`` with the configured keyword arguments and weights, frozen, eval."""
    kwargs = {key: backbone_cfg[key] for key in _ARCH_KEYS} | OmegaConf.to_container(backbone_cfg.kwargs)
    if backbone_cfg.weights:
        model = load_folded_backbone(backbone_cfg.weights, backbone_cfg.arch, **kwargs)
    else:
        logger.warning("backbone.weights is not set: RASA runs on a randomly initialised %s", backbone_cfg.arch)
        model = get_architecture(backbone_cfg.arch)(**kwargs)
    model.requires_grad_(False)
    return model.eval()


def patch_tokens(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``x_norm_patchtokens`` (B, N, D) of ``images`` (B, 3, H, W): the backbone's ``forward_features``, in float32."""
    return backbone.forward_features(images)["x_norm_patchtokens"].float()


class _Unlabelled(Dataset):
    """``(image, 0)`` for each image of ``dataset``: the ``(image, label)`` items the feature extractor reads."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index], 0


def _encode_all(
    backbone: nn.Module, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, with_masks: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch tokens (M, N, D) on CPU of every item of ``dataset`` (and its masks (M, H, W) when ``with_masks``).

    Runs through franca's one feature extractor (:func:`franca.eval.features.extract_features`); a mask plays the
    part of the label.
    """
    items = dataset if with_masks else _Unlabelled(dataset)
    tokens, masks = extract_features(
        partial(patch_tokens, backbone), items, batch_size, num_workers, device, gather_on_cpu=True
    )
    return tokens, (masks if with_masks else None)


class _TokenPasses:
    """Patch tokens of ``max_epochs`` augmentation passes over the training set, kept with earlier directions removed."""

    def __init__(self, passes: list[torch.Tensor]) -> None:
        self.passes = passes

    @torch.no_grad()
    def remove(self, head: RASAHead, weight: torch.Tensor, chunk: int = 256) -> None:
        """Project the span of ``weight``'s rows out of every cached token, in place."""
        weight = weight.detach().cpu()
        for tokens in self.passes:
            for part in tokens.split(chunk):
                part.sub_(head.decompose_pos(part, weight)[0])


# ----------------------------------------------------------------------------- one iteration
def _cosine(base: float, final: float, step: int, total: int) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / max(total, 1)))


def fit_pos_pred(
    head: RASAHead,
    epoch_batches: Callable[[int], Iterator[torch.Tensor]],
    steps_per_epoch: int,
    grid: tuple[int, int],
    train_cfg: DictConfig,
    device: torch.device,
) -> dict[str, float]:
    """Fit ``head.pos_pred`` on debiased token batches (B, N, D) from ``epoch_batches(epoch)``; return loss stats.

    AdamW (or SGD with momentum 0.9), learning rate cosine from ``lr_heads`` to ``final_lr`` and weight decay cosine
    from ``weight_decay`` to ``weight_decay_end``, both per step over ``max_epochs · steps_per_epoch`` steps.
    """
    params = [head.pos_pred.weight]
    if train_cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr_heads, weight_decay=train_cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=train_cfg.lr_heads, momentum=0.9, weight_decay=train_cfg.weight_decay)
    total = steps_per_epoch * train_cfg.max_epochs
    target = position_grid(*grid, device=device)
    step, epoch_losses = 0, []
    for epoch in range(train_cfg.max_epochs):
        losses = []
        for tokens in epoch_batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = _cosine(train_cfg.lr_heads, train_cfg.final_lr, step, total)
                group["weight_decay"] = _cosine(train_cfg.weight_decay, train_cfg.weight_decay_end, step, total)
            tokens = tokens.to(device, non_blocking=True)
            loss = head.loss(tokens, target.expand(tokens.shape[0], -1, -1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_norm_clipping is not None:
                torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_norm_clipping)
            optimizer.step()
            losses.append(loss.item())
            step += 1
        epoch_losses.append(float(np.mean(losses)))
        logger.info("  epoch %d/%d  train mse %.6f", epoch + 1, train_cfg.max_epochs, epoch_losses[-1])
    return {"train_loss_first_epoch": epoch_losses[0], "train_loss": epoch_losses[-1]}


# ----------------------------------------------------------------------------- evaluation
class _HeldOut:
    """Frozen tokens for evaluation: held-out images (+ masks), probe-fit images, the patch position embedding.

    The position probe is fit on one augmented training view (at the held-out size) of the first ``probe_images``
    training images and scored (R²) on the held-out images.
    """

    def __init__(self, cfg: DictConfig, backbone: nn.Module, train_items: list, device: torch.device) -> None:
        val = cfg.val
        n_val = None if val.val_iters is None else val.val_iters * val.val_batch_size
        dataset, has_masks = build_val_dataset(
            cfg.data.voc_data_path, cfg.data.val_data_dir, cfg.data.size_crops_val, n_val
        )
        self.grid = (cfg.data.size_crops_val // backbone.patch_size,) * 2
        self.tokens, self.masks = _encode_all(backbone, dataset, val.val_batch_size, cfg.num_workers, device, has_masks)
        self.positions = position_grid(*self.grid).expand(len(self.tokens), -1, -1)
        self.pos_embed = self._patch_pos_embed(backbone, cfg.data.size_crops_val).cpu()
        self.segm_images = 0
        if has_masks and val.val_iters_u_segm:
            self.segm_images = val.val_iters_u_segm * val.val_batch_size
        self.cfg = cfg
        self.probe_tokens = None
        if val.probe_images:
            data = cfg.data
            probe_view = make_rasa_train_transform(
                data.size_crops_val,
                data.min_scale_crops,
                data.max_scale_crops,
                data.jitter_strength,
                data.blur_strength,
            )
            probe_set = ImageFiles(train_items[: val.probe_images], probe_view)
            self.probe_tokens = _encode_all(backbone, probe_set, val.val_batch_size, cfg.num_workers, device, False)[0]

    @staticmethod
    @torch.no_grad()
    def _patch_pos_embed(backbone: nn.Module, size: int) -> torch.Tensor:
        n = (size // backbone.patch_size) ** 2
        dummy = torch.zeros(1, 1 + n, backbone.embed_dim, device=backbone.pos_embed.device)
        return backbone.interpolate_pos_encoding(dummy, size, size)[:, 1:]

    def probe_r2(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        if self.probe_tokens is None:
            return None
        fit_positions = position_grid(*self.grid).expand(len(self.probe_tokens), -1, -1)
        return position_probe_r2(
            transform(self.probe_tokens),
            fit_positions,
            transform(self.tokens),
            self.positions,
            self.cfg.val.probe_ridge,
        )

    def miou(self, tokens: torch.Tensor, tag: str) -> dict[str, float]:
        if not self.segm_images:
            return {}
        val = self.cfg.val
        result = kmeans_miou(
            tokens[: self.segm_images],
            self.masks[: self.segm_images],
            list(val.num_clusters_kmeans_miou),
            self.cfg.data.num_classes,
            mask_size=100 if val.val_downsample_masks else None,
        )
        return {f"val/{tag}/{key}": value for key, value in result.items()}

    @torch.no_grad()
    def backbone_record(self) -> dict[str, object]:
        record: dict[str, object] = {"stage": "backbone", "probe_r2": self.probe_r2(lambda x: x)}
        record.update(self.miou(self.tokens, "x"))
        return record

    @torch.no_grad()
    def iteration_record(self, head: RASAHead) -> dict[str, object]:
        head_cpu = head.cpu()
        record: dict[str, object] = {
            f"val/{k}": v for k, v in rasa_val_metrics(head_cpu, self.tokens, self.grid, self.pos_embed).items()
        }
        record["probe_r2_before_iteration"] = self.probe_r2(lambda x: head_cpu(x, use_pos_pred=False))
        record["probe_r2"] = self.probe_r2(head_cpu)
        if self.segm_images:
            x_pre = head_cpu(self.tokens[: self.segm_images], use_pos_pred=False)
            x_pos, x_no_pos = head_cpu.decompose_pos(x_pre, head_cpu.pos_pred.weight)
            record.update(self.miou(x_pos, "pos_x"))
            record.update(self.miou(x_no_pos, "no_pos_x"))
        return record


# ----------------------------------------------------------------------------- the loop
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _initial_head(cfg: DictConfig, embed_dim: int) -> RASAHead:
    """A fresh head with no fitted layers, or the configured ``init_head`` ready for iteration ``start_pos_layers``."""
    start = cfg.train.start_pos_layers
    if not cfg.train.init_head:
        if start != 0:
            raise ValueError(f"train.start_pos_layers is {start}: continuing needs train.init_head (a RASA head file)")
        return RASAHead(embed_dim, 0, pos_out_act_layer=cfg.train.pos_out_act_layer)
    head = load_rasa_head(cfg.train.init_head, input_dim=embed_dim, pos_out_act_layer=cfg.train.pos_out_act_layer)
    if head.n_pos_layers == start - 1:
        head.append_pos_pred()
    elif head.n_pos_layers != start:
        raise ValueError(
            f"train.init_head has {head.n_pos_layers} pre_pos_layers: train.start_pos_layers must be "
            f"{head.n_pos_layers} (refit its pos_pred) or {head.n_pos_layers + 1} (continue), got {start}"
        )
    return head


def _use_cache(cfg: DictConfig, n_images: int, tokens_per_image: int, dim: int) -> bool:
    gib = n_images * tokens_per_image * dim * 4 * cfg.train.max_epochs / 2**30
    if cfg.train.feature_cache == "auto":
        use = gib <= cfg.train.cache_max_gb
        logger.info(
            "feature cache: %.2f GiB for %d passes -> %s", gib, cfg.train.max_epochs, "memory" if use else "none"
        )
        return use
    return cfg.train.feature_cache == "memory"


def run_rasa(cfg: DictConfig) -> RASAHead:
    """Run RASA post-training as configured; return the final head (outputs written to ``train.output_dir``)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = _resolve_device(cfg.device)
    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out_dir / "config.yaml")

    backbone = build_backbone(cfg.backbone).to(device)
    data = cfg.data
    train_transform = make_rasa_train_transform(
        data.size_crops, data.min_scale_crops, data.max_scale_crops, data.jitter_strength, data.blur_strength
    )
    train_set = build_train_dataset(
        data.dataset_name, data.data_dir, train_transform, data.max_images, cfg.seed, data.class_list
    )
    batch_size = cfg.train.batch_size
    if len(train_set) < batch_size:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than train.batch_size={batch_size}")
    steps_per_epoch = len(train_set) // batch_size
    grid = (data.size_crops // backbone.patch_size,) * 2
    head = _initial_head(cfg, backbone.embed_dim).to(device)
    logger.info("RASA on %d training images, %d steps per epoch, patch grid %s", len(train_set), steps_per_epoch, grid)

    held_out = _HeldOut(cfg, backbone, train_set.items, device)
    metrics_path = out_dir / "metrics.jsonl"
    with open(metrics_path, "a") as f:
        f.write(json.dumps(held_out.backbone_record()) + "\n")

    loader_gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        train_set, batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers, generator=loader_gen
    )

    cache = None
    if _use_cache(cfg, len(train_set), grid[0] * grid[1], backbone.embed_dim):
        passes = []
        for epoch in range(cfg.train.max_epochs):
            start = time.perf_counter()
            passes.append(_encode_all(backbone, train_set, batch_size, cfg.num_workers, device, False)[0])
            logger.info(
                "cached augmentation pass %d/%d (%.1fs)", epoch + 1, cfg.train.max_epochs, time.perf_counter() - start
            )
        cache = _TokenPasses(passes)
        for layer in head.pre_pos_layers:
            cache.remove(head, layer.weight)

    def epoch_batches(epoch: int) -> Iterator[torch.Tensor]:
        if cache is not None:
            order = torch.randperm(len(train_set), generator=loader_gen)
            for step in range(steps_per_epoch):
                yield cache.passes[epoch][order[step * batch_size : (step + 1) * batch_size]]
            return
        for images in train_loader:
            yield _debiased_tokens(images.to(device))

    @torch.no_grad()
    def _debiased_tokens(images: torch.Tensor) -> torch.Tensor:
        return head(patch_tokens(backbone, images), use_pos_pred=False)

    for it in range(cfg.train.start_pos_layers, cfg.train.end_pos_layers):
        if it > cfg.train.start_pos_layers:
            head.append_pos_pred()
            if cache is not None:
                cache.remove(head, head.pre_pos_layers[-1].weight)
        start = time.perf_counter()
        logger.info("RASA iteration %d/%d: fitting direction %d", it + 1, cfg.train.end_pos_layers, it)
        train_stats = fit_pos_pred(head, epoch_batches, steps_per_epoch, grid, cfg.train, device)
        fit_seconds = time.perf_counter() - start
        record = {"stage": "iteration", "iteration": it, "n_pos_layers": head.n_pos_layers, **train_stats}
        record.update(held_out.iteration_record(head))
        head.to(device)
        record["seconds"] = fit_seconds
        state = {k: v.cpu() for k, v in head.state_dict().items()}
        atomic_save(state, out_dir / f"rasa_head_iter{it:02d}.pth")
        atomic_save(state, out_dir / "rasa_head.pth")
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(
            "RASA iteration %d/%d done in %.1fs: train mse %.5f, val mse %.5f -> %.5f (debiased), position probe R2 %s",
            it + 1,
            cfg.train.end_pos_layers,
            fit_seconds,
            train_stats["train_loss"],
            record["val/mse_loss"],
            record["val/mse_loss_no_pos_x"],
            "n/a" if record["probe_r2"] is None else f"{record['probe_r2']:.4f}",
        )
    if cfg.train.save_folded:
        folded = fold(backbone.cpu(), head.cpu())
        save_folded_backbone(folded, out_dir / "folded_teacher_checkpoint.pth")
        logger.info("wrote %s", out_dir / "folded_teacher_checkpoint.pth")
    return head.cpu()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rasa-train", description="RASA post-training of a frozen Franca backbone.")
    parser.add_argument("--config", default=None, help="YAML config merged over rasa/configs/rasa_default.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.end_pos_layers=4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_rasa(load_rasa_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
