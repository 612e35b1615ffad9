"""Configuration loading: default ⊕ file ⊕ ``key=value`` overrides, validated.

Every key of a config file or an override must exist in the default config
(``franca/configs/ssl_default_config.yaml``) and carry a value of the default's type
(an int is accepted where a float is expected). Otherwise loading stops with one
:class:`ConfigError` line naming the key and the closest valid key. An empty mapping in the default
(``{}``) is open: it takes any keys (builder keyword arguments). :func:`merge_configs` is this one
merge/validation path for any default tree; RASA's post-training config (``rasa.train``) uses it too.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Container, Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from franca.configs import CONFIG_DIR, available_configs, config_path, franca_default_config

logger = logging.getLogger("franca")

SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256")

# Keys whose value must be one of a fixed set (checked after merging).
_CHOICES: dict[str, tuple[str, ...]] = {
    "train.centering": ("sinkhorn_knopp", "centering"),
    "train.checkpoint_format": ("full", "dcp"),
    "optim.scaling_rule": SCALING_RULES,
    "dino.mrl_projection": ("linear", "slice"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused", "identity"),
    "student.attn_backend": ("", "auto", "sdpa", "xformers", "math"),
    "train.device": ("auto", "cuda", "cpu"),
}
_PRECISIONS = ("fp32", "fp16", "bf16")


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a value of the wrong type."""


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, DictConfig)):
        return "a mapping"
    if isinstance(value, (list, tuple, ListConfig)):
        return "a list"
    return type(value).__name__


def _all_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict):
            paths += _all_paths(value, f"{path}.")
    return paths


def closest_key(path: str, default: dict | None = None) -> str | None:
    """The valid dotted key closest to ``path`` (difflib), or None when nothing is close."""
    default = _default_tree() if default is None else default
    candidates = _all_paths(default)
    same_but_case = [c for c in candidates if c.lower() == path.lower()]
    if same_but_case:
        return same_but_case[0]
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A right name under the wrong section (`train.patch_size` -> `student.patch_size`).
    leaf = path.rsplit(".", 1)[-1]
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in candidates}
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[match[0]] if match else None


def _unknown_key_error(path: str, source: str, default: dict, label: str) -> ConfigError:
    suggestion = closest_key(path, default)
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return ConfigError(f"unknown {label} key '{path}' in {source}{hint}")


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_scalar(path: str, value: Any, expected: Any, source: str) -> Any:
    """Return ``value`` converted to the default's type, or raise ConfigError."""
    if _is_interpolation(value):
        return value
    if isinstance(expected, bool):
        ok = isinstance(value, bool)
    elif isinstance(expected, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(expected, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif isinstance(expected, str):
        if value is None:  # `key=` on the command line means an empty string
            value = ""
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(
            f"config key '{path}' in {source} must be {_type_name(expected)} "
            f"(like the default {expected!r}), got {_type_name(value)} {value!r}"
        )
    return value


def _check_node(
    user: Any, default: Any, path: str, source: str, root: dict, label: str, nullable: Container[str]
) -> Any:
    """Validate ``user`` against ``default`` recursively; return it with scalars converted."""
    if user is None and path in nullable:
        return None
    if isinstance(default, dict):
        if not isinstance(user, dict):
            raise ConfigError(f"config key '{path}' in {source} must be a mapping, got {_type_name(user)} {user!r}")
        if not default:
            return user
        checked = {}
        for key, value in user.items():
            key_path = f"{path}.{key}" if path else str(key)
            if key not in default:
                raise _unknown_key_error(key_path, source, root, label)
            checked[key] = _check_node(value, default[key], key_path, source, root, label, nullable)
        return checked
    if isinstance(default, list):
        if _is_interpolation(user):
            return user
        if not isinstance(user, list):
            raise ConfigError(f"config key '{path}' in {source} must be a list, got {_type_name(user)} {user!r}")
        if default:
            return [_check_scalar(f"{path}[{i}]", v, default[0], source) for i, v in enumerate(user)]
        return user
    if isinstance(user, (dict, list)):
        raise ConfigError(
            f"config key '{path}' in {source} must be {_type_name(default)} (like the default {default!r}), "
            f"got {_type_name(user)}"
        )
    if default is None:
        return user
    return _check_scalar(path, user, default, source)


def _default_tree() -> dict:
    return OmegaConf.to_container(franca_default_config, resolve=False)


def validate_config(
    cfg: DictConfig | dict,
    source: str,
    default: DictConfig | None = None,
    *,
    label: str = "config",
    nullable: Container[str] = (),
) -> DictConfig:
    """Check every key of ``cfg`` against ``default`` (the Franca default config); return it with ints promoted to floats.

    ``label`` names the config in errors (``unknown <label> key ...``); keys in ``nullable`` also accept ``null``.
    """
    root = _default_tree() if default is None else OmegaConf.to_container(default, resolve=False)
    user = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    return OmegaConf.create(_check_node(user, root, "", source, root, label, nullable))


def merge_configs(
    default: DictConfig,
    layers: Sequence[tuple[DictConfig, str]],
    *,
    label: str = "config",
    nullable: Container[str] = (),
) -> DictConfig:
    """``default`` ⊕ each ``(layer, source)`` in order, every layer validated against ``default`` first."""
    checked = []
    for layer, source in layers:
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{source} must hold a mapping of keys, got {_type_name(layer)}")
        checked.append(validate_config(layer, source, default, label=label, nullable=nullable))
    return OmegaConf.merge(OmegaConf.create(default), *checked)


def _check_choices(cfg: DictConfig) -> None:
    for path, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, path)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{path}' is {value!r}, must be one of {', '.join(choices)}{hint}")
    for role in ("student", "teacher"):
        for part, part_cfg in cfg.compute_precision[role].items():
            for key, value in part_cfg.mixed_precision.items():
                if value not in _PRECISIONS:
                    raise ConfigError(
                        f"config key 'compute_precision.{role}.{part}.mixed_precision.{key}' is {value!r}, "
                        f"must be one of {', '.join(_PRECISIONS)}"
                    )


def parse_overrides(overrides: Iterable[str]) -> DictConfig:
    """Turn ``["optim.base_lr=1e-3", ...]`` into a config (values parsed as YAML)."""
    parsed = OmegaConf.create()
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"command-line override '{item}' is not of the form key=value")
        parsed = OmegaConf.merge(parsed, OmegaConf.from_dotlist([item]))
    return parsed


def resolve_config_file(config_file: str | os.PathLike) -> Path:
    """A path to a YAML file, or the name of a shipped config (``train/IN21K/vitb14``)."""
    path = Path(config_file)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (str(config_file).removesuffix(".yaml") + ".yaml")
    if shipped.is_file():
        return shipped
    names = available_configs()
    close = difflib.get_close_matches(str(config_file), names, n=1, cutoff=0.4)
    hint = f"; did you mean the shipped config '{close[0]}'?" if close else f"; shipped configs: {', '.join(names)}"
    raise FileNotFoundError(f"config file '{config_file}' does not exist{hint}")


def load_config_file(config_file: str | os.PathLike | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Default config ⊕ ``config_file`` (optional) ⊕ ``key=value`` overrides, validated.

    Raises ConfigError (a ValueError) naming the first unknown key or mistyped value and the
    closest valid key, FileNotFoundError when the file is missing.
    """
    layers = []
    if config_file:
        path = resolve_config_file(config_file)
        layers.append((OmegaConf.load(path), f"config file '{path}'"))
    if overrides:
        layers.append((parse_overrides(overrides), "the command-line overrides"))
    cfg = merge_configs(franca_default_config, layers)
    _check_choices(cfg)
    return cfg


def load_and_merge_config(config_name: str) -> DictConfig:
    """Default config ⊕ the shipped config ``config_name`` (``train/IN21K/vitb14``), validated."""
    return load_config_file(config_path(config_name))


def get_cfg_from_args(args: Any) -> DictConfig:
    """Config from parsed CLI arguments: ``config_file``, ``opts`` (overrides) and ``output_dir``.

    ``train.output_dir`` is set to the absolute ``output_dir`` when one is given.
    """
    overrides = list(getattr(args, "opts", None) or [])
    output_dir = getattr(args, "output_dir", None)
    if output_dir:
        overrides.append(f"train.output_dir={os.path.abspath(output_dir)}")
    return load_config_file(getattr(args, "config_file", None), overrides)


def _current_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def scaled_lr(base_lr: float, scaling_rule: str, world_batch_size: int) -> float:
    """``sqrt_wrt_1024``: base_lr·sqrt(B/1024); ``linear_wrt_256``: base_lr·B/256 (B = world batch)."""
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(world_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return base_lr * world_batch_size / 256.0
    raise ConfigError(f"config key 'optim.scaling_rule' is {scaling_rule!r}, must be one of {', '.join(SCALING_RULES)}")


def apply_scaling_rules_to_cfg(cfg: DictConfig, world_size: int | None = None) -> DictConfig:
    """Set ``optim.lr`` from ``optim.base_lr`` for the world batch ``batch_size_per_gpu × world_size``.

    ``world_size`` defaults to the size of the initialised process group (1 without one).
    """
    world_size = _current_world_size() if world_size is None else world_size
    world_batch = cfg.train.batch_size_per_gpu * world_size
    cfg.optim.lr = scaled_lr(cfg.optim.base_lr, cfg.optim.scaling_rule, world_batch)
    logger.info(
        "%s lr scaling for world batch %d: base_lr %g -> lr %g",
        cfg.optim.scaling_rule,
        world_batch,
        cfg.optim.base_lr,
        cfg.optim.lr,
    )
    return cfg


def write_config(cfg: DictConfig, output_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the merged config to ``output_dir/name`` (created if needed); return the path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_name(path.name + ".tmp")
    OmegaConf.save(config=cfg, f=tmp)
    os.replace(tmp, path)
    return path
