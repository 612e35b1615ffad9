"""franca.logging: smoothed meters, JSON-lines metrics, console progress, rank-aware files, TensorBoard."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

import franca.distributed as distributed
from franca.logging import MetricLogger, SmoothedValue, setup_logging


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoothed_value_window_and_global():
    meter = SmoothedValue(window_size=3)
    for v in [10.0, 1.0, 2.0, 3.0, 7.0]:
        meter.update(v)
    # window = [2, 3, 7]
    assert meter.median == 3.0
    assert meter.avg == pytest.approx(4.0)
    assert meter.max == 7.0
    assert meter.value == 7.0
    assert meter.global_avg == pytest.approx(23.0 / 5)
    assert str(meter) == "3.0000 (4.6000)"
    meter.update(2.0, num=5)
    assert meter.global_avg == pytest.approx((23.0 + 10.0) / 10)
    meter.synchronize_between_processes()  # no process group: unchanged
    assert meter.count == 10


def test_metric_logger_update_and_errors():
    metrics = MetricLogger()
    metrics.update(loss=torch.tensor(1.5), lr=0.1)
    assert metrics.loss.value == 1.5
    assert "loss: 1.5000 (1.5000)" in str(metrics)
    with pytest.raises(TypeError, match="metric 'lr' must be a number, got str"):
        metrics.update(lr="fast")
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        _ = metrics.missing


def test_log_every_writes_exact_values_per_iteration(tmp_path):
    log = setup_logging(str(tmp_path))
    out = tmp_path / "training_metrics.json"
    metrics = MetricLogger(output_file=str(out))
    seen = []
    for batch in metrics.log_every(
        range(100, 110), print_freq=2, header="Training", n_iterations=5, start_iteration=2, samples_per_iteration=8
    ):
        seen.append(batch)
        metrics.update(loss=float(batch), lr=batch / 1000)
    assert seen == [100, 101, 102]  # iterations 2, 3, 4 then stop at n_iterations
    records = _read_jsonl(out)
    assert [r["iteration"] for r in records] == [2, 3, 4]
    assert [r["loss"] for r in records] == [100.0, 101.0, 102.0]
    for r in records:
        assert set(r) >= {"iter_time", "data_time", "img_per_s", "max_mem_mb", "lr"}
        assert r["img_per_s"] == pytest.approx(8 / r["iter_time"])
        assert 0 <= r["data_time"] <= r["iter_time"]
    for handler in log.handlers:
        handler.flush()
    text = (tmp_path / "log.txt").read_text()
    assert "Training  [2/5]  eta: " in text and "[4/5]" in text and "[3/5]" not in text  # print_freq 2 + last
    assert "total time" in text


def test_log_every_dump_freq_and_resume_past_end(tmp_path):
    out = tmp_path / "m.json"
    metrics = MetricLogger(output_file=str(out))
    for i in metrics.log_every(range(7), print_freq=100, n_iterations=7, dump_freq=3):
        metrics.update(x=i)
    assert [r["iteration"] for r in _read_jsonl(out)] == [0, 3, 6]
    assert list(metrics.log_every(range(3), print_freq=1, n_iterations=4, start_iteration=4)) == []


def test_only_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    setup_logging(str(tmp_path), name="franca.test_rank1")
    logging.getLogger("franca.test_rank1").info("hello from rank 1")
    metrics = MetricLogger(output_file=str(tmp_path / "m.json"))
    for _ in metrics.log_every(range(2), print_freq=1, n_iterations=2):
        metrics.update(loss=1.0)
    assert not (tmp_path / "m.json").exists()
    assert not (tmp_path / "log.txt").exists()


def test_setup_logging_is_idempotent(tmp_path):
    for _ in range(3):
        log = setup_logging(str(tmp_path / "run.log"), name="franca.test_idem")
    log.info("once")
    for handler in log.handlers:
        handler.flush()
    assert (tmp_path / "run.log").read_text().count("once") == 1
    assert len(log.handlers) == 2


def test_tensorboard_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, name, value, step):
            calls.append((name, value, step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    metrics = MetricLogger(tensorboard_dir=str(tmp_path / "tb"))
    metrics.update(loss=2.5)
    metrics.dump(7, iter_time=0.5)
    metrics.close()
    assert calls[0] == ("open", str(tmp_path / "tb"))
    assert ("loss", 2.5, 7) in calls and ("iter_time", 0.5, 7) in calls
    assert calls[-1] == ("close",)


def test_tensorboard_missing_is_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    metrics = MetricLogger(output_file=str(tmp_path / "m.json"), tensorboard_dir=str(tmp_path / "tb"))
    metrics.update(loss=1.0)
    metrics.dump(0)
    assert _read_jsonl(tmp_path / "m.json") == [{"iteration": 0, "loss": 1.0}]
    assert not (tmp_path / "tb").exists()
