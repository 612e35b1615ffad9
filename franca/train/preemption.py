"""Stop on a signal at an iteration boundary: SLURM's warning before preemption or time-out.

SLURM sends ``SIGUSR1`` (``#SBATCH --signal=B:USR1@300``, forwarded to the tasks by
``scripts/slurm/common.sh``) and ``SIGTERM`` on preemption; submitit sends its preemption signal
(``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) to every task. The handler only records the signal; the trainer polls :meth:`PreemptionHandler.should_stop`
after the EMA update of an iteration, writes a checkpoint on every rank's behalf and returns, so the
requeued job resumes exactly where this one stopped.

With several ranks the stop must be agreed by all of them (a rank that stops alone would leave the
others blocked in the next collective): ``should_stop`` all-reduces the local flag (MAX) once every
``period`` iterations — one 1-element collective and a host sync per check, outside the
forward/backward/step/EMA window. In one process it reads the flag at every iteration, for free.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch

import franca.distributed as distributed

logger = logging.getLogger("franca")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Exit status of a trainer stopped by a signal after its checkpoint: not done, rerun the command to resume.
REQUEUE_EXIT_CODE = 3


class TrainingPreempted(Exception):
    """Training stopped after iteration ``iteration`` because of ``signum`` (None: another rank's signal);
    its checkpoint is complete."""

    def __init__(self, signum: int | None, iteration: int) -> None:
        name = signal.Signals(signum).name if signum is not None else "another rank's stop signal"
        super().__init__(f"stopped by {name} after iteration {iteration}: checkpoint saved, the same command resumes")
        self.signum = signum
        self.iteration = iteration


class PreemptionHandler:
    """Record ``signals`` while installed (a context manager restoring the previous handlers on exit).

    Args:
        signals: the signals that ask for a checkpoint and a stop.
        period: iterations between the cross-rank agreements (>= 1; ignored in one process).
        device: where the flag tensor of the all-reduce lives (the process group's device).
    """

    def __init__(
        self, signals: Iterable[int] = STOP_SIGNALS, period: int = 1, device: torch.device | str = "cpu"
    ) -> None:
        if period < 1:
            raise ValueError(f"train.preemption_check_period must be >= 1, got {period}")
        self.signals = tuple(signals)
        self.period = period
        self.device = torch.device(device)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionHandler:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            logger.warning(f"received {signal.Signals(signum).name}: checkpoint after this iteration, then stop")
        self.received = signum

    def should_stop(self, iteration: int) -> bool:
        """True when some rank received a stop signal (collective every ``period`` iterations with several ranks)."""
        if not distributed.is_enabled() or distributed.get_world_size() == 1:
            return self.received is not None
        if (iteration + 1) % self.period:
            return False
        flag = torch.tensor([float(self.received is not None)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
