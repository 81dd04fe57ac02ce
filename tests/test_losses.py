"""Property tests of the delta-epsilon algebra (VMC eqs. 10-17) and the loss definitions."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from motion_adapters.losses import (
    add_noise,
    cosine_loss_official,
    cosine_loss_paper,
    epsilon_from_output,
    frame_residual,
    l2_weight,
    motion_distillation_loss,
    motion_vectors,
    prediction_type,
    split_epsilon,
    tweedie_x0,
    weighted_l2_loss,
)

settings.register_profile("ci", max_examples=40, deadline=None)
settings.load_profile("ci")

shapes = st.tuples(
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 7), st.integers(1, 5), st.integers(1, 5)
)
abars = st.floats(1e-3, 0.999)


def _draw(shape, seed, stride_frac):
    b, c, f, h, w = shape
    stride = 1 + int(stride_frac * (f - 1)) if f > 1 else 1
    stride = min(stride, f - 1)
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(b, c, f, h, w, generator=g, dtype=torch.float64)
    eps = torch.randn(b, c, f, h, w, generator=g, dtype=torch.float64)
    eps_pred = torch.randn(b, c, f, h, w, generator=g, dtype=torch.float64)
    return v0, eps, eps_pred, stride


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0, 0.99), abars)
def test_residual_of_noised_video_follows_eq10(shape, seed, sfrac, abar):
    v0, eps, _, c = _draw(shape, seed, sfrac)
    lhs = frame_residual(add_noise(v0, eps, abar), c)
    rhs = math.sqrt(abar) * frame_residual(v0, c) + math.sqrt(1 - abar) * frame_residual(eps, c)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0, 0.99), abars)
def test_motion_vectors_follow_eq13_and_eq14(shape, seed, sfrac, abar):
    v0, eps, eps_pred, c = _draw(shape, seed, sfrac)
    vt = add_noise(v0, eps, abar)
    # (13): predicted motion vectors are Tweedie applied to residuals
    expected13 = (frame_residual(vt, c) - math.sqrt(1 - abar) * frame_residual(eps_pred, c)) / math.sqrt(abar)
    torch.testing.assert_close(motion_vectors(vt, eps_pred, abar, c), expected13, rtol=1e-10, atol=1e-10)
    # (13) equals the residual of the per-frame Tweedie estimate (12)
    torch.testing.assert_close(frame_residual(tweedie_x0(vt, eps_pred, abar), c), expected13, rtol=1e-9, atol=1e-9)
    # (14): with the true noise the motion vectors are exact
    torch.testing.assert_close(motion_vectors(vt, eps, abar, c), frame_residual(v0, c), rtol=1e-8, atol=1e-8)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0, 0.99), abars)
def test_motion_l2_equals_weighted_epsilon_l2_eq16(shape, seed, sfrac, abar):
    v0, eps, eps_pred, c = _draw(shape, seed, sfrac)
    vt = add_noise(v0, eps, abar)
    motion_l2 = (frame_residual(v0, c) - motion_vectors(vt, eps_pred, abar, c)).pow(2).sum()
    eps_l2 = (frame_residual(eps, c) - frame_residual(eps_pred, c)).pow(2).sum()
    torch.testing.assert_close(motion_l2, (1 - abar) / abar * eps_l2, rtol=1e-9, atol=1e-9)
    # and the shipped loss is that identity, averaged per element and over the batch
    per_elem = (frame_residual(v0, c) - motion_vectors(vt, eps_pred, abar, c)).pow(2).mean()
    torch.testing.assert_close(weighted_l2_loss(eps, eps_pred, abar, c), per_elem, rtol=1e-9, atol=1e-9)


def test_weighted_l2_applies_each_samples_own_weight():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    pred = torch.randn(2, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    abar = torch.tensor([0.2, 0.9], dtype=torch.float64)
    each = [weighted_l2_loss(eps[i : i + 1], pred[i : i + 1], abar[i]) for i in range(2)]
    torch.testing.assert_close(weighted_l2_loss(eps, pred, abar), (each[0] + each[1]) / 2)


def test_residual_of_standard_noise_has_variance_two():
    # delta eps ~ N(0, 2I) (eq. 10). With n independent pairs, the sample variance has standard error
    # sqrt(2 / (n - 1)) * sigma^2 = 2 * sqrt(2 / (n - 1)); accept within 5 standard errors.
    g = torch.Generator().manual_seed(1234)
    eps = torch.randn(8, 3, 2, 64, 64, generator=g, dtype=torch.float64)  # one residual per (b, c, h, w)
    d = frame_residual(eps).flatten()
    n = d.numel()
    tol = 5 * 2 * math.sqrt(2 / (n - 1))
    assert abs(d.var().item() - 2.0) < tol, (d.var().item(), tol)
    assert abs(d.mean().item()) < 5 * math.sqrt(2 / n)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0, 0.99), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_paper_cosine_is_scale_invariant_and_bounded(shape, seed, sfrac, a, b):
    _, eps, eps_pred, c = _draw(shape, seed, sfrac)
    base = cosine_loss_paper(eps, eps_pred, c)
    torch.testing.assert_close(cosine_loss_paper(a * eps, b * eps_pred, c), base, rtol=1e-9, atol=1e-9)
    assert -1e-12 <= base.item() <= 2 + 1e-12
    assert cosine_loss_paper(eps, eps, c).item() == pytest.approx(0.0, abs=1e-12)
    assert cosine_loss_paper(eps, -eps, c).item() == pytest.approx(2.0, abs=1e-12)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0, 0.99), st.floats(1e-3, 1e3))
def test_official_cosine_matches_its_definition(shape, seed, sfrac, a):
    _, eps, eps_pred, c = _draw(shape, seed, sfrac)

    def reference(x, y):  # the released code, written out
        rx = (x[:, :, c:] - x[:, :, :-c]).abs()
        ry = (y[:, :, c:] - y[:, :, :-c]).abs()
        return 1 - F.cosine_similarity(rx, ry, dim=2).mean()

    torch.testing.assert_close(cosine_loss_official(eps, eps_pred, c), reference(eps_pred, eps))
    torch.testing.assert_close(cosine_loss_official(eps, a * eps_pred, c), reference(eps_pred, eps), rtol=1e-9, atol=1e-9)
    assert 0 - 1e-12 <= cosine_loss_official(eps, eps_pred, c).item() <= 1 + 1e-12  # |.| makes cosines >= 0
    assert cosine_loss_official(eps, eps, c).item() == pytest.approx(0.0, abs=1e-12)


def test_paper_and_official_cosines_differ():
    g = torch.Generator().manual_seed(0)
    eps, pred = torch.randn(2, 1, 2, 3, 4, 4, generator=g)
    assert not torch.isclose(cosine_loss_paper(eps, pred), cosine_loss_official(eps, pred))


def test_frame_residual_rejects_too_few_frames():
    with pytest.raises(ValueError, match="has 2 frame.*stride=2 needs at least 3"):
        frame_residual(torch.zeros(1, 3, 2, 4, 4), stride=2)
    with pytest.raises(ValueError, match=r"x must be a video tensor \(B, C, F, H, W\); got \(3, 2, 4, 4\)"):
        frame_residual(torch.zeros(3, 2, 4, 4))


def test_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"eps has shape \(1, 3, 4, 4, 4\) but eps_pred has \(1, 3, 5, 4, 4\)"):
        cosine_loss_paper(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 5, 4, 4))


def test_split_epsilon_keeps_the_first_channels_of_a_learned_variance_output():
    out = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 2, 1, 1)
    assert split_epsilon(out, 3)[0, :, 0].flatten().tolist() == [0.0, 1.0, 2.0]
    assert split_epsilon(out, 6) is out
    with pytest.raises(ValueError, match="has 6 channels; expected in_channels=4"):
        split_epsilon(out, 4)


def test_dispatcher_picks_each_loss_by_name_and_needs_abar_for_l2():
    g = torch.Generator().manual_seed(0)
    eps, pred = torch.randn(2, 1, 3, 4, 4, 4, generator=g)
    assert motion_distillation_loss(eps, pred, loss="cos", cos_variant="paper") == cosine_loss_paper(eps, pred)
    assert motion_distillation_loss(eps, pred) == cosine_loss_official(eps, pred)
    assert motion_distillation_loss(eps, pred, loss="l2", abar=0.5) == weighted_l2_loss(eps, pred, 0.5)
    with pytest.raises(ValueError, match="loss='l2' needs abar"):
        motion_distillation_loss(eps, pred, loss="l2")
    with pytest.raises(ValueError, match="loss='huber' is not supported"):
        motion_distillation_loss(eps, pred, loss="huber")


def test_l2_weight_rejects_abar_outside_unit_interval():
    assert float(l2_weight(0.25)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"abar must lie in \(0, 1\]"):
        l2_weight(0.0)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0, 0.99), abars)
def test_v_prediction_output_converts_back_to_the_true_noise(shape, seed, stride_frac, abar):
    # v = sqrt(abar) eps - sqrt(1 - abar) x_0 and x_t = add_noise(x_0, eps): the epsilon recovered from the exact
    # v is eps, so a v-prediction model's motion loss compares the same residuals as an epsilon model's.
    v0, eps, _, _ = _draw(shape, seed, stride_frac)
    x_t = add_noise(v0, eps, abar)
    v = math.sqrt(abar) * eps - math.sqrt(1 - abar) * v0
    torch.testing.assert_close(epsilon_from_output(v, x_t, abar, "v_prediction"), eps)
    assert epsilon_from_output(v, x_t, abar, "epsilon") is v


def test_v_prediction_conversion_is_per_sample_and_matches_diffusers():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 5, 5, generator=g), torch.randn(3, 3, 4, 5, 5, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t = scheduler.add_noise(x0, eps, t)
    v = scheduler.get_velocity(x0, eps, t)
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(epsilon_from_output(v, x_t, abar, "v_prediction"), eps, rtol=1e-4, atol=1e-4)
    assert prediction_type(scheduler) == "v_prediction"
    assert prediction_type(DDPMScheduler()) == "epsilon"
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        prediction_type(DDPMScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        epsilon_from_output(v, x_t, abar, "flow")
