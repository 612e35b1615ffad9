"""Training metrics: smoothed meters, console progress with ETA, JSON lines, optional TensorBoard.

``MetricLogger.log_every`` wraps the data loader. For iteration ``i`` it measures
``data_time`` (waiting for the batch) and ``iter_time`` (batch wait + the loop body), then, on the
main process only, appends one JSON object per logged iteration to ``output_file``::

    {"iteration": i, "iter_time": s, "data_time": s, "img_per_s": n, "max_mem_mb": m, <meter>: value, ...}

Meters hold the values passed to ``update`` at that iteration (not window medians), so the file is an
exact per-iteration record; the console line shows window medians and global averages.
"""

from __future__ import annotations

import datetime
import json
import logging
import resource
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

import franca.distributed as distributed

logger = logging.getLogger("franca")


class SmoothedValue:
    """A series of floats with a sliding window (median, avg) and the global average over all updates."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, num: int = 1) -> None:
        self.deque.append(float(value))
        self.count += num
        self.total += float(value) * num

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over ranks (the window stays local)."""
        if not distributed.is_enabled():
            return
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque), dtype=torch.float64).median().item())

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque)

    @property
    def value(self) -> float:
        return self.deque[-1]

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


def max_memory_mb() -> float:
    """Peak CUDA memory allocated by this process, or its peak resident memory on CPU (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _open_tensorboard(log_dir: str) -> Any | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard is not installed: metrics go to the JSON-lines file only")
        return None
    return SummaryWriter(log_dir=log_dir)


class MetricLogger:
    """Named ``SmoothedValue`` meters, written as JSON lines (main process) and printed with an ETA.

    Args:
        delimiter: separator of the console fields.
        output_file: JSON-lines file appended to (None: no file).
        tensorboard_dir: when set and TensorBoard is installed, every dumped value is also a scalar there.
    """

    def __init__(
        self, delimiter: str = "  ", output_file: str | None = None, tensorboard_dir: str | None = None
    ) -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.output_file = output_file
        self._tensorboard = (
            _open_tensorboard(tensorboard_dir) if tensorboard_dir and distributed.is_main_process() else None
        )

    def update(self, **values: float | int | torch.Tensor) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            if not isinstance(value, (int, float)):
                raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
            self.meters[name].update(value)

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def dump(self, iteration: int, **timings: float) -> None:
        """Append ``{"iteration": iteration, **timings, <meter>: latest value}`` (main process only)."""
        if not distributed.is_main_process():
            return
        record: dict[str, float | int] = {"iteration": iteration, **timings}
        record.update({name: meter.value for name, meter in self.meters.items() if meter.count})
        if self.output_file is not None:
            with open(self.output_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "iteration":
                    self._tensorboard.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def log_every(
        self,
        iterable: Iterable[Any],
        print_freq: int,
        header: str = "",
        n_iterations: int | None = None,
        start_iteration: int = 0,
        dump_freq: int = 1,
        samples_per_iteration: int | None = None,
    ) -> Iterator[Any]:
        """Yield the items of ``iterable`` for iterations ``start_iteration … n_iterations-1``.

        Each iteration is dumped when ``i % dump_freq == 0`` and printed when ``i % print_freq == 0``
        (and both at the last one). ``img_per_s = samples_per_iteration / iter_time`` when given.
        ETA = mean iteration time × remaining iterations.
        """
        n_iterations = len(iterable) if n_iterations is None else n_iterations  # type: ignore[arg-type]
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(n_iterations))
        i = start_iteration
        if i >= n_iterations:
            return
        start = end = time.perf_counter()
        for item in iterable:
            data_time.update(time.perf_counter() - end)
            yield item
            iter_time.update(time.perf_counter() - end)
            last = i == n_iterations - 1
            if i % dump_freq == 0 or last:
                timings = {"iter_time": iter_time.value, "data_time": data_time.value, "max_mem_mb": max_memory_mb()}
                if samples_per_iteration is not None:
                    timings["img_per_s"] = samples_per_iteration / iter_time.value
                self.dump(i, **timings)
            if i % print_freq == 0 or last:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n_iterations - i - 1)))
                fields = [
                    header,
                    f"[{i:{width}d}/{n_iterations}]",
                    f"eta: {eta}",
                    str(self),
                    f"time: {iter_time}",
                    f"data: {data_time}",
                    f"max mem: {max_memory_mb():.0f}",
                ]
                logger.info(self.delimiter.join(field for field in fields if field))
            i += 1
            end = time.perf_counter()
            if i >= n_iterations:
                break
        total = time.perf_counter() - start
        done = max(i - start_iteration, 1)
        logger.info(f"{header} total time: {datetime.timedelta(seconds=int(total))} ({total / done:.4f} s / it)")
