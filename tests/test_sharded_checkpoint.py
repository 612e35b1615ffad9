"""franca.train.sharded_checkpoint (DCP): round trips (synchronous and asynchronous), the temporary directory
and keep-last-N, the fall-back past an unreadable checkpoint, the release conversion, and resharding with
real gloo processes: 1 process saves → 2 ranks resume → 2 ranks save → 1 process resumes."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_fsdp import (
    WORLD_SIZE,
    _init,
    build_model,
    build_optimizer,
    concatenated_batch,
    one_step,
    rank_batch,
    run_ranks,
    tiny_cfg,
)

from franca import fsdp
from franca.train import convert_checkpoint
from franca.train.checkpointing import Checkpointer, list_checkpoints
from franca.train.sharded_checkpoint import ShardedCheckpointer
from franca.utils.cli import run_cli


def _trained(seed: int = 0):
    """The tiny model after one AdamW step in this process (no process group: nothing sharded)."""
    cfg = tiny_cfg()
    model = build_model(cfg)
    optimizer = build_optimizer(model)
    torch.manual_seed(seed)
    one_step(model, optimizer, concatenated_batch([rank_batch(cfg, r) for r in range(WORLD_SIZE)]))
    return cfg, model, optimizer


def _fresh(cfg):
    torch.manual_seed(123)  # other initial weights: everything must come from the checkpoint
    model = SSLMetaArchFactory(cfg)
    return model, build_optimizer(model)


def SSLMetaArchFactory(cfg):
    from franca.train.ssl_meta_arch import SSLMetaArch

    model = SSLMetaArch(cfg)
    model.train()
    return model


def _assert_same(model, optimizer, ref_model, ref_optimizer) -> None:
    for (name, value), expected in zip(model.state_dict().items(), ref_model.state_dict().values()):
        assert torch.equal(value, expected), name
    states, expected = optimizer.state_dict(), ref_optimizer.state_dict()
    assert states["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states["state"][index][key], entry[key]), (index, key)
    assert [g["lr"] for g in states["param_groups"]] == [g["lr"] for g in expected["param_groups"]]


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip(tmp_path, async_save):
    cfg, model, optimizer = _trained()
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = ShardedCheckpointer(tmp_path, model, optimizer, async_save=async_save)
    path = checkpointer.save(4, sampler_advance=20)
    backup = [param.detach().clone() for param in model.parameters()]
    with torch.no_grad():  # training goes on while an asynchronous save writes: the saved state is a copy
        for param in model.parameters():
            param.add_(1.0)
    checkpointer.wait()
    assert path == tmp_path / "model_0000004.dcp" and path.is_dir()
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "extra.pth"]

    loaded_model, loaded_optimizer = _fresh(cfg)
    extra = ShardedCheckpointer(tmp_path, loaded_model, loaded_optimizer).resume()
    assert extra["iteration"] == 4 and extra["sampler_advance"] == 20 and extra["world_size"] == 1
    assert set(extra["rng"]) == {"python", "numpy", "torch", "cuda"}
    for name, value in loaded_model.state_dict().items():
        assert torch.equal(value, expected_model[name]), name
    with torch.no_grad():
        for param, value in zip(model.parameters(), backup):
            param.copy_(value)
    _assert_same(loaded_model, loaded_optimizer, model, optimizer)


def test_temporary_directory_keep_last_and_full_format(tmp_path):
    cfg, model, optimizer = _trained()
    states = dict(model=fsdp.ModelCheckpointState(model), optimizer=fsdp.OptimizerCheckpointState(model, optimizer))
    full = Checkpointer(tmp_path, max_to_keep=2, **states)
    full.save(1, sampler_advance=8)
    stray = tmp_path / ".model_0000009.dcp.tmp"  # a save killed half-way
    stray.mkdir()
    (stray / "__0_0.distcp").write_bytes(b"half")
    sharded = ShardedCheckpointer(tmp_path, model, optimizer, max_to_keep=2, full_checkpointer=full)
    assert list_checkpoints(tmp_path) == [(1, tmp_path / "model_0000001.pth")]

    loaded_model, loaded_optimizer = _fresh(cfg)
    loaded_full = Checkpointer(
        tmp_path,
        model=fsdp.ModelCheckpointState(loaded_model),
        optimizer=fsdp.OptimizerCheckpointState(loaded_model, loaded_optimizer),
    )
    extra = ShardedCheckpointer(tmp_path, loaded_model, loaded_optimizer, full_checkpointer=loaded_full).resume()
    assert extra["iteration"] == 1  # an earlier run's single file resumes in DCP mode
    _assert_same(loaded_model, loaded_optimizer, model, optimizer)

    for iteration in (3, 5):
        sharded.save(iteration)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [3, 5]
    assert not stray.exists()
    with pytest.raises(ValueError, match="sharded checkpoint: resume with train.checkpoint_format=dcp"):
        full.resume()


def test_unreadable_newest_falls_back_in_one_line(tmp_path, caplog):
    cfg, model, optimizer = _trained()
    checkpointer = ShardedCheckpointer(tmp_path, model, optimizer, max_to_keep=3)
    for iteration in (3, 5, 7):
        checkpointer.save(iteration)
    (tmp_path / "model_0000007.dcp" / "__0_0.distcp").write_bytes(b"truncated by a full disk")
    (tmp_path / "model_0000005.dcp" / ".metadata").unlink()
    loaded_model, loaded_optimizer = _fresh(cfg)
    with caplog.at_level(logging.WARNING, logger="franca"):
        extra = ShardedCheckpointer(tmp_path, loaded_model, loaded_optimizer).resume()
    assert extra["iteration"] == 3
    _assert_same(loaded_model, loaded_optimizer, model, optimizer)
    warnings = [r.getMessage() for r in caplog.records if "cannot read checkpoint" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "model_0000007.dcp" in warnings[0] and "falling back to" in warnings[0]
    assert "model_0000005.dcp (FileNotFoundError: incomplete sharded checkpoint" in warnings[1]
    assert [it for it, _ in list_checkpoints(tmp_path)] == [3, 5, 7]  # nothing deleted by a resume
    ShardedCheckpointer(tmp_path, loaded_model, loaded_optimizer, max_to_keep=3).save(5)  # replaces the broken one
    assert ShardedCheckpointer(tmp_path, model, optimizer).load(tmp_path / "model_0000005.dcp")["iteration"] == 5


def test_convert_to_release_file(tmp_path, monkeypatch, capsys):
    _, model, optimizer = _trained()
    ShardedCheckpointer(tmp_path, model, optimizer).save(6)
    assert convert_checkpoint.main([str(tmp_path)]) == 0  # the run directory: its newest checkpoint
    release = torch.load(tmp_path / "eval" / "training_6" / "teacher_checkpoint.pth", weights_only=True)
    expected = model.teacher.state_dict()
    assert list(release) == ["teacher"] and release["teacher"].keys() == expected.keys()
    assert all(torch.equal(release["teacher"][k], v) for k, v in expected.items())

    full = Checkpointer(tmp_path / "full", model=fsdp.ModelCheckpointState(model)).save(2)
    out = convert_checkpoint.convert(full, tmp_path / "from_full.pth")
    assert all(torch.equal(torch.load(out, weights_only=True)["teacher"][k], v) for k, v in expected.items())

    missing = tmp_path / "model_0000009.dcp"
    monkeypatch.setattr(sys, "argv", ["convert_checkpoint", str(missing)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(convert_checkpoint.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: checkpoint not found: {missing}"]


# ------------------------------------------------------------------------------- resharding, real processes


def _full_optimizer_state(model, optimizer) -> dict:
    return fsdp.OptimizerCheckpointState(model, optimizer).state_dict()


def _full_state(model, optimizer) -> dict:
    """Full model and optimizer state (gathered on rank 0), cloned: ``step`` tensors are live objects."""
    state = {
        "model": fsdp.ModelCheckpointState(model).state_dict(),
        "optimizer": _full_optimizer_state(model, optimizer),
    }
    return torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state)


def _assert_same_full(state: dict, expected: dict) -> None:
    assert state["model"].keys() == expected["model"].keys()
    for name, value in expected["model"].items():
        assert torch.equal(state["model"][name], value), name
    assert state["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    for name, entry in expected["optimizer"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state["optimizer"]["state"][name][key], entry[key]), (name, key)


def _two_ranks(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Resume the 1-process checkpoint on 2 ranks, step, save a 2-rank checkpoint, step again."""
    _init(rank, world_size, port)
    out = Path(out_dir)
    try:
        cfg = tiny_cfg()
        torch.manual_seed(123)
        model = build_model(cfg)
        optimizer = build_optimizer(model)
        extra = ShardedCheckpointer(out / "one", model, optimizer).resume()
        assert fsdp.is_sharded(model.student) and extra["iteration"] == 0 and extra["rng"] is None
        record = {"resumed": _full_state(model, optimizer)}
        record["second"] = one_step(model, optimizer, rank_batch(cfg, 10 + rank))["losses"]
        ShardedCheckpointer(out / "two", model, optimizer).save(1)
        record["saved"] = _full_state(model, optimizer)
        record["third"] = one_step(model, optimizer, rank_batch(cfg, 20 + rank))["losses"]
        if rank == 0:
            torch.save(record, out / "two_ranks.pth")
    finally:
        dist.destroy_process_group()


def _assert_losses_close(losses: dict, expected: dict) -> None:
    for name, value in expected.items():  # the same sums in another order across ranks
        assert losses[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_resharding_one_to_two_to_one(tmp_path):
    """1 process saves → 2 ranks resume (state equal, same next losses as 1 process on the concatenated
    batch) → 2 ranks save → 1 process resumes (state equal, same next losses)."""
    cfg, model, optimizer = _trained()
    ShardedCheckpointer(tmp_path / "one", model, optimizer).save(0)
    run_ranks(_two_ranks, str(tmp_path))
    record = torch.load(tmp_path / "two_ranks.pth", weights_only=True)
    _assert_same_full(record["resumed"], _full_state(model, optimizer))
    second = one_step(model, optimizer, concatenated_batch([rank_batch(cfg, 10 + r) for r in range(WORLD_SIZE)]))
    _assert_losses_close(record["second"], second["losses"])

    loaded_model, loaded_optimizer = _fresh(cfg)
    extra = ShardedCheckpointer(tmp_path / "two", loaded_model, loaded_optimizer).resume()
    assert extra["iteration"] == 1 and extra["world_size"] == 2 and extra["rng"] is None
    _assert_same_full(_full_state(loaded_model, loaded_optimizer), record["saved"])
    batch = concatenated_batch([rank_batch(cfg, 20 + r) for r in range(WORLD_SIZE)])
    _assert_losses_close(record["third"], one_step(loaded_model, loaded_optimizer, batch)["losses"])
