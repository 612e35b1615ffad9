"""franca.train.preemption in one process (the multi-rank agreement runs in tests/test_train_resume.py) and
the checkpoint cadence."""

from __future__ import annotations

import os
import signal

import pytest

from franca.train.preemption import STOP_SIGNALS, PreemptionHandler, TrainingPreempted
from franca.train.train import checkpoint_period
from franca.utils.config import load_config_file


@pytest.mark.parametrize("signum", STOP_SIGNALS)
def test_signal_is_recorded_then_previous_handler_restored(signum):
    seen = []
    previous = signal.signal(signum, lambda s, f: seen.append(s))
    try:
        with PreemptionHandler() as stopper:
            assert not stopper.should_stop(0)
            os.kill(os.getpid(), signum)
            assert stopper.should_stop(1) and stopper.received == signum
        os.kill(os.getpid(), signum)  # the handler in place before is back
        assert seen == [signum]
    finally:
        signal.signal(signum, previous)
    message = str(TrainingPreempted(signum, 41))
    assert (
        message
        == f"stopped by {signal.Signals(signum).name} after iteration 41: checkpoint saved, the same command resumes"
    )


def test_bad_check_period():
    with pytest.raises(ValueError, match="train.preemption_check_period must be >= 1, got 0"):
        PreemptionHandler(period=0)


def test_checkpoint_cadence_is_the_official_epoch_by_default():
    cfg = load_config_file(None, ["train.OFFICIAL_EPOCH_LENGTH=7"])
    assert cfg.train.checkpoint_period_iterations is None and checkpoint_period(cfg) == 7
    assert load_config_file("train/IN21K/vitl14").train.saveckp_freq == 20  # kept, unused, as officially
    assert checkpoint_period(load_config_file(None, ["train.checkpoint_period_iterations=3"])) == 3
    with pytest.raises(ValueError, match="checkpoint_period_iterations must be null or an integer >= 1, got 0"):
        checkpoint_period(load_config_file(None, ["train.checkpoint_period_iterations=0"]))
    with pytest.raises(ValueError, match="train.checkpoint_format' is 'dpc', must be one of full, dcp"):
        load_config_file(None, ["train.checkpoint_format=dpc"])
