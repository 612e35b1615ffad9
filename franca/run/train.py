"""Launch Franca training through submitit, requeued on preemption or time-out.

``python -m franca.run.train --nodes N --ngpus G --partition P --timeout MIN --config-file F --output-dir D
[--cluster slurm|local|debug] [--qos Q --account A --comment C --exclude NODES] [key=value ...]``

Every task of the job runs ``franca.train.train.main`` with ``--config-file F --output-dir D key=value ...``.
When SLURM announces the end of the time limit or a preemption, submitit's signal (``SIGUSR2`` unless
``SUBMITIT_PREEMPT_SIGNAL`` says otherwise, 120 s ahead) reaches every task while the trainer runs: the
trainer's own handler takes it, the iteration finishes, the ranks agree, a checkpoint is written on every
rank's behalf and the trainer returns ``REQUEUE_EXIT_CODE``. Only then is submitit's handler called: on
rank 0 it asks :meth:`TrainJob.checkpoint` for the requeued submission and requeues the job, whose run
resumes from that checkpoint (the trainer's automatic resume), so no iteration is lost.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import submitit

from franca.run.submit import export_process_group_env, free_port, get_launcher_parser, make_executor, validate_args

logger = logging.getLogger("franca")


class TrainJob:
    """The picklable callable submitit runs in every task.

    Args:
        train_argv: arguments of ``python -m franca.train.train``.
        master_port: rendezvous port (local clusters pick a free one at submission); None on SLURM, where
            every task derives it from the job id.
    """

    def __init__(self, train_argv: Sequence[str], master_port: int | None = None) -> None:
        self.train_argv = list(train_argv)
        self.master_port = master_port

    def __call__(self) -> int:
        from franca.train.preemption import REQUEUE_EXIT_CODE
        from franca.train.train import main as train_main

        export_process_group_env(self.master_port)
        status = train_main(self.train_argv)
        if status == REQUEUE_EXIT_CODE:
            # saved on a stop signal: hand over to submitit (rank 0 requeues through checkpoint() and exits)
            preempt_signal = submitit.JobEnvironment._usr_sig()
            handler = signal.getsignal(preempt_signal)
            if callable(handler):
                handler(preempt_signal, None)
            return status
        if status != 0:
            raise RuntimeError(f"training exited with status {status} (see the task's log for the error line)")
        return status

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue: the same training, resuming from the checkpoint the trainer wrote on the signal.

        ``--no-resume`` is dropped (it would delete the checkpoints of this very run), and a local
        cluster picks a new port (the old one may still be in TIME_WAIT).
        """
        argv = [arg for arg in self.train_argv if arg != "--no-resume"]
        port = None if self.master_port is None else free_port()
        logger.info("franca.run: requeuing the training job, it resumes from the last checkpoint")
        return submitit.helpers.DelayedSubmission(type(self)(argv, port))


def get_args_parser() -> argparse.ArgumentParser:
    """Launcher options (:func:`franca.run.submit.get_launcher_parser`) plus the training arguments."""
    parser = get_launcher_parser("Franca training through submitit")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="training YAML or shipped config name")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="checkpoints, logs, metrics (shared fs)")
    parser.add_argument("--no-resume", action="store_true", help="first job starts from scratch (not on requeue)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value ...")
    return parser


def submit(args: argparse.Namespace) -> submitit.Job:
    """Submit the training described by parsed launcher ``args``; return the submitit job."""
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    train_argv = ["--config-file", args.config_file, "--output-dir", str(output_dir)]
    if args.no_resume:
        train_argv.append("--no-resume")
    train_argv += list(args.opts)
    executor = make_executor(args, output_dir / "submitit")
    port = free_port() if executor.cluster in ("local", "debug") else None
    job = executor.submit(TrainJob(train_argv, port))
    print(f"Submitted job {job.job_id} ({executor.cluster}); logs in {output_dir / 'submitit' / str(job.job_id)}")
    return job


def task_failures(job: submitit.Job) -> list[str]:
    """``"task <k>: <last line of its error>"`` for every failed task of a finished job."""
    failures = []
    for task_id in range(job.num_tasks):
        error = job.task(task_id).exception()
        if error is not None:
            # submitit's message: header, a dashed line, the task's traceback, a dashed line, the log paths
            sections = re.split(r"\n-{10,}\n", str(error))
            trace = sections[1] if len(sections) > 1 else sections[0]
            lines = [line.strip() for line in trace.splitlines() if line.strip()]
            failures.append(f"task {task_id}: {lines[-1] if lines else type(error).__name__}")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    job = submit(args)
    if not args.wait:
        return 0
    job.wait()
    failures = task_failures(job)
    if failures:
        print(f"job {job.job_id} failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
