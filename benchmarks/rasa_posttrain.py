"""RASA workloads: one post-training iteration, and the folded backbone vs backbone + separate head.

* ``rasa_pass``: one augmentation pass — the frozen ViT-S/14 encodes ``n_images`` 224² views (batch 32).
* ``rasa_fit_cached``: fitting one ``pos_pred`` on cached tokens (``max_epochs`` = 5 epochs, batch 32, AdamW).
* ``rasa_iteration_live`` = 5 passes + fit (the official loop, new views every epoch of every iteration);
  ``rasa_iteration_cached`` = fit + 5 passes / ``n_iterations`` (passes computed once, shared by 9 iterations).
* ``forward_folded`` vs ``forward_backbone_plus_head``: ``forward_features`` of the folded backbone against the
  plain backbone followed by a 9-layer ``RASAHead`` on ``x_norm_patchtokens``.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from benchmarks.common import median, peak_memory_mb, time_fn
from franca.models.vision_transformer import vit_small
from rasa.fold import fold
from rasa.src.rasa_head import RASAHead
from rasa.train import fit_pos_pred, patch_tokens

MAX_EPOCHS = 5
N_ITERATIONS = 9


def _vit_flops(model: torch.nn.Module, images: int, tokens: int) -> float:
    """Analytic forward FLOPs: 2·params·tokens for the linear layers plus 4·T²·D per attention layer."""
    dim, depth = model.embed_dim, model.n_blocks
    params = sum(p.numel() for p in model.blocks.parameters())
    return images * (2 * params * tokens + depth * 4 * tokens * tokens * dim)


def _row(workload: str, seconds: float, images: int, flops: float | None, **extra) -> dict:
    return {
        "workload": workload,
        "seconds": seconds,
        "img_per_s": images / seconds if images else None,
        "gflops": flops / seconds / 1e9 if flops else None,
        "peak_mem_mb": peak_memory_mb(),
        **extra,
    }


@torch.no_grad()
def _encode(model: torch.nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([patch_tokens(model, part) for part in images.split(batch)])


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    n_images, batch, repeats = (16, 8, 1) if quick else (200, 32, 1)
    model = vit_small(patch_size=14, img_size=224, init_values=1e-5, ffn_layer="mlp", block_chunks=0).eval()
    images = torch.randn(n_images, 3, 224, 224)
    tokens = 1 + (224 // 14) ** 2
    pass_s = median(time_fn(lambda: _encode(model, images, batch), warmup=0, repeats=repeats))
    cached = _encode(model, images, batch)
    rows = [_row("rasa_pass_vits14_224", pass_s, n_images, _vit_flops(model, n_images, tokens))]

    train_cfg = OmegaConf.create(
        {
            "optimizer": "adamw",
            "lr_heads": 2e-4,
            "final_lr": 0.0,
            "weight_decay": 0.0,
            "weight_decay_end": 0.0,
            "grad_norm_clipping": None,
            "max_epochs": MAX_EPOCHS,
        }
    )
    steps = n_images // batch

    def fit() -> None:
        head = RASAHead(model.embed_dim, 0)
        order = torch.arange(n_images)
        fit_pos_pred(
            head,
            lambda epoch: (cached[order[s * batch : (s + 1) * batch]] for s in range(steps)),
            steps,
            (16, 16),
            train_cfg,
            torch.device("cpu"),
        )

    fit_s = median(time_fn(fit, warmup=1, repeats=3))
    rows.append(_row("rasa_fit_cached_vits14_224", fit_s, n_images * MAX_EPOCHS, None, epochs=MAX_EPOCHS))
    rows.append(_row("rasa_iteration_live_vits14_224", MAX_EPOCHS * pass_s + fit_s, n_images, None, n_images=n_images))
    rows.append(
        _row(
            "rasa_iteration_cached_vits14_224",
            fit_s + MAX_EPOCHS * pass_s / N_ITERATIONS,
            n_images,
            None,
            n_images=n_images,
            n_iterations=N_ITERATIONS,
        )
    )

    head = RASAHead(model.embed_dim, N_ITERATIONS - 1)
    folded = fold(model, head)
    fwd_batch = images[: 2 if quick else 8]
    fwd_flops = _vit_flops(model, len(fwd_batch), tokens)
    with torch.no_grad():
        folded_s = median(time_fn(lambda: folded.forward_features(fwd_batch), warmup=1, repeats=3 if quick else 5))
        separate_s = median(
            time_fn(
                lambda: head(model.forward_features(fwd_batch)["x_norm_patchtokens"]),
                warmup=1,
                repeats=3 if quick else 5,
            )
        )
    rows.append(_row("forward_folded_vits14_224", folded_s, len(fwd_batch), fwd_flops))
    rows.append(_row("forward_backbone_plus_head_vits14_224", separate_s, len(fwd_batch), fwd_flops))
    return rows
