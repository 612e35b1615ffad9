"""Per-iteration hyper-parameter schedules."""

from __future__ import annotations

import numpy as np


class CosineScheduler:
    """A value per iteration: ``freeze_iters`` zeros, a linear warm-up, then a cosine decay.

    For ``n = total_iters - warmup_iters - freeze_iters`` cosine steps ``i = 0..n-1``::

        value(i) = final + 0.5 * (base - final) * (1 + cos(pi * i / n))

    The warm-up goes linearly from ``start_warmup_value`` to ``base_value`` (both ends
    included, ``warmup_iters`` values). Indexing at or past ``total_iters`` gives
    ``final_value``. ``schedule`` is the numpy array of all values; it may be edited in place
    (e.g. zeroing the first iterations of the last-layer lr).
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError(
                f"schedule lengths must be >= 0, got total_iters={total_iters}, "
                f"warmup_iters={warmup_iters}, freeze_iters={freeze_iters}"
            )
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters ({total_iters})"
            )
        self.final_value = final_value
        self.total_iters = total_iters
        n_cosine = total_iters - warmup_iters - freeze_iters
        steps = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
        self.schedule = np.concatenate(
            (
                np.zeros(freeze_iters),
                np.linspace(start_warmup_value, base_value, warmup_iters),
                cosine,
            )
        )

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return float(self.final_value)
        return float(self.schedule[it])
