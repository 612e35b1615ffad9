"""Rank-aware logging setup: rank 0 logs INFO to stdout and to ``<output>/log.txt``; other ranks only
report warnings and errors to stderr (so a failing rank is still heard) and write no files."""

from __future__ import annotations

import logging
import os
import sys

import franca.distributed as distributed
from franca.logging.helpers import MetricLogger, SmoothedValue, max_memory_mb

__all__ = ["MetricLogger", "SmoothedValue", "max_memory_mb", "setup_logging"]

_FORMAT = "%(levelname).1s%(asctime)s %(process)d %(name)s %(filename)s:%(lineno)d] %(message)s"
_DATE_FORMAT = "%Y%m%d %H:%M:%S"


def setup_logging(
    output: str | None = None, *, name: str = "franca", level: int = logging.INFO, capture_warnings: bool = True
) -> logging.Logger:
    """Configure logger ``name``; calling it again replaces the handlers it installed before.

    Args:
        output: a directory (the log goes to ``output/log.txt``) or a ``.txt`` / ``.log`` file name.
    """
    logging.captureWarnings(capture_warnings)
    log = logging.getLogger(name)
    log.setLevel(level)
    log.propagate = False
    for handler in [h for h in log.handlers if getattr(h, "_franca", False)]:
        log.removeHandler(handler)
        handler.close()

    formatter = logging.Formatter(_FORMAT, datefmt=_DATE_FORMAT)
    main = distributed.is_main_process()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout if main else sys.stderr)]
    handlers[0].setLevel(level if main else logging.WARNING)
    if output and main:
        filename = output if os.path.splitext(output)[1] in (".txt", ".log") else os.path.join(output, "log.txt")
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        handlers.append(logging.FileHandler(filename, mode="a"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._franca = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    return log
