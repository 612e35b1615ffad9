"""The teacher + student step and the device-side augmentation on a *fake* CUDA device.

``torch._subclasses.fake_tensor.FakeTensorMode`` gives tensors a device and a shape but no data, and it works
on a CPU-only torch build: the model moved to ``cuda`` inside the mode has fake CUDA parameters, and any op
that mixes them with a tensor created on the CPU inside the step (a ``torch.tensor(...)`` or
``torch.arange(...)`` without ``device=``) raises ``FakeTensorDeviceMismatchError``, as a real GPU would at
its first step. Only forward computations are covered: autograd's engine looks for a real CUDA context
in ``backward``, and ``torch.autocast("cuda")`` disables itself without CUDA (the dtypes are not checked).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pytest
import torch
from tiny_ssl import tiny_ssl_cfg
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorDeviceMismatchError,
    FakeTensorMode,
    unset_fake_temporarily,
)

from franca.data import multicrop
from franca.data.synthetic import random_collated_batch
from franca.train.ssl_meta_arch import SSLMetaArch
from franca.train.train import build_batch_augmentation

CUDA = torch.device("cuda", 0)

SETTINGS = {
    "mrl-separate_ibot-sinkhorn": (),
    "dino-shared_head-centering": ("dino.MRL=false", "ibot.separate_head=false", "train.centering=centering"),
    "global_crops_only-sk_exclude_padding": ("crops.local_crops_number=0", "ibot.sk_exclude_padding=true"),
}


def _on_fake_cuda(tensors) -> bool:
    return all(isinstance(t, FakeTensor) and t.device == CUDA for t in tensors)


@contextmanager
def fake_cuda():
    """Fake tensors; real (host) tensors that enter an op are converted to fake ones on their own device."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*Disabling autocast")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode


@pytest.mark.parametrize("setting", SETTINGS)
def test_teacher_and_student_forward_stay_on_the_cuda_device(setting):
    cfg = tiny_ssl_cfg(2, *SETTINGS[setting])
    batch = random_collated_batch(cfg, seed=0)  # host tensors, as the DataLoader delivers them
    model = SSLMetaArch(cfg)
    model.train()
    with fake_cuda():
        model.to("cuda")
        assert model.device == CUDA and _on_fake_cuda(model.parameters())
        _forward_step(model, batch)


def _forward_step(model: SSLMetaArch, batch: dict) -> None:
    step = model.forward_step(batch, teacher_temp=0.05)
    teacher, student, objective, losses = step.teacher, step.student, step.objective, step.losses
    assert _on_fake_cuda([objective, *losses.values(), *teacher["dino"], *student["global_cls"]])
    if teacher["ibot"] is not None:
        assert _on_fake_cuda([*teacher["ibot"], *student["masked_patches"]])
    model.update_teacher(0.99)
    assert _on_fake_cuda(model.teacher.parameters())


@pytest.mark.parametrize("setting", ["mrl-separate_ibot-sinkhorn", "global_crops_only-sk_exclude_padding"])
def test_schedule_values_read_on_the_cuda_device(setting):
    """What the ``train.cuda_graph`` step reads on the device: the teacher temperature and the EMA momentum as
    0-d CUDA tensors; a host number or tensor reaching a CUDA op there would need a copy a recording refuses."""
    cfg = tiny_ssl_cfg(2, *SETTINGS[setting])
    batch = random_collated_batch(cfg, seed=0)
    model = SSLMetaArch(cfg)
    model.train()
    with fake_cuda():
        model.to("cuda")
        teacher_temp, momentum = torch.zeros(2, device="cuda").unbind(0)
        step = model.forward_on_device(model._move_batch(batch), teacher_temp=teacher_temp)
        assert _on_fake_cuda([step.objective, *step.teacher["dino"], *step.teacher["ibot"]])
        model.update_teacher(momentum)
        assert _on_fake_cuda(model.teacher.parameters())


def test_batch_augmentation_renders_crops_on_the_cuda_device(monkeypatch):
    augmentation = build_batch_augmentation(tiny_ssl_cfg(2, "train.batch_augmentation=true"))
    draw = multicrop.Uniforms.__call__

    def host_draw(self) -> float:  # the crop boxes are drawn on the host by design: real numbers there
        with unset_fake_temporarily():
            return draw(self)

    monkeypatch.setattr(multicrop.Uniforms, "__call__", host_draw)
    with fake_cuda():
        images = [torch.zeros(3, h, w, dtype=torch.uint8, device="cuda") for h, w in ((40, 48), (36, 36))]
        global_crops, local_crops = augmentation(images, torch.float16)
    assert _on_fake_cuda([global_crops, local_crops]) and global_crops.dtype == torch.float16
    assert global_crops.shape == (4, 3, 32, 32) and local_crops.shape == (4, 3, 16, 16)


def test_fake_cuda_reports_a_host_tensor_inside_cuda_work():
    """What the tests above would catch: a tensor built on the host (no ``device=``) meeting CUDA tensors."""
    with fake_cuda(), pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu"):
        torch.ones(2, 3, device="cuda") * torch.arange(3)
