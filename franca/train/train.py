"""The Franca training loop: ``python -m franca.train.train --config-file F --output-dir D [key=value ...]``.

One iteration, in the order of the code below::

    sampler → dataset (decode) → DataAugmentationDINO → collate_data_and_cast (CyclicMask)
      → SSLMetaArch.forward_backward → clip → optimizer step (skipped on a non-finite loss) → EMA teacher
      → losses read (the one host sync) → metrics → teacher export / checkpoint

Schedules (indexed by iteration, ``E = train.OFFICIAL_EPOCH_LENGTH``, ``T = optim.epochs · E``):
lr cosine from ``optim.lr`` (after the scaling rule) to ``optim.min_lr`` after ``warmup_epochs · E``
linear warm-up from 0; weight decay cosine ``weight_decay → weight_decay_end``; teacher momentum
cosine ``momentum_teacher → final_momentum_teacher``; teacher temperature linear
``warmup_teacher_temp → teacher_temp`` over ``warmup_teacher_temp_epochs · E`` then constant;
last-layer lr = lr but 0 for the first ``freeze_last_layer_epochs · E`` iterations.

Outputs in ``D``: ``config.yaml``, ``log.txt``, ``training_metrics.json`` (JSON lines, every
``--log-period`` iterations; also ``tensorboard/`` when TensorBoard is installed),
training checkpoints (every ``train.checkpoint_period_iterations`` iterations, default ``E`` as the
official trainer, and at the end, the last ``train.checkpoint_keep_last`` kept): ``model_<it>.pth``
(``train.checkpoint_format=full``) or ``model_<it>.dcp/`` (``dcp``: sharded, every rank writes, optionally
asynchronous with ``train.checkpoint_async``); and ``eval/training_<it>/teacher_checkpoint.pth``
(``{"teacher": state_dict}``, the release format) every ``evaluation.eval_period_iterations``.
A run resumes from the newest readable checkpoint in ``D`` unless ``--no-resume``: weights, optimizer,
grad scaler, iteration, sampler position and every rank's RNG states.
SIGUSR1 / SIGUSR2 / SIGTERM (SLURM's or submitit's warning): the current iteration finishes, every rank
agrees (``train.preemption_check_period``), a checkpoint is written and the process exits with status 3
(``REQUEUE_EXIT_CODE``); the same command resumes exactly. On CPU (deterministic algorithms) with
``train.num_workers=0`` the resumed run repeats the uninterrupted one's per-iteration losses exactly;
with workers it continues at the right sample, with worker RNG streams seeded from (seed, rank, start).

Precision: ``SSLMetaArch`` autocasts to ``compute_precision.student.backbone.mixed_precision.param_dtype``
on CUDA and owns the fp16 grad scaler (``model.fp16_scaler``, unscaled here before clipping); CPU is fp32
unless ``compute_precision.fp32_on_cpu=false`` (then CPU autocast and the scaler as on a GPU).
A NaN/inf loss term stops the run with one line naming the iteration and every term (exit status 1): that
step changes no student weight (decided on the device, so the host reads the losses only once per iteration,
after the EMA), nothing more is logged or saved, and the checkpoints already written stay the latest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import warnings
import zlib
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor

import franca.distributed as distributed
from franca import fsdp
from franca.data.augmentations import DataAugmentationDINO
from franca.data.batch_augmentations import BatchAugmentationDINO, EncodedImages, decode_batch
from franca.data.collate import collate_data_and_cast, collate_encoded
from franca.data.loaders import default_sampler_type, make_data_loader, make_dataset
from franca.data.masking import masking_options
from franca.data.multicrop import N_GLOBAL_CROPS, MultiCropDistribution
from franca.logging import MetricLogger, setup_logging
from franca.train.checkpointing import Checkpointer, list_checkpoints, remove_checkpoint, restore_rng_state
from franca.train.iteration import NonFiniteLossError, training_step
from franca.train.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, TrainingPreempted
from franca.train.schedules import CosineScheduler
from franca.train.sharded_checkpoint import ShardedCheckpointer
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.static_step import StaticTrainingStep
from franca.utils.config import apply_scaling_rules_to_cfg, get_cfg_from_args, write_config

logger = logging.getLogger("franca")

METRICS_FILE = "training_metrics.json"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Franca training", add_help=add_help)
    parser.add_argument("--config-file", default="", metavar="FILE", help="training YAML or shipped config name")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="checkpoints, logs and metrics go here")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if D holds checkpoints")
    parser.add_argument("--log-period", type=int, default=10, help="iterations between metric lines (default 10)")
    parser.add_argument("--eval-only", action="store_true", help="export the resumed teacher and stop")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value ...")
    return parser


# ---------------------------------------------------------------------------------------------- optimisation


def build_optimizer(
    cfg: DictConfig, params_groups: list[dict], grad_scaler: torch.amp.GradScaler | None = None
) -> torch.optim.AdamW:
    """AdamW over the student's groups; the fused kernel when every parameter supports it, else foreach.

    Not fused when ``grad_scaler`` steps FSDP2 (DTensor) parameters: the scaler hands the fused kernel a
    plain ``found_inf`` tensor, which does not broadcast against the DTensor step counts (crash at step 1).
    """
    params = [p for group in params_groups for p in group["params"]]
    fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    if grad_scaler is not None and any(isinstance(p, DTensor) for p in params):
        fused = False
    groups = [{k: v for k, v in group.items() if k not in ("foreach", "fused")} for group in params_groups]
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), **kernel)


def build_schedulers(
    cfg: DictConfig,
) -> tuple[CosineScheduler, CosineScheduler, CosineScheduler, CosineScheduler, CosineScheduler]:
    """(lr, wd, momentum, teacher_temp, last_layer_lr) schedules, see the module docstring."""
    epoch = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * epoch
    lr = dict(
        base_value=cfg.optim.lr,
        final_value=cfg.optim.min_lr,
        total_iters=total,
        warmup_iters=cfg.optim.warmup_epochs * epoch,
        start_warmup_value=0.0,
    )
    lr_schedule = CosineScheduler(**lr)
    wd_schedule = CosineScheduler(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    momentum_schedule = CosineScheduler(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total)
    temp_iters = cfg.teacher.warmup_teacher_temp_epochs * epoch
    teacher_temp_schedule = CosineScheduler(
        base_value=cfg.teacher.teacher_temp,
        final_value=cfg.teacher.teacher_temp,
        total_iters=temp_iters,
        warmup_iters=temp_iters,
        start_warmup_value=cfg.teacher.warmup_teacher_temp,
    )
    last_layer_lr_schedule = CosineScheduler(**lr)
    last_layer_lr_schedule.schedule[: cfg.optim.freeze_last_layer_epochs * epoch] = 0.0
    return lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr (``last_layer_lr`` for prototype layers) and weight decay, times its multipliers."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]


# ---------------------------------------------------------------------------------------------- data


def build_data_loader(cfg: DictConfig, sampler_advance: int = 0, input_dtype: torch.dtype = torch.float32):
    """Dataset → DataAugmentationDINO → collate_data_and_cast with the CyclicMask generator, or, with
    ``train.batch_augmentation``, encoded bytes → collate_encoded (crops rendered later by :func:`render_crops`).

    ``sampler_advance`` is the number of samples this rank already consumed (resume).
    """
    masking = masking_options(cfg)
    if cfg.train.batch_augmentation:
        dataset = EncodedImages(make_dataset(cfg.train.dataset_path))
        collate_fn = partial(collate_encoded, n_global_crops=N_GLOBAL_CROPS, **masking)
    else:
        augmentation = _multi_crop_augmentation(DataAugmentationDINO, cfg, uint8_crops=True)
        collate_fn = partial(collate_data_and_cast, dtype=input_dtype, **masking)
        dataset = make_dataset(cfg.train.dataset_path, transform=augmentation, target_transform=None)
    return make_data_loader(
        dataset=dataset,
        batch_size=cfg.train.batch_size_per_gpu,
        num_workers=cfg.train.num_workers,
        shuffle=True,
        seed=cfg.train.seed,
        sampler_type=default_sampler_type(dataset),
        sampler_advance=sampler_advance,
        drop_last=True,
        persistent_workers=cfg.train.num_workers > 0,
        collate_fn=collate_fn,
    )


def build_batch_augmentation(cfg: DictConfig) -> BatchAugmentationDINO | None:
    """The device-side augmentation of ``train.batch_augmentation`` (None when the workers augment)."""
    if not cfg.train.batch_augmentation:
        return None
    return _multi_crop_augmentation(BatchAugmentationDINO, cfg)


def _multi_crop_augmentation(cls: type[MultiCropDistribution], cfg: DictConfig, **kwargs) -> MultiCropDistribution:
    """``cls`` (the worker or the device-side augmentation) built from ``cfg.crops``."""
    crops = cfg.crops
    return cls(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        **kwargs,
    )


def render_crops(batch: dict, augmentation: BatchAugmentationDINO, device: torch.device, dtype: torch.dtype) -> dict:
    """Decode ``batch["encoded_images"]`` on ``device`` and add the collated global and local crops."""
    images = decode_batch(batch.pop("encoded_images"), batch.pop("image_sources"), device)
    batch["collated_global_crops"], batch["collated_local_crops"] = augmentation(images, dtype)
    return batch


def _input_dtype(model: SSLMetaArch) -> torch.dtype:
    """Batches in the compute dtype on GPU (half the host→device traffic), fp32 on CPU."""
    return model.compute_dtype if model.device.type == "cuda" else torch.float32


# ---------------------------------------------------------------------------------------------- outputs


def save_teacher_checkpoint(model: SSLMetaArch, output_dir: str | os.PathLike, name: str) -> Path:
    """``D/eval/<name>/teacher_checkpoint.pth`` = ``{"teacher": teacher.state_dict()}`` (release format).

    Collective with FSDP: every rank takes part in gathering the teacher, rank 0 writes.
    """
    path = fsdp.export_teacher(model, Path(output_dir) / "eval" / name / "teacher_checkpoint.pth")
    logger.info(f"Saved teacher checkpoint {path}")
    return path


def _truncate_metrics(path: Path, start_iter: int) -> None:
    """Keep the JSON lines of iterations before ``start_iter`` (drops a line cut by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iteration", start_iter) < start_iter:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _loader_seed(seed: int, rank: int, start_iter: int) -> int:
    """Seed drawn into the DataLoader's worker seeds: distinct per rank and per (re)start."""
    return zlib.crc32(f"{seed}:{rank}:{start_iter}".encode())


def fix_random_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- the loop


def build_checkpointer(
    cfg: DictConfig, model: SSLMetaArch, optimizer: torch.optim.Optimizer | None = None
) -> Checkpointer | ShardedCheckpointer:
    """The checkpointer of ``train.checkpoint_format`` in ``train.output_dir`` (model, optimizer, grad scaler).

    Either reads both formats' checkpoints of the directory, where it can: DCP also loads the full-state
    files of earlier runs.
    """
    states = {"model": fsdp.ModelCheckpointState(model)}
    if optimizer is not None:
        states.update(optimizer=fsdp.OptimizerCheckpointState(model, optimizer), grad_scaler=model.fp16_scaler)
    keep = cfg.train.checkpoint_keep_last
    full = Checkpointer(cfg.train.output_dir, max_to_keep=keep, **states)
    if cfg.train.checkpoint_format == "full":
        return full
    scaler = model.fp16_scaler if optimizer is not None else None
    return ShardedCheckpointer(
        cfg.train.output_dir,
        model,
        optimizer,
        scaler,
        max_to_keep=keep,
        async_save=cfg.train.checkpoint_async,
        full_checkpointer=full,
    )


def checkpoint_period(cfg: DictConfig) -> int:
    """``train.checkpoint_period_iterations``, or ``OFFICIAL_EPOCH_LENGTH`` when null (the official cadence)."""
    period = cfg.train.checkpoint_period_iterations
    period = cfg.train.OFFICIAL_EPOCH_LENGTH if period is None else period
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"train.checkpoint_period_iterations must be null or an integer >= 1, got {period!r}")
    return period


def _initial_state(
    cfg: DictConfig, model: SSLMetaArch, checkpointer: Checkpointer | ShardedCheckpointer, resume: bool
) -> dict[str, Any]:
    """Where training starts: a checkpoint of D, else ``MODEL.WEIGHTS``, else scratch / pretrained backbone."""
    if resume and list_checkpoints(checkpointer.save_dir):
        state = checkpointer.resume()
        start_iter = state["iteration"] + 1
        advance = state.get("sampler_advance", start_iter * cfg.train.batch_size_per_gpu)
        # per-rank count: the saved ranks consumed advance × saved world size samples, now shared by this world
        advance = advance * state.get("world_size", 1) // distributed.get_world_size()
        return {**state, "start_iter": start_iter, "sampler_advance": advance}
    if not resume and distributed.is_main_process():
        for _, stale in list_checkpoints(checkpointer.save_dir):
            logger.warning(f"--no-resume: removing {stale} of an earlier run")
            remove_checkpoint(stale)
    high_res = cfg.train.high_resolution_finetune
    if cfg.MODEL.WEIGHTS:
        # memory-mapped: the ranks of a node share the file's pages instead of each holding a copy
        weights = torch.load(cfg.MODEL.WEIGHTS, map_location="cpu", weights_only=True, mmap=True)
        if "model" not in weights:
            raise KeyError(f"MODEL.WEIGHTS={cfg.MODEL.WEIGHTS} is not a training checkpoint (no 'model' entry)")
        fsdp.load_full_state_dict(model, weights["model"])
        start_iter = 0 if high_res else int(weights.get("iteration", -1)) + 1
        logger.info(f"Loaded model weights from {cfg.MODEL.WEIGHTS}, starting at iteration {start_iter}")
        return {"start_iter": start_iter, "sampler_advance": start_iter * cfg.train.batch_size_per_gpu, "rng": None}
    if high_res and not cfg.student.pretrained_weights:
        raise ValueError("train.high_resolution_finetune=true needs student.pretrained_weights (or MODEL.WEIGHTS)")
    if high_res:
        logger.info(f"High-resolution fine-tuning from {cfg.student.pretrained_weights}: new optimizer, iteration 0")
    return {"start_iter": 0, "sampler_advance": 0, "rng": None}


def log_parameter_counts(model: nn.Module) -> str:
    """fvcore's parameter-count table of ``model`` (modules to depth 2: student/teacher backbone and heads), logged
    once as one block; returns the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # importing fvcore.nn runs the deprecated torch.jit.script
        from fvcore.nn import parameter_count_table
    table = parameter_count_table(model, max_depth=2)
    logger.info("parameters:\n%s", table)
    return table


def do_train(
    cfg: DictConfig,
    model: SSLMetaArch,
    resume: bool = True,
    log_period: int = 10,
    stopper: PreemptionHandler | None = None,
) -> dict[str, float]:
    """Train ``model`` until ``optim.epochs · OFFICIAL_EPOCH_LENGTH`` iterations; return the mean metrics.

    With an installed ``stopper``, a stop signal ends the run after the current iteration with a checkpoint
    and raises :class:`TrainingPreempted`.
    """
    model.train()
    output_dir = Path(cfg.train.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    optimizer = build_optimizer(cfg, model.get_params_groups(), model.fp16_scaler)
    lr_schedule, wd_schedule, momentum_schedule, teacher_temp_schedule, last_layer_lr_schedule = build_schedulers(cfg)
    epoch_length = cfg.train.OFFICIAL_EPOCH_LENGTH
    max_iter = cfg.optim.epochs * epoch_length
    save_period = checkpoint_period(cfg)
    eval_period = cfg.evaluation.eval_period_iterations
    batch_size = cfg.train.batch_size_per_gpu

    checkpointer = build_checkpointer(cfg, model, optimizer)
    state = _initial_state(cfg, model, checkpointer, resume)
    start_iter = state["start_iter"]
    graphed_step = None
    if cfg.train.cuda_graph:  # after the restore: it takes over the optimizer's lr and weight decay
        graphed_step = StaticTrainingStep(model, optimizer, cfg.optim.clip_grad, capture=True)
    logger.info(f"Starting training at iteration {start_iter} of {max_iter}")
    if distributed.is_main_process():
        log_parameter_counts(model)
    metrics_path = output_dir / METRICS_FILE
    if distributed.is_main_process():
        _truncate_metrics(metrics_path, start_iter)

    data_loader = build_data_loader(cfg, sampler_advance=state["sampler_advance"], input_dtype=_input_dtype(model))
    torch.manual_seed(_loader_seed(cfg.train.seed, distributed.get_rank(), start_iter))
    batches = iter(data_loader)  # draws the worker seeds from torch's generator: before the RNG restore
    if state.get("rng") is not None:
        restore_rng_state(state["rng"])

    batch_augmentation = build_batch_augmentation(cfg)
    metric_logger = MetricLogger(output_file=str(metrics_path), tensorboard_dir=str(output_dir / "tensorboard"))
    iteration = start_iter
    stop: TrainingPreempted | None = None
    for batch in metric_logger.log_every(
        batches,
        log_period,
        "Training",
        n_iterations=max_iter,
        start_iteration=start_iter,
        dump_freq=log_period,
        samples_per_iteration=batch_size * distributed.get_world_size(),
    ):
        if stop is not None:  # log_every has now written the metrics of the last iteration
            metric_logger.close()
            raise stop
        lr, wd = lr_schedule[iteration], wd_schedule[iteration]
        mom, teacher_temp = momentum_schedule[iteration], teacher_temp_schedule[iteration]
        last_layer_lr = last_layer_lr_schedule[iteration]
        if batch_augmentation is not None:
            batch = render_crops(batch, batch_augmentation, model.device, _input_dtype(model))

        if graphed_step is not None:
            losses = graphed_step(
                batch,
                iteration=iteration,
                lr=lr,
                wd=wd,
                momentum=mom,
                teacher_temp=teacher_temp,
                last_layer_lr=last_layer_lr,
            )
        else:
            apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)
            losses = training_step(
                model,
                optimizer,
                batch,
                iteration=iteration,
                teacher_temp=teacher_temp,
                momentum=mom,
                clip_grad=cfg.optim.clip_grad,
            )

        metric_logger.update(lr=lr, wd=wd, mom=mom, teacher_temp=teacher_temp, last_layer_lr=last_layer_lr)
        metric_logger.update(current_batch_size=batch["collated_global_crops"].shape[0] // 2)
        metric_logger.update(total_loss=sum(losses.values()), **losses)

        done = iteration + 1
        if eval_period > 0 and done % eval_period == 0:
            save_teacher_checkpoint(model, output_dir, f"training_{iteration}")
        advance = state["sampler_advance"] + (done - start_iter) * batch_size
        saved = done % save_period == 0 or done == max_iter
        if saved:
            checkpointer.save(iteration, sampler_advance=advance)
        if stopper is not None and done < max_iter and stopper.should_stop(iteration):
            if not saved:
                checkpointer.save(iteration, sampler_advance=advance)
            checkpointer.wait()
            stop = TrainingPreempted(stopper.received, iteration)
        iteration = done

    checkpointer.wait()
    metric_logger.synchronize_between_processes()
    metric_logger.close()
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


# ---------------------------------------------------------------------------------------------- entry point


def set_cpu_threads(num_workers: int) -> int:
    """Leave one core to each DataLoader worker: ``torch`` threads = cores of this process − workers (≥ 1).

    On a small CPU machine, compute threads that share cores with augmenting workers spin at every
    parallel region (measured 10+ s/it instead of 0.6 s/it for ``cpu_tiny`` on 2 cores). An explicit
    ``OMP_NUM_THREADS`` wins. Returns the thread count in use.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, distributed.get_local_size()) - num_workers))
    logger.info("CPU training with %d torch threads and %d data workers", torch.get_num_threads(), num_workers)
    return torch.get_num_threads()


def setup(args: argparse.Namespace) -> DictConfig:
    """Merged + validated config, process group on ``train.device`` (timeout ``train.dist_timeout_minutes``),
    logging to ``D/log.txt``, seeds, lr scaling, ``D/config.yaml``."""
    cfg = get_cfg_from_args(args)
    if cfg.train.dist_timeout_minutes <= 0:
        raise ValueError(f"train.dist_timeout_minutes must be positive, got {cfg.train.dist_timeout_minutes}")
    timeout = timedelta(minutes=cfg.train.dist_timeout_minutes)
    distributed.enable(overwrite=True, device=cfg.train.device, timeout=timeout)
    setup_logging(cfg.train.output_dir, level=logging.INFO)
    fix_random_seeds(cfg.train.seed + distributed.get_rank())
    apply_scaling_rules_to_cfg(cfg, distributed.get_world_size())
    if distributed.is_main_process():
        write_config(cfg, cfg.train.output_dir)
    logger.info("command line: %s", " ".join(sys.argv))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.log_period < 1:
        parser.error(f"--log-period must be >= 1, got {args.log_period}")
    try:
        cfg = setup(args)
        device = distributed.get_device()
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            torch.use_deterministic_algorithms(True, warn_only=True)
            set_cpu_threads(cfg.train.num_workers)
        model = SSLMetaArch(cfg).to(device)
        model.prepare_for_distributed_training()
        if args.eval_only:
            state = build_checkpointer(cfg, model).resume()
            if state is None:
                raise FileNotFoundError(f"--eval-only: no checkpoint in {cfg.train.output_dir}")
            save_teacher_checkpoint(model, cfg.train.output_dir, f"manual_{state['iteration']}")
            return 0
        with PreemptionHandler(period=cfg.train.preemption_check_period, device=model.device) as stopper:
            do_train(cfg, model, resume=not args.no_resume, log_period=args.log_period, stopper=stopper)
        return 0
    except NonFiniteLossError as error:
        logger.error(str(error))
        return 1
    except TrainingPreempted as stop:
        logger.warning(str(stop))
        return REQUEUE_EXIT_CODE
    except (ValueError, KeyError, FileNotFoundError) as error:  # bad config, dataset, checkpoint: one line
        logger.error(f"error: {error.args[0] if error.args else error}")
        return 2
    finally:
        distributed.disable()


if __name__ == "__main__":
    sys.exit(main())
