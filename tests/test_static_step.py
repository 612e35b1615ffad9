"""The step that a CUDA graph can replay (franca/train/static_step.py), checked on the CPU.

A recorded CUDA graph replays fixed kernels on fixed shapes with fixed arguments. What can be checked without a
GPU: run eagerly, the static step trains exactly as the eager loop (same losses, same weights after several
AdamW steps whose schedule values change); every iteration dispatches the same operators on the same shapes
whatever the batch's masked-patch count and the schedule values; nothing in it reads a tensor on the host; and
the capture option names everything that stands in its way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_ssl import tiny_ssl_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from franca.data.synthetic import random_collated_batch
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.static_step import StaticTrainingStep, capture_blockers
from franca.train.train import apply_optim_scheduler, build_optimizer, training_step

SETTINGS = {
    "mrl-separate_ibot-drop_path": ("student.drop_path_rate=0.3",),
    "shared_head-sk_exclude_padding": ("ibot.separate_head=false", "ibot.sk_exclude_padding=true"),
}
# per iteration: lr, wd, momentum, teacher_temp, last_layer_lr (the last layer frozen at first)
SCHEDULE = [(1e-3, 0.04, 0.99, 0.04, 0.0), (2e-3, 0.1, 0.995, 0.05, 2e-3), (1.5e-3, 0.2, 0.9, 0.07, 1.5e-3)]


def _model(*overrides: str) -> SSLMetaArch:
    torch.manual_seed(0)
    model = SSLMetaArch(tiny_ssl_cfg(4, *overrides))
    model.prepare_for_distributed_training()
    model.train()
    return model


def _schedule_kwargs(values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"), values))


def _batches(cfg) -> list[dict]:
    batches = [random_collated_batch(cfg, seed=seed) for seed in range(len(SCHEDULE))]
    counts = {int(b["n_masked_patches"]) for b in batches}
    assert len(counts) > 1 and {b["upperbound"] for b in batches} == {batches[0]["upperbound"]}
    return batches


@pytest.mark.parametrize("setting", SETTINGS)
def test_static_step_trains_as_the_eager_loop(setting):
    """Each iteration from the same state (weights, AdamW moments and step counts) on both sides, so that the
    comparison is one step deep: Adam turns rounding-level differences of near-zero gradients (the key biases')
    into lr-sized ones after a few steps, whichever side is right."""
    eager, static = _model(*SETTINGS[setting]), _model(*SETTINGS[setting])
    clip = eager.cfg.optim.clip_grad
    eager_opt = build_optimizer(eager.cfg, eager.get_params_groups())
    static_opt = build_optimizer(static.cfg, static.get_params_groups())
    step = StaticTrainingStep(static, static_opt, clip)
    for iteration, (batch, values) in enumerate(zip(_batches(eager.cfg), SCHEDULE)):
        eager.load_state_dict(static.state_dict())
        if iteration:
            eager_opt.load_state_dict(copy.deepcopy(static_opt.state_dict()))  # not sharing the moment tensors
        kwargs = _schedule_kwargs(values)
        apply_optim_scheduler(eager_opt, kwargs["lr"], kwargs["wd"], kwargs["last_layer_lr"])
        torch.manual_seed(iteration)  # the same stochastic-depth draws on both sides
        want = training_step(
            eager,
            eager_opt,
            batch,
            iteration=iteration,
            teacher_temp=kwargs["teacher_temp"],
            momentum=kwargs["momentum"],
            clip_grad=clip,
        )
        torch.manual_seed(iteration)
        got = step(batch, iteration=iteration, **kwargs)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), (iteration, name)
        for net in ("student", "teacher"):
            want_params = dict(getattr(eager, net).named_parameters())
            for name, param in getattr(static, net).named_parameters():
                torch.testing.assert_close(param, want_params[name], rtol=1e-6, atol=1e-8, msg=f"{iteration} {name}")
        want_state = eager_opt.state_dict()["state"]
        for key, state in static_opt.state_dict()["state"].items():
            torch.testing.assert_close(state["exp_avg_sq"], want_state[key]["exp_avg_sq"], rtol=1e-6, atol=0)
            assert float(state["step"]) == float(want_state[key]["step"]) == iteration + 1


class _Trace(TorchDispatchMode):
    """(operator, output shapes and dtypes) of every ATen operator dispatched, and the host reads among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in ("_local_scalar_dense", "nonzero", "masked_select"):
            self.reads.append(name)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((name, tuple((tuple(o.shape), o.dtype) for o in outs if isinstance(o, torch.Tensor))))
        return out


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_iteration_dispatches_the_same_operators_on_the_same_shapes(setting, monkeypatch):
    model = _model(*SETTINGS[setting])
    optimizer = build_optimizer(model.cfg, model.get_params_groups())
    step = StaticTrainingStep(model, optimizer, model.cfg.optim.clip_grad)
    batches = _batches(model.cfg)
    step(batches[0], iteration=0, **_schedule_kwargs(SCHEDULE[0]))  # AdamW's state and the cached constants
    iterate = step._iteration
    traces = []

    def traced() -> torch.Tensor:
        with _Trace() as trace:
            values = iterate()
        traces.append(trace)
        return values

    monkeypatch.setattr(step, "_iteration", traced)
    for iteration in (1, 2):
        step(batches[iteration], iteration=iteration, **_schedule_kwargs(SCHEDULE[iteration]))
    first, second = traces
    assert first.reads == second.reads == []  # nothing waits for the device before the logged losses
    assert len(first.ops) > 100 and first.ops == second.ops


def test_capture_names_every_blocker_and_stops_before_training():
    model = _model("train.centering=centering", "dino.MRL=false", "ibot.separate_head=false")
    optimizer = build_optimizer(model.cfg, model.get_params_groups())
    blockers = capture_blockers(model, optimizer)
    assert any("CUDA device" in b and "cpu" in b for b in blockers)
    assert any("centering" in b for b in blockers)
    with pytest.raises(ValueError, match=r"^train.cuda_graph=true cannot capture this run: it needs a CUDA device"):
        StaticTrainingStep(model, optimizer, 3.0, capture=True)
    foreach = torch.optim.AdamW(model.get_params_groups(), foreach=True)
    assert any("fused AdamW" in b for b in capture_blockers(model, foreach))


def test_train_cuda_graph_on_a_cpu_run_fails_with_one_line(tmp_path):
    from franca.train.train import do_train

    cfg = tiny_ssl_cfg(4, "train.cuda_graph=true", f"train.output_dir={tmp_path}")
    model = SSLMetaArch(cfg)
    model.prepare_for_distributed_training()
    with pytest.raises(ValueError, match="train.cuda_graph=true cannot capture this run: it needs a CUDA device"):
        do_train(cfg, model, resume=False)
