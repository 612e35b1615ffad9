"""Sinkhorn-Knopp, DINO / iBOT / KoLeo losses: parity with the official code, SK marginals, centring, errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import load_reference

from franca.loss import KoLeoLoss, MRLDINOLoss, MRLiBOTPatchLoss, sinkhorn_knopp
from franca.loss.soft_cross_entropy import soft_cross_entropy


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    scale = max(1.0, expected.abs().max().item())
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= rtol * scale


@pytest.fixture(scope="module")
def ref() -> dict:
    return load_reference("public_sk_losses.pth")


@pytest.fixture
def no_collectives(monkeypatch):
    """Single process: fail loudly if any collective is called."""
    assert not dist.is_initialized()

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called without an initialised process group")

    for name in ("all_reduce", "all_gather", "broadcast", "reduce"):
        monkeypatch.setattr(dist, name, forbidden)


def _dense_sinkhorn(logits: torch.Tensor, temp: float, n_samples: float, n_iterations: int) -> torch.Tensor:
    """Test oracle: the textbook algorithm on the dense K × B matrix (float64)."""
    q = torch.exp(logits.double() / temp).t()
    k = q.shape[0]
    for _ in range(n_iterations):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / n_samples
    return (q * n_samples).t()


# ----------------------------------------------------------------------------- parity with the official code


def test_dino_sinkhorn_knopp_matches_reference(ref, no_collectives):
    loss = MRLDINOLoss(512)
    logits = tuple(t.clone() for t in ref["dino"]["logits"])
    targets = loss.sinkhorn_knopp_teacher(logits, teacher_temp=ref["teacher_temp"], n_global_crops_teacher=2)
    assert len(targets) == 5
    for out, expected in zip(targets, ref["dino"]["targets"]):
        _assert_close_rel(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(logits, ref["dino"]["logits"]))  # inputs untouched


def test_ibot_sinkhorn_knopp_matches_reference_over_padding_rows(ref, no_collectives):
    loss = MRLiBOTPatchLoss(512)
    count = torch.tensor([ref["ibot"]["n_masked_patches"]])
    targets = loss.sinkhorn_knopp_teacher(ref["ibot"]["logits"], ref["teacher_temp"], n_masked_patches_tensor=count)
    for out, expected in zip(targets, ref["ibot"]["targets"]):
        assert out.shape[0] == ref["ibot"]["upperbound"]
        _assert_close_rel(out, expected)
    assert count.tolist() == [10]  # the caller's count tensor is not reduced in place


def test_dino_losses_match_reference(ref):
    loss = MRLDINOLoss(512, student_temp=ref["dino_loss"]["student_temp"])
    local = loss(ref["dino_loss"]["student_local"], ref["dino"]["targets"], n_crops=(2, 2), teacher_global=False)
    glob = loss(ref["dino_loss"]["student_global"], ref["dino"]["targets"], n_crops=2, teacher_global=True)
    _assert_close_rel(local, ref["dino_loss"]["local_value"])
    _assert_close_rel(glob, ref["dino_loss"]["global_value"])


@pytest.mark.parametrize("with_weights", [True, False])
def test_ibot_loss_matches_reference(ref, with_weights):
    data = ref["ibot_loss"]
    loss = MRLiBOTPatchLoss(512, student_temp=data["student_temp"])
    value = loss(
        data["student_patch"],
        ref["ibot"]["targets"],
        student_masks_flat=data["masks"],
        n_masked_patches=data["n_masked_patches"],
        masks_weight=data["masks_weight"] if with_weights else None,
    )
    _assert_close_rel(value, data["value"] if with_weights else data["value_masks_weight_none"])


def test_koleo_matches_reference(ref):
    _assert_close_rel(KoLeoLoss()(ref["koleo"]["input"]), ref["koleo"]["value"])


# ----------------------------------------------------------------------------- Sinkhorn-Knopp properties


@pytest.mark.parametrize(("rows", "prototypes", "temp", "seed"), [(8, 32, 0.04, 0), (37, 11, 0.1, 1), (5, 300, 0.5, 2)])
def test_sinkhorn_marginals(rows, prototypes, temp, seed, no_collectives):
    torch.manual_seed(seed)
    logits = torch.randn(rows, prototypes) * 0.3
    (q,) = sinkhorn_knopp([logits], temp)
    assert q.dtype == torch.float32 and (q >= 0).all()
    # The last step normalises samples: every row is a distribution over prototypes.
    torch.testing.assert_close(q.sum(1), torch.ones(rows), rtol=1e-5, atol=1e-5)
    # Many iterations converge to the uniform prototype marginal rows / K.
    (converged,) = sinkhorn_knopp([logits], temp, n_iterations=200)
    torch.testing.assert_close(converged.sum(0), torch.full((prototypes,), rows / prototypes), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n_iterations", [1, 2, 3, 5])
def test_sinkhorn_matches_dense_algorithm_with_a_sample_count(n_iterations, no_collectives):
    torch.manual_seed(4)
    logits = [torch.randn(13, 24), torch.randn(13, 48)]
    targets = sinkhorn_knopp(logits, 0.07, n_samples=torch.tensor([10]), n_iterations=n_iterations)
    for out, level in zip(targets, logits):
        expected = _dense_sinkhorn(level, 0.07, 10.0, n_iterations).float()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
        # With B = 10 of 13 rows, each row sums to 1 after the final rescaling by B.
        torch.testing.assert_close(out.sum(1), torch.ones(13), rtol=1e-5, atol=1e-5)


def test_sinkhorn_is_shift_invariant_and_finite_for_large_logits(no_collectives):
    torch.manual_seed(5)
    logits = torch.randn(16, 64)
    (base,) = sinkhorn_knopp([logits], 0.04)
    (shifted,) = sinkhorn_knopp([logits + 50.0], 0.04)  # exp(50 / 0.04) overflows float32 without the shift
    assert torch.isfinite(shifted).all()
    # Tolerance of the input rounding: float32 ulp at 50 is 4e-6, i.e. 1e-4 in the exponent after / 0.04.
    torch.testing.assert_close(shifted, base, rtol=1e-3, atol=1e-5)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="n_iterations must be >= 1"):
        sinkhorn_knopp([torch.randn(4, 8)], 0.1, n_iterations=0)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp([torch.randn(4)], 0.1)
    with pytest.raises(ValueError, match="do not split into 2 global crops"):
        MRLDINOLoss(8).sinkhorn_knopp_teacher(torch.randn(5, 8), 0.1, n_global_crops_teacher=2)


def test_sinkhorn_single_tensor_gives_single_tensor(no_collectives):
    logits = torch.randn(6, 10)
    out = MRLDINOLoss(10).sinkhorn_knopp_teacher(logits, teacher_temp=0.1)
    assert isinstance(out, torch.Tensor) and out.shape == (6, 10)


def test_sinkhorn_valid_rows_equal_a_call_on_those_rows_alone(no_collectives):
    """The static-shape form of ``ibot.sk_exclude_padding``: rows left out get exact zeros and add nothing."""
    torch.manual_seed(4)
    logits = [torch.randn(13, k) * 3 for k in (8, 16)]
    valid = torch.arange(13) < 10
    count = torch.tensor([10])
    got = sinkhorn_knopp(logits, 0.07, n_samples=count, valid_rows=valid)
    want = sinkhorn_knopp([t[:10] for t in logits], 0.07, n_samples=count)
    for g, w in zip(got, want):
        torch.testing.assert_close(g[:10], w, rtol=1e-6, atol=1e-9)
        assert torch.all(g[10:] == 0)


def test_sinkhorn_temperature_as_a_tensor_is_the_float_result(no_collectives):
    """A 0-d tensor temperature (read on the device, as in a replayed CUDA graph) gives the float's bits."""
    logits = [torch.randn(6, 12), torch.randn(6, 24)]
    for a, b in zip(sinkhorn_knopp(logits, 0.06), sinkhorn_knopp(logits, torch.tensor(0.06))):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- loss structure


def _official_style_dino(student, teacher, n_crops, teacher_global, temp=0.1):
    """Test oracle: the loop over every (student chunk, teacher chunk) pair, one level."""
    total = 0.0
    if teacher_global:
        pairs = [(student, teacher.reshape(-1, teacher.shape[-1]))]
    else:
        pairs = [(s, t) for s in student.chunk(n_crops[0]) for t in teacher.view(n_crops[1], -1, teacher.shape[-1])]
    for s, t in pairs:
        total = total - (t * F.log_softmax(s / temp, dim=-1)).sum(-1).mean()
    return total


@pytest.mark.parametrize("teacher_global", [False, True])
def test_dino_loss_value_and_gradient_equal_the_pairwise_loop(teacher_global):
    torch.manual_seed(6)
    batch, k = 3, 20
    n_student = 2 if teacher_global else 4
    teacher = [F.softmax(torch.randn(2 * batch, k), -1), F.softmax(torch.randn(2 * batch, 2 * k), -1)]
    student = [
        torch.randn(n_student * batch, k, requires_grad=True),
        torch.randn(n_student * batch, 2 * k, requires_grad=True),
    ]
    n_crops = 2 if teacher_global else (4, 2)
    ours = MRLDINOLoss(2 * k)(student, teacher, n_crops=n_crops, teacher_global=teacher_global)
    grads = torch.autograd.grad(ours, student)
    expected = sum(_official_style_dino(s, t, n_crops, teacher_global) for s, t in zip(student, teacher))
    expected_grads = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_dino_loss_relative_importance_weights_levels():
    torch.manual_seed(7)
    teacher = [F.softmax(torch.randn(4, 8), -1), F.softmax(torch.randn(4, 16), -1)]
    student = [torch.randn(4, 8), torch.randn(4, 16)]
    level0 = MRLDINOLoss(8)(student[0], teacher[0], n_crops=2, teacher_global=True)
    level1 = MRLDINOLoss(16)(student[1], teacher[1], n_crops=2, teacher_global=True)
    weighted = MRLDINOLoss(16, relative_importance=[0.25, 2.0])(student, teacher, n_crops=2, teacher_global=True)
    torch.testing.assert_close(weighted, 0.25 * level0 + 2.0 * level1)
    with pytest.raises(ValueError, match="3 relative_importance weights for 2 Matryoshka levels"):
        MRLDINOLoss(16, relative_importance=[1, 1, 1])(student, teacher, n_crops=2, teacher_global=True)


def test_loss_errors_name_the_problem():
    teacher = [F.softmax(torch.randn(4, 8), -1)]
    with pytest.raises(ValueError, match="student has 2 Matryoshka levels but the teacher targets have 1"):
        MRLDINOLoss(8)([torch.randn(4, 8)] * 2, teacher, n_crops=2, teacher_global=True)
    with pytest.raises(ValueError, match="needs n_crops=\\(n_student_crops, n_teacher_crops\\)"):
        MRLDINOLoss(8)(torch.randn(4, 8), teacher[0], n_crops=2)
    with pytest.raises(ValueError, match="do not form 3 student and 2 teacher crops"):
        MRLDINOLoss(8)(torch.randn(4, 8), teacher[0], n_crops=(3, 2))
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, :3] = True
    with pytest.raises(ValueError, match="3 masked patches but 2 student"):
        MRLiBOTPatchLoss(8)(torch.randn(2, 8), teacher[0], masks, n_masked_patches=3)
    with pytest.raises(ValueError, match="1 mask weights for 3 masked patches"):
        MRLiBOTPatchLoss(8)(torch.randn(4, 8), teacher[0], masks, n_masked_patches=3, masks_weight=torch.ones(1))


def test_ibot_loss_ignores_padding_rows_and_weights_per_image():
    torch.manual_seed(8)
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, :2] = True
    masks[2, 1:5] = True  # image 1 has no masked patch
    n_masked, padding = 6, 3
    student = torch.randn(n_masked + padding, 10)
    teacher = F.softmax(torch.randn(n_masked + padding, 10), -1)
    value = MRLiBOTPatchLoss(10)(student, teacher, masks, n_masked_patches=n_masked)
    per_token = (teacher[:n_masked] * F.log_softmax(student[:n_masked] / 0.1, -1)).sum(-1)
    expected = -(per_token[:2].mean() + per_token[2:].mean()) / 3
    torch.testing.assert_close(value, expected)
    student[n_masked:] = 1e3  # padding rows never matter
    torch.testing.assert_close(MRLiBOTPatchLoss(10)(student, teacher, masks, n_masked_patches=n_masked), expected)


def test_koleo_penalises_near_duplicates_and_is_scale_invariant():
    torch.manual_seed(9)
    x = torch.randn(8, 16)
    spread = KoLeoLoss()(x)
    x_dup = x.clone()
    x_dup[1] = x_dup[0] + 1e-4
    assert KoLeoLoss()(x_dup) > spread + 1.0
    torch.testing.assert_close(KoLeoLoss()(3.0 * x), spread)
    with pytest.raises(ValueError, match="KoLeoLoss needs a"):
        KoLeoLoss()(torch.randn(1, 16))


# ----------------------------------------------------------------------------- softmax centring


def test_softmax_centering_per_level_ema(no_collectives):
    torch.manual_seed(10)
    loss = MRLDINOLoss(16, center_momentum=0.9, n_prototypes_per_level=[8, 16])
    assert loss.center.shape == (1, 24)
    logits = (torch.randn(6, 8), torch.randn(6, 16))
    first = loss.softmax_center_teacher(logits, teacher_temp=0.2)
    for out, t in zip(first, logits):
        torch.testing.assert_close(out, F.softmax(t / 0.2, -1))
    loss.update_center(logits)
    second = loss.softmax_center_teacher(logits, teacher_temp=0.2)  # applies the pending update first
    centres = [0.1 * t.mean(0) for t in logits]
    torch.testing.assert_close(loss.center.view(-1), torch.cat(centres))
    for out, t, c in zip(second, logits, centres):
        torch.testing.assert_close(out, F.softmax((t - c) / 0.2, -1))


def test_centering_update_over_the_kept_rows_only(no_collectives):
    loss = MRLiBOTPatchLoss(12, center_momentum=0.5)
    logits = torch.randn(7, 12)
    loss.update_center(logits, rows=torch.arange(7) < 4)  # rows 4..6: iBOT padding
    loss.apply_center_update()
    torch.testing.assert_close(loss.center.view(-1), 0.5 * logits[:4].mean(0))


def test_ibot_centering_keeps_dinov2_layout_and_shapes(no_collectives):
    loss = MRLiBOTPatchLoss(12)
    assert loss.center.shape == (1, 1, 12)
    patches = torch.randn(1, 5, 12)
    assert loss.softmax_center_teacher(patches, teacher_temp=0.1).shape == (1, 5, 12)
    loss.update_center(patches)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.1 * patches.mean(1, keepdim=True))


def test_centering_levels_must_match_the_centre():
    with pytest.raises(ValueError, match=r"pass n_prototypes_per_level=\[8, 16\]"):
        MRLDINOLoss(16).softmax_center_teacher((torch.randn(2, 8), torch.randn(2, 16)), teacher_temp=0.1)


def test_sinkhorn_knopp_with_underflowing_prototypes_stays_finite():
    """Logits spread far beyond exp()'s range (a large head init at a low teacher temperature) give finite
    targets: a row or prototype whose every entry underflowed in exp() gets weight 0 instead of NaN, the
    others still sum to 1."""
    from franca.loss.sinkhorn_knopp import sinkhorn_knopp

    torch.manual_seed(0)
    logits = torch.randn(8, 64) * 40.0
    (targets,) = sinkhorn_knopp([logits], temperature=0.04)
    assert torch.isfinite(targets).all()
    row_sums = targets.sum(1)
    kept = row_sums > 0.5
    assert kept.any()
    torch.testing.assert_close(row_sums[kept], torch.ones(int(kept.sum())), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(row_sums[~kept], torch.zeros(int((~kept).sum())))


# ----------------------------------------------------------------------------- fused soft cross-entropy


@pytest.mark.parametrize("groups, padding", [(1, 0), (1, 5), (3, 0)])
def test_soft_cross_entropy_matches_autograd_of_the_formula(groups, padding):
    """Value and gradient of the fused multi-level loss against autograd of
    ``-Σ_j λ_j Σ_g Σ_r w_r Σ_k t_jrk log_softmax(s_jgr / τ)_k``; padding rows get a zero gradient."""
    torch.manual_seed(groups + padding)
    rows, temp, widths, lambdas = 4, 0.1, (7, 13), (0.5, 2.0)
    students = [torch.randn(groups * rows + padding, k, requires_grad=True) for k in widths]
    targets = [F.softmax(torch.randn(rows, k), -1) * 2 for k in widths]  # rows need not sum to 1
    weight = torch.rand(rows)
    ours = soft_cross_entropy(students, targets, temp, weight, n_rows=groups * rows, level_weights=lambdas)
    grads = torch.autograd.grad(ours * 1.5, students)
    expected = 0.0
    for s, t, lam in zip(students, targets, lambdas):
        log_probs = F.log_softmax(s[: groups * rows] / temp, -1).view(groups, rows, -1)
        expected = expected - lam * (log_probs * t * weight[:, None]).sum()
    expected_grads = torch.autograd.grad(expected * 1.5, students)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        if padding:
            assert torch.all(g[groups * rows :] == 0)


def test_soft_cross_entropy_keeps_the_logits_dtype_and_checks_shapes():
    student = torch.randn(6, 9, dtype=torch.bfloat16, requires_grad=True)
    target = F.softmax(torch.randn(3, 9), -1)
    loss = soft_cross_entropy([student], [target], 0.1, 1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad.dtype == torch.bfloat16
    expected = -(F.log_softmax(student.detach().float() / 0.1, -1).view(2, 3, 9) * target).sum()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="do not form chunks of the 3 target rows"):
        soft_cross_entropy([student], [target], 0.1, n_rows=5)
    with pytest.raises(ValueError, match="2 row weights for 3 target rows"):
        soft_cross_entropy([student], [target], 0.1, torch.ones(2))
    with pytest.raises(ValueError, match="1 student levels for 2 target levels"):
        soft_cross_entropy([student], [target, target], 0.1)
