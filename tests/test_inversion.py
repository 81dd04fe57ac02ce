import types

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_models import tiny_unet3d, tiny_unet_motion

from motion_adapters.inversion import ddim_invert, ddim_sample, inversion_alphas


class FixedNoiseUNet(torch.nn.Module):
    """Predicts the same epsilon whatever x and t: then DDIM inversion is exactly invertible."""

    def __init__(self, eps):
        super().__init__()
        self.eps = torch.nn.Parameter(eps, requires_grad=False)

    def forward(self, x, t, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=self.eps.expand_as(x).to(x.dtype))


def test_inversion_is_exactly_undone_by_ddim_sampling_when_epsilon_is_consistent():
    g = torch.Generator().manual_seed(0)
    clip = 0.5 * torch.randn(1, 3, 4, 8, 8, generator=g)
    unet = FixedNoiseUNet(torch.randn(1, 3, 4, 8, 8, generator=g))
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    noise = ddim_invert(unet, clip, torch.zeros(1, 2, 4), sched, num_inference_steps=25, progress=False)
    # with a constant epsilon the walk telescopes: x_T = sqrt(a_T / a_0) (x0 - sqrt(1 - a_0) eps) + sqrt(1 - a_T) eps
    a_0, a_t = sched.alphas_cumprod[0].double(), sched.alphas_cumprod[-1].double()
    closed = (a_t / a_0).sqrt() * (clip - (1 - a_0).sqrt() * unet.eps) + (1 - a_t).sqrt() * unet.eps
    torch.testing.assert_close(noise, closed.float(), rtol=1e-4, atol=1e-4)
    # the round trip; on the cosine schedule abar_T ~ 1e-9 amplifies float32 rounding of x_T ~3e4-fold, so check
    # it on the scaled_linear schedule (abar_T ~ 5e-3)
    noise = ddim_invert(unet, clip, torch.zeros(1, 2, 4), schedule="scaled_linear", num_inference_steps=25,
                        progress=False)
    again = ddim_sample(unet, noise, torch.zeros(1, 2, 4), schedule="scaled_linear", num_inference_steps=25)
    torch.testing.assert_close(again, clip, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [tiny_unet3d, tiny_unet_motion])
def test_inversion_runs_on_each_backbone_in_eval_mode_and_restores_mode(make):
    unet = make().train()
    g = torch.Generator().manual_seed(0)
    clip = 0.5 * torch.randn(1, 4, 4, 8, 8, generator=g)
    noise = ddim_invert(unet, clip, torch.randn(1, 5, 16, generator=g), DDPMScheduler(), num_inference_steps=5,
                        progress=False)
    assert noise.shape == clip.shape and torch.isfinite(noise).all()
    assert unet.training


def test_schedules_differ_and_bad_schedule_is_refused():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    model, sd = inversion_alphas(sched), inversion_alphas(schedule="scaled_linear")
    assert model.shape == sd.shape and not torch.allclose(model, sd)
    with pytest.raises(ValueError, match="schedule='cosine' is not supported"):
        inversion_alphas(sched, "cosine")
    with pytest.raises(ValueError, match="num_inference_steps=0 must be a positive int"):
        ddim_invert(tiny_unet3d(), torch.zeros(1, 4, 2, 8, 8), torch.zeros(1, 5, 16), sched, num_inference_steps=0)


class OracleVelocityUNet(torch.nn.Module):
    """Predicts the exact v of a known clean clip: v = sqrt(abar) eps - sqrt(1 - abar) x_0 at every (x_t, t)."""

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.register_buffer("x0", x0)
        self.register_buffer("abar", alphas_cumprod)
        self.unused = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # the walk reads device and dtype

    def forward(self, x, t, encoder_hidden_states=None):
        a = self.abar[t].view(-1, 1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return types.SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * self.x0)


def test_inversion_reads_v_prediction_models_through_the_scheduler_config():
    clip = 0.5 * torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v_sched = DDPMScheduler(prediction_type="v_prediction")
    unet = OracleVelocityUNet(clip, v_sched.alphas_cumprod)
    noise = ddim_invert(unet, clip, torch.zeros(1, 2, 4), v_sched, num_inference_steps=25, progress=False)
    # an exact model's clean estimate is the clip at every step, so sampling back from the inverted noise is exact
    torch.testing.assert_close(ddim_sample(unet, noise, torch.zeros(1, 2, 4), v_sched, num_inference_steps=25),
                               clip, rtol=1e-3, atol=1e-3)
    # read as epsilon, the same outputs give another noise and no round trip
    eps_noise = ddim_invert(unet, clip, torch.zeros(1, 2, 4), DDPMScheduler(), num_inference_steps=25, progress=False)
    assert (eps_noise - noise).abs().max() > 0.1
