"""Submitting a job through submitit: command-line options, the executor, the process-group variables.

A job runs ``ngpus`` tasks on each of ``nodes`` machines (one task per GPU). Each task exports the
variables of PyTorch's ``env://`` initialisation (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) from ``submitit.JobEnvironment()``, so
``franca.distributed.enable()`` sees a torchrun-like environment on SLURM and on the local executor alike.

Clusters: ``slurm`` (sbatch through submitit), ``local`` (submitit's ``LocalExecutor``: the tasks are
processes of this machine, one node), ``debug`` (in this process, one task, for a debugger). Logs of job
``<id>`` go to ``<output-dir>/submitit/<id>/``.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
from pathlib import Path

import submitit

CLUSTERS = ("slurm", "local", "debug")
_PORT_RANGE = (20_000, 60_000)


def get_launcher_parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    """The launcher's own options (an entry point adds its arguments and ``key=value`` overrides)."""
    parser = argparse.ArgumentParser(description, add_help=add_help)
    parser.add_argument("--nodes", type=int, default=1, help="machines to use (default 1)")
    parser.add_argument("--ngpus", "--gpus", type=int, default=8, help="GPUs = tasks per machine (default 8)")
    parser.add_argument("--timeout", type=int, default=2800, help="minutes per job before requeue (default 2800)")
    parser.add_argument(
        "--partition",
        default=os.environ.get("FRANCA_SLURM_PARTITION", ""),
        help="SLURM partition (default $FRANCA_SLURM_PARTITION)",
    )
    parser.add_argument("--account", default=os.environ.get("FRANCA_SLURM_ACCOUNT", ""), help="SLURM account (-A)")
    parser.add_argument("--qos", default=os.environ.get("FRANCA_SLURM_QOS", ""), help="SLURM quality of service")
    parser.add_argument("--constraint", default="", help="SLURM node constraint (-C), e.g. h100")
    parser.add_argument("--comment", default="", help="SLURM job comment")
    parser.add_argument("--exclude", default="", help="SLURM nodes to exclude, e.g. node[01-03]")
    parser.add_argument("--cpus-per-task", type=int, default=12, help="CPU cores per task (default 12)")
    parser.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (default 40 per GPU)")
    parser.add_argument(
        "--cluster",
        choices=CLUSTERS,
        default=None,
        help="where to run (default: slurm when sbatch is available, else local)",
    )
    parser.add_argument("--job-name", default="franca", help="job name (default franca)")
    parser.add_argument("--wait", action="store_true", help="wait for the job to end; exit status 1 if it failed")
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible requests with one line (``parser.error`` exits with status 2)."""
    for name in ("nodes", "ngpus", "timeout", "cpus_per_task"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cluster in ("local", "debug") and args.nodes != 1:
        parser.error(f"--cluster {args.cluster} runs on this machine only: use --nodes 1, got {args.nodes}")
    if args.cluster == "debug" and args.ngpus != 1:
        parser.error(f"--cluster debug runs one task in this process: use --ngpus 1, got {args.ngpus}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_for_job(job_id: str) -> int:
    """A port every task of a SLURM job derives alike from the job id (no communication needed)."""
    return random.Random(job_id).randint(*_PORT_RANGE)


def export_process_group_env(master_port: int | None) -> dict[str, str]:
    """Set the ``env://`` variables of this task from ``submitit.JobEnvironment()``; return them.

    ``master_port`` None: derived from the job id (SLURM); the master is the job's first host. On the
    local executor every task runs here, so the master is 127.0.0.1.
    """
    job_env = submitit.JobEnvironment()
    local = job_env.cluster in ("local", "debug")
    n_nodes = max(1, job_env.num_nodes)
    variables = {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, job_env.num_tasks // n_nodes)),
        "MASTER_ADDR": "127.0.0.1" if local else job_env.hostnames[0],
        "MASTER_PORT": str(master_port if master_port is not None else port_for_job(job_env.raw_job_id)),
    }
    os.environ.update(variables)
    return variables


def make_executor(args: argparse.Namespace, log_dir: Path) -> submitit.Executor:
    """A submitit executor for ``args`` (see :func:`get_launcher_parser`) writing its logs under ``log_dir/%j``."""
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster=args.cluster, slurm_max_num_timeout=30)
    parameters = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=args.ngpus,
        gpus_per_node=args.ngpus,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout,
        mem_gb=args.mem_gb or 40 * args.ngpus,
        slurm_signal_delay_s=120,
        # one task that exits with an error ends the job instead of leaving the others blocked in a collective
        slurm_srun_args=["--kill-on-bad-exit=1"],
    )
    slurm = {
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_comment": args.comment,
        "slurm_exclude": args.exclude,
    }
    parameters.update({key: value for key, value in slurm.items() if value})
    executor.update_parameters(**parameters)
    return executor
