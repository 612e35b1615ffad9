"""Shipped YAML configurations.

``franca_default_config`` is the default configuration every run starts from; the training
configs under ``train/`` and ``finetune/`` only state what differs from it. This package only locates and reads
the files; merging and validation live in :mod:`franca.utils.config` (``load_and_merge_config``), which imports it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent


def available_configs() -> list[str]:
    """Names (``train/IN21K/vitb14``, ...) of every shipped config except the default."""
    return sorted(
        p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
        for p in CONFIG_DIR.rglob("*.yaml")
        if p.name != "ssl_default_config.yaml"
    )


def config_path(config_name: str) -> Path:
    """Path of the shipped config ``config_name`` (with or without ``.yaml``)."""
    path = CONFIG_DIR / (config_name.removesuffix(".yaml") + ".yaml")
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config named '{config_name}'; available: {', '.join(available_configs())}")
    return path


def load_config(config_name: str) -> DictConfig:
    """The shipped config ``config_name`` as written (not merged with the default)."""
    return OmegaConf.load(config_path(config_name))


franca_default_config: DictConfig = load_config("ssl_default_config")
