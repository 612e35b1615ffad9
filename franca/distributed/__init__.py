"""Process-group initialisation for torchrun, SLURM (srun / submitit) and a single local process.

``enable()`` works out ``(rank, world_size, local_rank, local_world_size, master address/port)`` from
the environment, exports the ``env://`` variables PyTorch expects and initialises the default process
group: NCCL on the selected GPU, gloo on the CPU (see below). The sources, in order of precedence:

1. torchrun: all of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
   ``MASTER_PORT`` are set (a partial set is an error naming the missing variables);
2. SLURM task (srun, submitit): ``SLURM_JOB_ID``, ``SLURM_PROCID`` and ``SLURM_NTASKS`` are set; the
   master is the first host of ``SLURM_JOB_NODELIST`` and the port is derived from the job id, so every
   task agrees without talking to the others;
3. otherwise one local process (rank 0 of 1) on a free port.

The device (``device="auto"|"cuda"|"cpu"``, ``auto`` deferring to the ``FRANCA_DEVICE`` environment variable)
is chosen by :func:`select_device` before the group exists: a launch that asks for GPUs (NCCL backend,
``SLURM_GPUS*`` / ``CUDA_VISIBLE_DEVICES`` set, several local ranks) on a machine where
``torch.cuda.is_available()`` is false stops with one line naming the likely cause instead of training
silently on the CPU. Rank ``r`` on a machine with ``n`` GPUs uses GPU ``r % n``, and the NCCL group is
bound to it (``init_process_group(device_id=...)``).

After ``enable()`` only rank 0 prints (``print(..., force=True)`` overrides); ``franca.logging`` only
writes files and console output on rank 0 as well.
"""

from __future__ import annotations

import builtins
import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEVICES = ("auto", "cuda", "cpu")
DEVICE_ENV_VAR = "FRANCA_DEVICE"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_SLURM_PORT_RANGE = (20_000, 60_000)

_local_rank = -1
_local_world_size = -1
_device = torch.device("cpu")
_builtin_print = builtins.print


@dataclass(frozen=True)
class DistributedEnvironment:
    """Where this process sits in the job; ``source`` is ``"torchrun"``, ``"slurm"`` or ``"local"``."""

    source: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    def env_vars(self) -> dict[str, str]:
        """The variables of PyTorch's ``env://`` initialisation method."""
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }


def is_enabled() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if is_enabled() else 1


def get_local_rank() -> int:
    """Rank of this process on its machine (0 without a process group)."""
    return _local_rank if is_enabled() and _local_rank >= 0 else 0


def get_local_size() -> int:
    """Number of processes on this machine (1 without a process group)."""
    return _local_world_size if is_enabled() and _local_world_size > 0 else 1


# The DINOv2 spellings, kept so code written against it keeps working.
get_global_rank = get_rank
get_global_size = get_world_size


def is_main_process() -> bool:
    """True on global rank 0: the one process that prints and writes files."""
    return get_rank() == 0


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list, e.g. ``"gpu[01-03,07],cpu4"`` → ``[gpu01, gpu02, gpu03, gpu07, cpu4]``.

    Zero padding of ranges is kept (``[08-10]`` → ``08, 09, 10``).
    """
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" not in part:
                hosts.append(prefix + part)
                continue
            first, last = part.split("-", 1)
            hosts.extend(f"{prefix}{i:0{len(first)}d}" for i in range(int(first), int(last) + 1))
    return hosts


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_ranks(env: DistributedEnvironment) -> DistributedEnvironment:
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"{env.source}: rank {env.rank} is outside world size {env.world_size}")
    if not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(
            f"{env.source}: local rank {env.local_rank} is outside local world size {env.local_world_size}"
        )
    return env


def _from_torchrun() -> DistributedEnvironment:
    return DistributedEnvironment(
        source="torchrun",
        rank=_env_int("RANK"),
        world_size=_env_int("WORLD_SIZE"),
        local_rank=_env_int("LOCAL_RANK"),
        local_world_size=_env_int("LOCAL_WORLD_SIZE"),
        master_addr=os.environ["MASTER_ADDR"],
        master_port=_env_int("MASTER_PORT"),
    )


def _from_slurm() -> DistributedEnvironment:
    world_size = _env_int("SLURM_NTASKS")
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise KeyError("SLURM environment without SLURM_JOB_NODELIST: cannot find the master node")
    hosts = parse_slurm_nodelist(nodelist)
    num_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or len(hosts))
    if "MASTER_PORT" in os.environ:
        port = _env_int("MASTER_PORT")
    else:
        port = random.Random(_env_int("SLURM_JOB_ID")).randint(*_SLURM_PORT_RANGE)
    return DistributedEnvironment(
        source="slurm",
        rank=_env_int("SLURM_PROCID"),
        world_size=world_size,
        local_rank=_env_int("SLURM_LOCALID") if "SLURM_LOCALID" in os.environ else 0,
        local_world_size=max(1, world_size // max(1, num_nodes)),
        master_addr=hosts[0],
        master_port=port,
    )


def _local() -> DistributedEnvironment:
    return DistributedEnvironment("local", 0, 1, 0, 1, "127.0.0.1", _free_port())


def detect_environment() -> DistributedEnvironment:
    """Read the launcher's variables (torchrun, then SLURM, then one local process)."""
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if len(present) == len(_TORCHRUN_VARS):
        return _check_ranks(_from_torchrun())
    if {"RANK", "WORLD_SIZE"} & set(present):
        missing = ", ".join(name for name in _TORCHRUN_VARS if name not in os.environ)
        raise KeyError(f"partial torchrun environment: {missing} not set")
    if all(name in os.environ for name in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")):
        return _check_ranks(_from_slurm())
    return _local()


def gpu_request_reasons(env: DistributedEnvironment, backend: str | None = None) -> list[str]:
    """What in this launch asks for GPUs: an NCCL backend, SLURM GPU variables, ``CUDA_VISIBLE_DEVICES``,
    several local ranks (``SLURM_GPUS*=0`` and an empty or ``-1`` ``CUDA_VISIBLE_DEVICES`` are not requests)."""
    reasons = [f"backend={backend}"] if backend == "nccl" else []
    reasons += [
        f"{name}={value}"
        for name, value in sorted(os.environ.items())
        if name.startswith("SLURM_GPUS") and value.strip() not in ("", "0")
    ]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "-1":
        reasons.append(f"CUDA_VISIBLE_DEVICES={visible}")
    if env.local_world_size > 1:
        reasons.append(f"{env.local_world_size} local ranks")
    return reasons


def _no_cuda_cause() -> str:
    """The likely reason ``torch.cuda.is_available()`` is false, for the one-line error."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install the CUDA wheel, see README)"
    major = int(torch.version.cuda.split(".")[0])
    driver = "580" if major >= 13 else "525" if major == 12 else "450"
    return (
        f"torch {torch.__version__} was built for CUDA {torch.version.cuda}, which needs an NVIDIA driver >= {driver} "
        "(check nvidia-smi) and a visible GPU"
    )


def select_device(requested: str, env: DistributedEnvironment, backend: str | None = None) -> torch.device:
    """The device this process trains on: ``cuda:<local_rank % device_count>`` or ``cpu``.

    ``requested`` is ``auto`` (``FRANCA_DEVICE`` when set, else CUDA when available), ``cuda`` or ``cpu``.
    Raises ValueError when CUDA is asked for, or ``auto`` sees a GPU launch (:func:`gpu_request_reasons`),
    while ``torch.cuda.is_available()`` is false.
    """
    name = requested
    if name == "auto":
        name = os.environ.get(DEVICE_ENV_VAR, "auto") or "auto"
        where = f"{DEVICE_ENV_VAR}={name}"
    else:
        where = f"device={name}"
    if name not in DEVICES:
        raise ValueError(f"{where} is not one of {', '.join(DEVICES)}")
    if name == "cpu":
        if backend == "nccl":
            raise ValueError(f"{where} with backend=nccl: NCCL needs CUDA tensors, use gloo")
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    if name == "cuda":
        raise ValueError(f"{where} but CUDA is not available: {_no_cuda_cause()}")
    reasons = gpu_request_reasons(env, backend)
    if reasons:
        raise ValueError(
            f"this launch asks for GPUs ({', '.join(reasons)}) but CUDA is not available: {_no_cuda_cause()}; "
            f"set train.device=cpu or {DEVICE_ENV_VAR}=cpu to run on the CPU"
        )
    return torch.device("cpu")


def get_device() -> torch.device:
    """The device chosen by :func:`enable` (the CPU without a process group)."""
    return _device if is_enabled() else torch.device("cpu")


def _print_on_main_process(*args, force: bool = False, **kwargs) -> None:
    if force or is_main_process():
        _builtin_print(*args, **kwargs)


def enable(
    *,
    overwrite: bool = True,
    set_cuda_current_device: bool = True,
    backend: str | None = None,
    timeout: timedelta | None = None,
    device: str = "auto",
) -> DistributedEnvironment:
    """Initialise the default process group from the launcher's environment.

    Args:
        overwrite: replace ``env://`` variables already set to other values (else that is an error).
        set_cuda_current_device: make GPU ``local_rank % device_count()`` current and bind the group to it.
        backend: ``"nccl"`` / ``"gloo"``; default NCCL on CUDA, gloo on CPU.
        timeout: collective timeout (PyTorch's default when None); size it for the longest checkpoint write.
        device: ``auto`` / ``cuda`` / ``cpu``, see :func:`select_device` (:func:`get_device` returns it).
    """
    global _local_rank, _local_world_size, _device
    if is_enabled():
        raise RuntimeError("franca.distributed.enable() was already called in this process")
    env = detect_environment()
    selected = select_device(device, env, backend)
    for key, value in env.env_vars().items():
        if not overwrite and os.environ.get(key, value) != value:
            raise ValueError(f"{key} is already set to {os.environ[key]!r}, not {value!r}; pass overwrite=True")
        os.environ[key] = value

    use_cuda = selected.type == "cuda"
    kwargs: dict = {"timeout": timeout} if timeout is not None else {}
    if use_cuda and set_cuda_current_device:
        torch.cuda.set_device(selected)
        kwargs["device_id"] = selected
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://", **kwargs)
    _local_rank, _local_world_size, _device = env.local_rank, env.local_world_size, selected
    builtins.print = _print_on_main_process
    return env


def disable() -> None:
    """Destroy the default process group and give ``print`` back to every rank."""
    global _local_rank, _local_world_size, _device
    if is_enabled():
        dist.destroy_process_group()
    _local_rank, _local_world_size, _device = -1, -1, torch.device("cpu")
    builtins.print = _builtin_print
