"""The tiny SSLMetaArch config of the step and FSDP tests: a 2-block, 64-wide ViT on 32/16-px crops with
128-prototype Matryoshka heads and a separate iBOT head."""

from __future__ import annotations

from omegaconf import DictConfig

import franca.models.vision_transformer as vits
from franca.utils.config import load_config_file

GLOBAL, LOCAL, PATCH, N_LOCAL = 32, 16, 8, 2


def vit_test_tiny(patch_size: int = PATCH, num_register_tokens: int = 0, **kwargs) -> vits.DinoVisionTransformer:
    """2 blocks, width 64: registered on ``franca.models.vision_transformer`` like a user architecture."""
    return vits.DinoVisionTransformer(
        patch_size=patch_size, embed_dim=64, depth=2, num_heads=2, num_register_tokens=num_register_tokens, **kwargs
    )


def tiny_ssl_cfg(batch: int, *overrides: str) -> DictConfig:
    """Register ``vit_test_tiny`` (spawned ranks call this too) and return the config with ``overrides``."""
    vits.vit_test_tiny = vit_test_tiny
    base = [
        "student.arch=vit_test_tiny",
        f"student.patch_size={PATCH}",
        "student.drop_path_rate=0.0",
        "student.layerscale=0.1",
        f"crops.global_crops_size={GLOBAL}",
        f"crops.local_crops_size={LOCAL}",
        f"crops.local_crops_number={N_LOCAL}",
        f"train.batch_size_per_gpu={batch}",
        "dino.head_n_prototypes=128",
        "dino.head_hidden_dim=64",
        "dino.head_bottleneck_dim=32",
        "ibot.head_n_prototypes=128",
        "ibot.head_hidden_dim=64",
        "ibot.head_bottleneck_dim=32",
        "ibot.separate_head=true",
        "ibot.mask_sample_probability=0.5",
    ]
    return load_config_file(None, base + list(overrides))
