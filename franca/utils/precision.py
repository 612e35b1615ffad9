"""The precision names of the configs (``fp32`` / ``fp16`` / ``bf16``) and their torch dtypes.

On CPU the configured dtypes apply only when ``compute_precision.fp32_on_cpu`` is false (see
:func:`device_dtype`): by default a CPU run computes, shards and reduces in fp32.
"""

from __future__ import annotations

import torch

PRECISION_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(name: str, key: str = "precision") -> torch.dtype:
    """The dtype of precision ``name``; ``key`` names the config entry in the error for an unknown name."""
    if name not in PRECISION_DTYPES:
        raise ValueError(f"{key} is {name!r}, must be one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[name]


def device_dtype(dtype: torch.dtype, device_type: str, fp32_on_cpu: bool) -> torch.dtype:
    """``dtype`` on ``device_type``: fp32 on the CPU when ``fp32_on_cpu``, else ``dtype`` itself."""
    return torch.float32 if device_type == "cpu" and fp32_on_cpu else dtype
