"""The Franca training step: student/teacher networks, teacher targets, DINO / iBOT / KoLeo losses.

One call of :meth:`SSLMetaArch.forward_backward` on a batch from ``collate_data_and_cast``:

1. teacher (no grad): backbone on the 2 global crops → class tokens (the two crops swapped,
   so student crop 1 is compared with teacher crop 2) and the masked patch tokens gathered
   by ``mask_indices_list`` into an ``upperbound``-row buffer → heads → targets, by
   Sinkhorn-Knopp (``train.centering: sinkhorn_knopp``) or softmax with an EMA centre;
2. student: one multi-crop backbone pass (global crops with the iBOT masks, local crops
   without) → heads on local class tokens, global class tokens and masked patch tokens;
3. losses, as in the official code, with ``T = 2·n_local + 2`` loss terms:

   * ``dino_local_crops_loss = DINO(local vs both teacher globals) / T``
   * ``dino_global_crops_loss = 2 · DINO(global vs swapped teacher globals) / T``
   * ``koleo = koleo_loss_weight · Σ_crop KoLeo(student class tokens of that global crop)``
   * ``ibot = iBOT(masked student patches vs teacher targets, masks_weight)``

   objective = ``dino.loss_weight · (local + global) + koleo + ibot.loss_weight · ibot``.
   The returned dict reports ``koleo / 2`` and ``ibot / 2`` under ``koleo_loss`` and
   ``ibot_loss`` (the official logged values, so logs compare with the released ones).

With ``dino.MRL`` every head returns one output per Matryoshka level and each loss sums over
levels; a plain DINO head is treated as a single level.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import Tensor, nn

from franca.data.multicrop import N_GLOBAL_CROPS
from franca.layers.dino_head import DINOHead
from franca.layers.mrl_dino_head import MRLDINOHead
from franca.loss import KoLeoLoss, MRLDINOLoss, MRLiBOTPatchLoss
from franca.loss.levels import as_levels
from franca.models import build_model_from_cfg
from franca.utils.param_groups import fuse_params_groups, get_params_groups_with_decay
from franca.utils.precision import PRECISION_DTYPES, device_dtype

logger = logging.getLogger("franca")


Levels = tuple[Tensor, ...]  # one tensor per Matryoshka level, smallest first (a plain head: one level)


def _split_levels(levels: Levels, sizes: list[int]) -> list[Levels]:
    """Split every level's rows by ``sizes``; returns one list of levels per chunk."""
    per_level = [torch.split(level, sizes) for level in levels]
    return [tuple(chunks[i] for chunks in per_level) for i in range(len(sizes))]


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """``t`` [M, ...] followed by zeros up to ``rows`` rows (``t`` itself when it has them already)."""
    return t if t.shape[0] >= rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _valid_rows(n_masked_patches: Tensor, rows: int, device: torch.device) -> Tensor:
    """[rows] bool, True for the first ``n_masked_patches`` rows (a device comparison: no host read)."""
    return torch.arange(rows, device=device) < n_masked_patches.reshape(-1)[:1]


def _gather_masked(patch_tokens: Tensor, mask_indices: Tensor, n_masked_patches: Tensor, upperbound: int) -> Tensor:
    """Rows ``mask_indices`` of ``patch_tokens.flatten(0, 1)``, [U, D] with U = max(``upperbound``, M): the rows past
    the first ``n_masked_patches`` are zeros, whatever index pads ``mask_indices`` (so the shape is the same at
    every step when the indices come padded to U, and the index-select backward adds zeros there)."""
    rows = max(upperbound, mask_indices.shape[0])
    gathered = torch.index_select(patch_tokens.flatten(0, 1), 0, _pad_rows(mask_indices, rows))
    return torch.where(_valid_rows(n_masked_patches, rows, gathered.device).unsqueeze(1), gathered, 0.0)


class StepOutputs(NamedTuple):
    """What :meth:`SSLMetaArch.forward_step` computed: the step's inputs on the device (:meth:`_move_batch`),
    the teacher targets, the student outputs, the objective to backpropagate and the logged loss terms."""

    inputs: dict[str, Any]
    teacher: dict[str, Any]
    student: dict[str, Any]
    objective: Tensor
    losses: dict[str, Tensor]


class SSLMetaArch(nn.Module):
    """Student and teacher (``backbone``, ``dino_head``, ``ibot_head`` when separate) and the Franca step."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_local_crops = int(cfg.crops.local_crops_number)
        self.mrl = bool(cfg.dino.MRL)
        self.centering = cfg.train.centering
        if self.centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"train.centering must be 'sinkhorn_knopp' or 'centering', got {self.centering!r}")
        self.dino_loss_weight = float(cfg.dino.loss_weight)
        self.koleo_loss_weight = float(cfg.dino.koleo_loss_weight)
        self.ibot_loss_weight = float(cfg.ibot.loss_weight)
        self.do_dino = self.dino_loss_weight > 0
        self.do_koleo = self.koleo_loss_weight > 0
        self.do_ibot = self.ibot_loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        self.sk_exclude_padding = bool(cfg.ibot.sk_exclude_padding)
        if self.do_ibot and (max(cfg.ibot.mask_ratio_min_max) <= 0 or cfg.ibot.mask_sample_probability <= 0):
            raise ValueError(
                "ibot.loss_weight > 0 needs a positive ibot.mask_ratio_min_max and ibot.mask_sample_probability"
            )

        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        self.embed_dim = embed_dim
        if cfg.student.pretrained_weights:
            from franca.hub.loading import load_backbone_weights

            logger.info("initialising the backbone from %s", cfg.student.pretrained_weights)
            load_backbone_weights(student_backbone, cfg.student.pretrained_weights)

        student = {"backbone": student_backbone, "dino_head": self._build_head(cfg.dino)}
        teacher = {"backbone": teacher_backbone, "dino_head": self._build_head(cfg.dino)}
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"] = self._build_head(cfg.ibot)
            teacher["ibot_head"] = self._build_head(cfg.ibot)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

        dino_head = self.student.dino_head
        ibot_head = self.student["ibot_head"] if "ibot_head" in self.student else dino_head
        dino_levels, ibot_levels = self._prototypes_per_level(dino_head), self._prototypes_per_level(ibot_head)
        self.dino_loss = MRLDINOLoss(dino_levels[-1], n_prototypes_per_level=dino_levels)
        self.ibot_patch_loss = MRLiBOTPatchLoss(ibot_levels[-1], n_prototypes_per_level=ibot_levels)
        self.koleo_loss = KoLeoLoss()

        precision = cfg.compute_precision.student.backbone.mixed_precision.param_dtype
        self.compute_dtype = PRECISION_DTYPES[precision]
        self.fp32_on_cpu = bool(cfg.compute_precision.fp32_on_cpu)
        # built by prepare_for_distributed_training(), once the model is on its device and sharded
        self.fp16_scaler: torch.amp.GradScaler | None = None
        logger.info(
            "SSLMetaArch: %s (embed_dim %d), %s heads, %s targets, iBOT head %s",
            cfg.student.arch,
            embed_dim,
            "Matryoshka" if self.mrl else "DINO",
            self.centering,
            "separate" if self.ibot_separate_head else "shared",
        )

    def _build_head(self, head_cfg: DictConfig) -> nn.Module:
        kwargs = dict(
            in_dim=self.embed_dim,
            out_dim=head_cfg.head_n_prototypes,
            nlayers=head_cfg.head_nlayers,
            hidden_dim=head_cfg.head_hidden_dim,
            bottleneck_dim=head_cfg.head_bottleneck_dim,
            init_std=head_cfg.head_init_std,
        )
        if not self.mrl:
            return DINOHead(**kwargs)
        d = self.embed_dim
        return MRLDINOHead(
            **kwargs,
            nesting_list=[d // 16, d // 8, d // 4, d // 2, d],
            projection=self.cfg.dino.mrl_projection,
        )

    def _prototypes_per_level(self, head: nn.Module) -> list[int]:
        """Prototype count of each output level of ``head`` (one level for a plain DINO head)."""
        return list(head.n_prototypes) if self.mrl else [head.last_layer.out_features]

    # ------------------------------------------------------------------ utilities

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("SSLMetaArch is trained through forward_backward(batch, teacher_temp)")

    def train(self, mode: bool = True) -> SSLMetaArch:
        """Train mode for the student; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _device_compute_dtype(self) -> torch.dtype:
        """``compute_precision.student.backbone`` dtype on this device (fp32 on CPU with ``fp32_on_cpu``)."""
        return device_dtype(self.compute_dtype, self.device.type, self.fp32_on_cpu)

    def _autocast(self):
        """Mixed-precision context: autocast to :meth:`_device_compute_dtype` unless it is fp32."""
        dtype = self._device_compute_dtype()
        if dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def _build_grad_scaler(self) -> torch.amp.GradScaler | None:
        """A grad scaler on this device when the student computes in fp16 (``compute_precision.grad_scaler``):
        FSDP's ``ShardedGradScaler`` with several ranks, so that an inf on one rank skips the step on all."""
        if not self.cfg.compute_precision.grad_scaler or self._device_compute_dtype() != torch.float16:
            return None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type)

    def _move_batch(self, batch: dict) -> dict:
        """The step's keyword arguments from a collated batch: tensors on the model's device, images in the
        parameters' dtype (names as in :meth:`get_teacher_output` / :meth:`get_student_output`).

        ``mask_indices_list`` and ``masks_weight`` come zero-padded from M to ``upperbound`` U rows (padding
        before the copy, on the batch's device): U depends only on the batch size and the masking ratios, so
        every tensor of the step has the same shape at every iteration. The padding rows gather zeros and
        weigh 0 in the iBOT loss; ``n_masked_patches`` (M, on the device) marks them."""
        device = self.device
        param_dtype = next(self.student.parameters()).dtype
        upperbound = int(batch["upperbound"])

        def move(key: str, **kwargs) -> Tensor:
            return batch[key].to(device, non_blocking=True, **kwargs)

        def move_padded(key: str) -> Tensor:
            return _pad_rows(batch[key], upperbound).to(device, non_blocking=True)

        return {
            "global_crops": move("collated_global_crops", dtype=param_dtype),  # [n_global_crops·B, 3, H, W]
            "local_crops": move("collated_local_crops", dtype=param_dtype),  # [n_local_crops·B, 3, h, w]
            "masks": move("collated_masks"),  # [n_global_crops·B, N] bool
            "mask_indices_list": move_padded("mask_indices_list"),  # [U] rows of the flattened patch tokens
            "masks_weight": move_padded("masks_weight"),  # [U], 0 past M
            "n_masked_patches": move("n_masked_patches"),  # [1] (= M, as a tensor)
            "upperbound": upperbound,  # U ≥ M
        }

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def get_teacher_output(
        self,
        *,
        global_crops: Tensor,
        mask_indices_list: Tensor,
        n_masked_patches: Tensor,
        upperbound: int,
        teacher_temp: float | Tensor,
    ) -> dict[str, Levels | None]:
        """Teacher targets per level, float32: ``dino`` [n_global_crops·B, K_j] (crops swapped) and ``ibot``
        [U, K_j] (None without iBOT): its first ``n_masked_patches`` rows are the masked patches' targets, the
        rest padding (zero-token rows: Sinkhorn-Knopp runs over them, as in the official code, unless
        ``ibot.sk_exclude_padding``, which leaves them out and gives them zero targets). ``teacher_temp`` may be
        a 0-d device tensor (a step without host values, :mod:`franca.train.static_step`)."""
        with self._autocast():
            out = self.teacher.backbone.forward_features(global_crops)
            cls_tokens = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)  # n_global_crops × [B, D]
            cls_tokens = torch.cat(cls_tokens[::-1])  # [n_global_crops·B, D], crop 2 first
            n_cls = cls_tokens.shape[0]
            masked_patches = None
            if self.do_ibot:
                masked_patches = _gather_masked(
                    out["x_norm_patchtokens"], mask_indices_list, n_masked_patches, upperbound
                )  # [U, D]
            if masked_patches is None:
                dino_logits, ibot_logits = as_levels(self.teacher.dino_head(cls_tokens)), None
            elif self.ibot_separate_head:
                dino_logits = as_levels(self.teacher.dino_head(cls_tokens))  # [n_global_crops·B, K_j]
                ibot_logits = as_levels(self.teacher.ibot_head(masked_patches))  # [U, K_j]
            else:
                both = as_levels(self.teacher.dino_head(torch.cat([cls_tokens, masked_patches])))
                dino_logits, ibot_logits = _split_levels(both, [n_cls, masked_patches.shape[0]])
        dino_logits = tuple(t.float() for t in dino_logits)
        ibot_targets = None
        real_rows = None
        if ibot_logits is not None:
            ibot_logits = tuple(t.float() for t in ibot_logits)
            real_rows = _valid_rows(n_masked_patches, ibot_logits[0].shape[0], ibot_logits[0].device)  # [U]

        if self.centering == "sinkhorn_knopp":
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(
                dino_logits, teacher_temp=teacher_temp, n_global_crops_teacher=N_GLOBAL_CROPS
            )
            if ibot_logits is not None:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    ibot_logits,
                    teacher_temp=teacher_temp,
                    n_masked_patches_tensor=n_masked_patches,
                    valid_rows=real_rows if self.sk_exclude_padding else None,
                )
        else:
            dino_targets = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp=teacher_temp)
            self.dino_loss.update_center(dino_logits)
            if ibot_logits is not None:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(ibot_logits, teacher_temp=teacher_temp)
                self.ibot_patch_loss.update_center(ibot_logits, rows=real_rows)
        return {"dino": tuple(dino_targets), "ibot": None if ibot_targets is None else tuple(ibot_targets)}

    def get_student_output(
        self,
        *,
        global_crops: Tensor,
        local_crops: Tensor,
        masks: Tensor,
        mask_indices_list: Tensor,
        n_masked_patches: Tensor,
        upperbound: int,
    ) -> dict[str, Levels | Tensor | None]:
        """Student head outputs per level, float32: ``local_cls`` [n_local_crops·B, K_j], ``global_cls``
        [n_global_crops·B, K_j], ``masked_patches`` [U, K_j] (rows past ``n_masked_patches`` are padding, which
        the iBOT loss weighs 0; None without iBOT); and ``global_cls_tokens``
        [n_global_crops·B, D] (the backbone's, for KoLeo)."""
        with self._autocast():
            if self.n_local_crops > 0:
                global_out, local_out = self.student.backbone.forward_features(
                    [global_crops, local_crops], masks=[masks, None]
                )
                head_inputs = [local_out["x_norm_clstoken"], global_out["x_norm_clstoken"]]
            else:
                global_out = self.student.backbone.forward_features(global_crops, masks=masks)
                head_inputs = [global_out["x_norm_clstoken"][:0], global_out["x_norm_clstoken"]]
            masked_patches = None
            if self.do_ibot:
                masked_patches = _gather_masked(
                    global_out["x_norm_patchtokens"], mask_indices_list, n_masked_patches, upperbound
                )
                if not self.ibot_separate_head:
                    head_inputs.append(masked_patches)  # [U, D]
            sizes = [x.shape[0] for x in head_inputs]
            chunks = _split_levels(as_levels(self.student.dino_head(torch.cat(head_inputs))), sizes)
            if masked_patches is not None and self.ibot_separate_head:
                chunks.append(as_levels(self.student.ibot_head(masked_patches)))  # [U, K_j]
        return {
            "local_cls": tuple(t.float() for t in chunks[0]),
            "global_cls": tuple(t.float() for t in chunks[1]),
            "masked_patches": None if masked_patches is None else tuple(t.float() for t in chunks[2]),
            "global_cls_tokens": global_out["x_norm_clstoken"].float(),
        }

    def compute_losses(
        self,
        *,
        teacher: dict[str, Levels | None],
        student: dict[str, Levels | Tensor | None],
        masks: Tensor,
        masks_weight: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective to back-propagate and the dict of logged loss terms (see the module docstring), from
        :meth:`get_teacher_output`, :meth:`get_student_output`, the iBOT masks [n_global_crops·B, N] and
        the per-row weights of the masked patches ([U] from :meth:`_move_batch`, 0 on padding rows, or [M])."""
        n_loss_terms = max(self.n_local_crops * N_GLOBAL_CROPS, 1) + N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1)
        objective = student["global_cls_tokens"].new_zeros(())
        losses: dict[str, Tensor] = {}
        if self.do_dino:
            if self.n_local_crops > 0:
                local = self.dino_loss(
                    student["local_cls"],
                    teacher["dino"],
                    n_crops=(self.n_local_crops, N_GLOBAL_CROPS),
                    teacher_global=False,
                )
                losses["dino_local_crops_loss"] = local / n_loss_terms
                objective = objective + self.dino_loss_weight * losses["dino_local_crops_loss"]
            glob = self.dino_loss(student["global_cls"], teacher["dino"], n_crops=N_GLOBAL_CROPS, teacher_global=True)
            losses["dino_global_crops_loss"] = glob * N_GLOBAL_CROPS / n_loss_terms
            objective = objective + self.dino_loss_weight * losses["dino_global_crops_loss"]
        if self.do_koleo:
            crops = student["global_cls_tokens"].chunk(N_GLOBAL_CROPS)  # n_global_crops × [B, D]
            koleo = self.koleo_loss_weight * sum(self.koleo_loss(c) for c in crops)
            losses["koleo_loss"] = koleo / N_GLOBAL_CROPS
            objective = objective + koleo
        if self.do_ibot:
            ibot = self.ibot_patch_loss(
                student["masked_patches"],
                teacher["ibot"],
                student_masks_flat=masks,
                n_masked_patches=masks_weight.shape[0],
                masks_weight=masks_weight,
            )
            losses["ibot_loss"] = ibot / N_GLOBAL_CROPS
            objective = objective + self.ibot_loss_weight * ibot
        return objective, losses

    def backprop_loss(self, loss: Tensor) -> None:
        """``loss.backward()``, through the grad scaler when there is one."""
        if self.fp16_scaler is not None:
            self.fp16_scaler.scale(loss).backward()
        else:
            loss.backward()

    def forward_backward(self, batch: dict, teacher_temp: float | Tensor) -> dict[str, Tensor]:
        """One step's losses on ``batch`` (output of ``collate_data_and_cast``); gradients land on the student.

        Returns the detached logged terms ``dino_local_crops_loss``, ``dino_global_crops_loss``,
        ``koleo_loss`` and ``ibot_loss`` (a term whose weight is 0 is left out).
        """
        step = self.forward_step(batch, teacher_temp=teacher_temp)
        self.backprop_loss(step.objective)
        return {name: value.detach() for name, value in step.losses.items()}

    def forward_step(self, batch: dict, teacher_temp: float | Tensor) -> StepOutputs:
        """The forward half of :meth:`forward_backward`: the batch on the device, the teacher targets, the
        student outputs, the weighted objective and the logged terms (not detached, nothing backpropagated)."""
        return self.forward_on_device(self._move_batch(batch), teacher_temp=teacher_temp)

    def forward_on_device(self, x: dict[str, Any], teacher_temp: float | Tensor) -> StepOutputs:
        """:meth:`forward_step` on inputs already on the device (the output of :meth:`_move_batch`)."""
        teacher = self.get_teacher_output(
            global_crops=x["global_crops"],
            mask_indices_list=x["mask_indices_list"],
            n_masked_patches=x["n_masked_patches"],
            upperbound=x["upperbound"],
            teacher_temp=teacher_temp,
        )
        student = self.get_student_output(
            global_crops=x["global_crops"],
            local_crops=x["local_crops"],
            masks=x["masks"],
            mask_indices_list=x["mask_indices_list"],
            n_masked_patches=x["n_masked_patches"],
            upperbound=x["upperbound"],
        )
        objective, losses = self.compute_losses(
            teacher=teacher, student=student, masks=x["masks"], masks_weight=x["masks_weight"]
        )
        return StepOutputs(inputs=x, teacher=teacher, student=student, objective=objective, losses=losses)

    # ------------------------------------------------------------------ teacher, optimizer, distribution

    def _paired_parameters(self) -> tuple[list[Tensor], list[Tensor]]:
        student_params: list[Tensor] = []
        teacher_params: list[Tensor] = []
        for key in self.student.keys():
            s, t = list(self.student[key].parameters()), list(self.teacher[key].parameters())
            if len(s) != len(t):
                raise RuntimeError(
                    f"student and teacher '{key}' have different parameter counts ({len(s)} vs {len(t)})"
                )
            student_params += s
            teacher_params += t
        return student_params, teacher_params

    @torch.no_grad()
    def update_teacher(self, momentum: float | Tensor) -> None:
        """EMA of every student parameter into the teacher: ``t ← m·t + (1 − m)·s``, in foreach passes over all
        parameters: one ``lerp(t, s, 1 − m)`` for a float m (``m = 0`` copies the student exactly, ``m = 1``
        keeps the teacher); for a 0-d device tensor m (read on the device, never on the host) ``t·m`` plus
        ``s·(1 − m)``."""
        student_params, teacher_params = self._paired_parameters()
        if not isinstance(momentum, Tensor):
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
            return
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1.0 - momentum))

    def get_params_groups(self) -> list[dict]:
        """AdamW parameter groups of the student (see :mod:`franca.utils.param_groups`)."""
        groups: list[dict] = []
        for module in self.student.values():
            groups += get_params_groups_with_decay(
                module,
                lr_decay_rate=self.cfg.optim.layerwise_decay,
                patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult,
            )
        fused = fuse_params_groups(groups)
        for group in fused:
            group["foreach"] = True
        return fused

    def compile_step(self) -> None:
        """``torch.compile`` the step's parts in place (names, checkpoints and FSDP units unchanged): every
        transformer block of both backbones, the heads, the loss forwards (DINO, iBOT, KoLeo) and the
        Sinkhorn-Knopp targets, so that the element-wise passes around the products fuse into few kernels.
        Blocks, heads and losses see the same shapes at every step (the iBOT rows padded to ``upperbound``)."""
        for net in (self.student, self.teacher):
            net.backbone.compile_blocks()
            for key in ("dino_head", "ibot_head"):
                if key in net:
                    net[key].compile(dynamic=False)
        for loss in (self.dino_loss, self.ibot_patch_loss, self.koleo_loss):
            loss.compile()
        for loss in (self.dino_loss, self.ibot_patch_loss):
            loss.sinkhorn_knopp_teacher = torch.compile(loss.sinkhorn_knopp_teacher)

    def prepare_for_distributed_training(self) -> None:
        """Copy the student into the teacher, build the fp16 grad scaler (``fp16_scaler``), compile
        (``train.compile``: see :meth:`compile_step`), then shard both when a process group with several ranks
        exists.

        In one process this only re-synchronises the teacher and builds the scaler. With several ranks the sharding
        is done by ``franca.fsdp.shard_ssl_meta_arch(self)``.
        """
        self.teacher.load_state_dict(self.student.state_dict())
        self.fp16_scaler = self._build_grad_scaler()
        if self.cfg.train.compile:
            self.compile_step()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        from franca import fsdp

        fsdp.shard_ssl_meta_arch(self)
