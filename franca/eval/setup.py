"""Command-line setup shared by the evaluations: the teacher backbone from a training run.

``--config-file D/config.yaml --pretrained-weights CKPT`` builds the teacher backbone described by
the config (``build_model_from_cfg(cfg, only_teacher=True)``) and loads the backbone weights of a
checkpoint in the official format (``{"teacher": {"backbone.…": …}}``) or a bare state dict.
Under ``torchrun``/SLURM with several processes the process group is initialised first.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from franca import distributed
from franca.data.loaders import make_dataset
from franca.data.transforms import make_classification_eval_transform
from franca.hub.loading import load_backbone_weights
from franca.models import build_model_from_cfg
from franca.utils.config import load_config_file
from franca.utils.precision import precision_dtype

logger = logging.getLogger("franca")


def get_args_parser(
    description: str | None = None, parents: Sequence[argparse.ArgumentParser] = (), add_help: bool = True
) -> argparse.ArgumentParser:
    """Arguments every evaluation takes: the model (config + weights), the output folder, config overrides."""
    parser = argparse.ArgumentParser(description=description, parents=list(parents), add_help=add_help)
    parser.add_argument(
        "--config-file", required=True, help="config of the training run (D/config.yaml) or a shipped name"
    )
    parser.add_argument("--pretrained-weights", required=True, help="teacher checkpoint (teacher_checkpoint.pth)")
    parser.add_argument("--output-dir", default=".", help="folder for results and logs (default: %(default)s)")
    parser.add_argument("--opts", nargs="+", default=[], help="config overrides, key=value")
    return parser


def get_dataset_args_parser() -> argparse.ArgumentParser:
    """Arguments of the evaluations on a labelled train/val pair of datasets (``Name:key=value`` strings)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--train-dataset", dest="train_dataset_str", default="ImageNet:split=TRAIN")
    parser.add_argument("--val-dataset", dest="val_dataset_str", default="ImageNet:split=VAL")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    parser.add_argument("--num-workers", type=int, default=5, help="data-loading workers per process")
    parser.add_argument("--crop-size", type=int, default=224, help="side of the centre crop fed to the model")
    return parser


def make_eval_dataset(dataset_str: str, crop_size: int = 224, resize_ratio: float = 256 / 224, transform=None):
    """The dataset ``dataset_str`` with the evaluation transform: resize the short side to
    ``round(crop_size × resize_ratio)``, centre-crop ``crop_size``, normalise (or ``transform`` if given)."""
    if transform is None:
        resize_size = round(crop_size * resize_ratio)
        transform = make_classification_eval_transform(resize_size=resize_size, crop_size=crop_size)
    return make_dataset(dataset_str, transform=transform)


@dataclass
class EvalModel:
    """A frozen backbone ready for evaluation, the device it sits on and the autocast dtype of the run."""

    backbone: torch.nn.Module
    device: torch.device
    autocast_dtype: torch.dtype
    config: DictConfig


def autocast_dtype_from_config(cfg: DictConfig) -> torch.dtype:
    """The teacher backbone's mixed-precision parameter dtype (fp16/bf16/fp32) from the config."""
    name = str(cfg.compute_precision.teacher.backbone.mixed_precision.param_dtype)
    return precision_dtype(name, "compute_precision.teacher.backbone.mixed_precision.param_dtype")


def init_distributed_from_env() -> None:
    """Join the process group when launched as one of several processes (torchrun or SLURM)."""
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    if world_size > 1 and not distributed.is_enabled():
        distributed.enable(overwrite=True)


def default_device() -> torch.device:
    """This process's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_model_for_eval(
    cfg: DictConfig, pretrained_weights: str | os.PathLike, device: torch.device
) -> torch.nn.Module:
    """Teacher backbone of ``cfg`` with the checkpoint's backbone weights (strict), frozen, in eval mode."""
    path = Path(pretrained_weights)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    model, _ = build_model_from_cfg(cfg, only_teacher=True)
    load_backbone_weights(model, str(path))
    model.requires_grad_(False)
    return model.eval().to(device)


def setup_and_build_model(args: argparse.Namespace) -> EvalModel:
    """Parse the config (with ``--opts``), join the process group if any, build and load the backbone."""
    cfg = load_config_file(args.config_file, list(args.opts))
    init_distributed_from_env()
    torch.backends.cudnn.benchmark = True
    device = default_device()
    backbone = build_model_for_eval(cfg, args.pretrained_weights, device)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return EvalModel(backbone=backbone, device=device, autocast_dtype=autocast_dtype_from_config(cfg), config=cfg)
