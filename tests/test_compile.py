"""``train.compile``: every block of both backbones, the heads, the losses and the Sinkhorn-Knopp targets are
compiled in place (names and checkpoints unchanged), and the compiled step gives the eager step's losses and
gradients."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import _cfg, _model, demo_root, tiny_arch  # noqa: F401  (fixtures)

from franca.data.synthetic import random_collated_batch
from franca.layers.block import Block


def test_compile_flag_compiles_every_block_and_keeps_names(demo_root, tmp_path, tiny_arch):  # noqa: F811
    eager = _model(_cfg(demo_root, tmp_path))
    compiled = _model(_cfg(demo_root, tmp_path, **{"train.compile": True}))
    blocks = [m for m in compiled.modules() if isinstance(m, Block)]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)
    heads = [net[key] for net in (compiled.student, compiled.teacher) for key in net if key != "backbone"]
    losses = [compiled.dino_loss, compiled.ibot_patch_loss, compiled.koleo_loss]
    assert len(heads) >= 2 and all(m._compiled_call_impl is not None for m in heads + losses)
    assert all(hasattr(loss.sinkhorn_knopp_teacher, "_torchdynamo_orig_callable") for loss in losses[:2])
    assert not any(getattr(m, "_compiled_call_impl", None) for m in eager.modules())
    assert list(compiled.state_dict()) == list(eager.state_dict())


def _step_results(cfg, compile_parts) -> tuple[dict, dict]:
    model = _model(cfg)
    compile_parts(model)
    batch = random_collated_batch(cfg, seed=0, dtype=torch.float32)
    losses = model.forward_backward(batch, teacher_temp=0.05)
    grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return losses, grads


def _assert_same_step(eager: tuple[dict, dict], compiled: tuple[dict, dict]) -> None:
    (eager_losses, eager_grads), (losses, grads) = eager, compiled
    for key, value in eager_losses.items():
        torch.testing.assert_close(losses[key], value, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    # LayerScale 1 (not 1e-5): with γ = 1e-5 the residual branches are 1e-5 of the stream and their
    # gradients sit at the rounding level of the stream (relative errors ~1e-2 in both directions).
    for name, grad in eager_grads.items():
        error = (grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error < 1e-4, (name, float(error))


def _no_compile(model) -> None:
    pass


def _compile_blocks(model) -> None:
    model.student.backbone.compile_blocks()
    model.teacher.backbone.compile_blocks()


def test_compiled_blocks_match_eager(demo_root, tmp_path, tiny_arch):  # noqa: F811
    cfg = _cfg(demo_root, tmp_path, **{"student.layerscale": 1.0})
    _assert_same_step(_step_results(cfg, _no_compile), _step_results(cfg, _compile_blocks))


@pytest.mark.slow
def test_compiled_step_matches_eager(demo_root, tmp_path, tiny_arch):  # noqa: F811
    """``train.compile``: blocks, heads, losses and Sinkhorn-Knopp compiled (4+ min on a 2-core CPU)."""
    eager = _step_results(_cfg(demo_root, tmp_path, **{"student.layerscale": 1.0}), _no_compile)
    compiled_cfg = _cfg(demo_root, tmp_path, **{"train.compile": True, "student.layerscale": 1.0})
    _assert_same_step(eager, _step_results(compiled_cfg, _no_compile))
