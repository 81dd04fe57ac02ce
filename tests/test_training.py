import math
import types

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from tiny_models import tiny_unet3d, tiny_unet_motion

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.serialization import load_motion_adapter
from motion_adapters.training import NonFiniteLossError, train_motion


def moving_square(frames=6, size=8, channels=4):
    """A bright square moving one pixel right per frame, in [-1, 1]."""
    video = -torch.ones(channels, frames, size, size)
    for f in range(frames):
        video[:, f, 2:5, f % (size - 3) : f % (size - 3) + 3] = 1.0
    return video


def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def embeds(dim=16):
    return torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(7))


def cfg(**kw):
    base = dict(max_train_steps=4, learning_rate=1e-3, num_frames=6, checkpointing_steps=0)
    base.update(kw)
    return MotionDistillationConfig(**base)


@pytest.mark.parametrize("make", [tiny_unet3d, tiny_unet_motion])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_only_adapter_parameters_change(make, mode):
    unet = make()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    result = train_motion(unet, moving_square(), embeds(), scheduler(), cfg(mode=mode), progress=False)
    after = dict(unet.named_parameters())
    adapted = {f"{m}.weight" for m in result.info.module_names} if mode == "full" else {
        n for n in after if ".lora_" in n
    }
    for name, p in after.items():
        key = name.replace(".base_layer", "")
        if name in adapted:
            ref = before.get(key, torch.zeros_like(p) if "lora_B" in name else None)
            if ref is not None:
                assert not torch.equal(p.detach(), ref), f"{name} did not move"
        else:
            torch.testing.assert_close(p.detach(), before[key], rtol=0, atol=0, msg=f"{name} moved")
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)


def test_loss_falls_over_a_few_dozen_steps():
    unet = tiny_unet3d()
    config = cfg(max_train_steps=60, learning_rate=3e-3, loss="cos", cos_variant="paper", max_timestep=300)
    losses = train_motion(unet, moving_square(), embeds(), scheduler(), config, progress=False).losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first * 0.9, (first, last)


def test_same_seed_same_run_and_resume_matches_uninterrupted(tmp_path):
    config = cfg(max_train_steps=6, checkpointing_steps=3, mode="lora", r=4)
    a = train_motion(tiny_unet3d(), moving_square(), embeds(), scheduler(), config, progress=False)
    full = train_motion(tiny_unet3d(), moving_square(), embeds(), scheduler(), config, output_dir=tmp_path / "full",
                        progress=False)
    assert a.losses == full.losses
    # stop after step 3 (the checkpoint), then resume in a fresh process-like setting
    stop = lambda state: state.step == 3  # noqa: E731
    part = train_motion(tiny_unet3d(), moving_square(), embeds(), scheduler(), config, output_dir=tmp_path / "r",
                        callbacks=[stop], progress=False)
    assert part.stopped_early and len(part.losses) == 3
    resumed = train_motion(tiny_unet3d(), moving_square(), embeds(), scheduler(), config, output_dir=tmp_path / "r",
                           progress=False)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    m1, m2 = load_motion_adapter(tmp_path / "full"), load_motion_adapter(tmp_path / "r")
    for k in m1.tensors:
        torch.testing.assert_close(m1.tensors[k], m2.tensors[k], rtol=1e-5, atol=1e-6)
    assert m2.training["steps"] == 6



def test_drawing_ahead_feeds_each_step_its_own_seeded_timestep_and_noise(monkeypatch):
    from motion_adapters import training

    config = cfg(max_train_steps=5, seed=3)
    seen = {}
    for ahead in (True, False):
        monkeypatch.setattr(training, "DRAW_AHEAD", ahead)
        timesteps = []
        result = train_motion(tiny_unet3d(), moving_square(), embeds(), scheduler(), config, progress=False,
                              callbacks=[lambda state, ts=timesteps: ts.append(state.timestep)])
        seen[ahead] = (timesteps, result.losses)
    assert seen[True] == seen[False]
    expected = [int(torch.randint(0, 1000, (1,), generator=torch.Generator().manual_seed(3 * 1_000_003 + step)))
                for step in range(5)]  # fmt: skip
    assert seen[True][0] == expected

def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    config = cfg(max_train_steps=6, checkpointing_steps=2)
    unet = tiny_unet3d()

    def poison(state):
        if state.step == 3:
            with torch.no_grad():
                unet.conv_in.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 .*last good checkpoint is in .*checkpoint"):
        train_motion(unet, moving_square(), embeds(), scheduler(), config, output_dir=tmp_path, callbacks=[poison],
                     progress=False)
    assert (tmp_path / "checkpoint" / "adapter.safetensors").is_file()
    import json

    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2


def test_latent_backbone_trains_through_the_vae(tmp_path):
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, in_channels=3,
                        out_channels=3).eval()
    clip = moving_square(channels=3)
    result = train_motion(tiny_unet3d(), clip, embeds(), scheduler(), cfg(), vae=vae, output_dir=tmp_path,
                          training_info={"prompt": "a square moving right"}, progress=False)
    motion = load_motion_adapter(tmp_path)
    assert motion.training["prompt"] == "a square moving right" and motion.training["steps"] == 4
    assert motion.distillation["max_train_steps"] == 4 and len(result.losses) == 4


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"video must be a \(C, F, H, W\) or \(1, C, F, H, W\) tensor"):
        train_motion(tiny_unet3d(), torch.zeros(4, 8, 8), embeds(), scheduler(), cfg(), progress=False)
    with pytest.raises(ValueError, match=r"video has 1 frame\(s\); frame_stride=1 needs at least 2"):
        train_motion(tiny_unet3d(), torch.zeros(4, 1, 8, 8), embeds(), scheduler(), cfg(), progress=False)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(1, L, D\)"):
        train_motion(tiny_unet3d(), moving_square(), torch.zeros(5, 16), scheduler(), cfg(), progress=False)
    with pytest.raises(ValueError, match="mixed_precision='fp16' needs a CUDA device"):
        train_motion(tiny_unet3d(), moving_square(), embeds(), scheduler(), cfg(mixed_precision="fp16"),
                     progress=False)


def test_v_prediction_unet_is_trained_on_the_epsilon_it_implies():
    # an oracle v-model of the clip implies the true noise, so every motion loss is ~0 when the scheduler says
    # v_prediction, and clearly not when the same outputs are read as epsilon
    from test_inversion import OracleVelocityUNet

    from motion_adapters.training_step import StepRunner

    clip = 0.5 * torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    unet = OracleVelocityUNet(clip, sched.alphas_cumprod)
    t, noise = torch.tensor([300]), torch.randn(clip.shape, generator=torch.Generator().manual_seed(1))
    for loss in ("cos", "l2", "eps_mse"):
        config = MotionDistillationConfig(loss=loss)
        as_v, as_eps = (
            StepRunner(unet, clip, None, sched.alphas_cumprod, [], None, config, None, prediction_type=kind)
            for kind in ("v_prediction", "epsilon")
        )
        assert as_v.loss(t, noise).item() < 1e-4
        assert as_eps.loss(t, noise).item() > 1e-2


def test_epsilon_loss_weight_adds_plain_epsilon_matching_to_the_motion_loss():
    from test_inversion import FixedNoiseUNet

    from motion_adapters.training_step import StepRunner

    g = torch.Generator().manual_seed(0)
    clip, eps = 0.5 * torch.randn(1, 3, 4, 8, 8, generator=g), torch.randn(1, 3, 4, 8, 8, generator=g)
    unet, sched = FixedNoiseUNet(eps), DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    t, noise = torch.tensor([400]), torch.randn(clip.shape, generator=g)

    def loss(weight):
        config = MotionDistillationConfig(loss="cos", epsilon_loss_weight=weight)
        return StepRunner(unet, clip, None, sched.alphas_cumprod, [], None, config, None).loss(t, noise).item()

    assert loss(2.0) - loss(0.0) == pytest.approx(2.0 * (eps - noise).pow(2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"epsilon_loss_weight=-1.0 must be >= 0"):
        MotionDistillationConfig(epsilon_loss_weight=-1.0)


def test_dropout_masks_come_from_the_seed_not_from_the_callers_random_state(tmp_path):
    def unet_with_dropout():
        unet = tiny_unet3d()
        dropouts = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts, "the tiny UNet has no dropout layer to test"
        for module in dropouts:
            module.p = 0.5
        return unet

    config = cfg(max_train_steps=4, checkpointing_steps=2)
    first = train_motion(unet_with_dropout(), moving_square(), embeds(), scheduler(), config, progress=False)
    torch.rand(100)  # the caller draws numbers between runs
    unet, clip, text, noise_scheduler = unet_with_dropout(), moving_square(), embeds(), scheduler()
    state = torch.get_rng_state()
    second = train_motion(unet, clip, text, noise_scheduler, config, progress=False)
    assert first.losses == second.losses
    assert torch.equal(torch.get_rng_state(), state)  # training leaves the caller's random state alone
    other = train_motion(unet_with_dropout(), moving_square(), embeds(), scheduler(), cfg(max_train_steps=4, seed=1),
                         progress=False)  # fmt: skip
    assert other.losses != first.losses
    # a resumed run draws the same dropout masks as an uninterrupted one
    stop = lambda state: state.step == 2  # noqa: E731
    train_motion(unet_with_dropout(), moving_square(), embeds(), scheduler(), config, output_dir=tmp_path,
                 callbacks=[stop], progress=False)  # fmt: skip
    resumed = train_motion(unet_with_dropout(), moving_square(), embeds(), scheduler(), config, output_dir=tmp_path,
                           progress=False)  # fmt: skip
    assert resumed.losses == pytest.approx(first.losses, rel=1e-5)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # the factor clips, or stays 1
def test_fused_adamw_applies_the_clipping_factor_as_clip_grad_norm_does(monkeypatch, max_norm):
    from test_inversion import FixedNoiseUNet

    from motion_adapters import training_step
    from motion_adapters.training_step import StepRunner

    g = torch.Generator().manual_seed(0)
    clip, eps = 0.5 * torch.randn(1, 3, 4, 8, 8, generator=g), torch.randn(1, 3, 4, 8, 8, generator=g)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    draws = [(torch.tensor([t]), torch.randn(clip.shape, generator=g)) for t in (100, 400, 700)]

    def run(in_optimizer):
        monkeypatch.setattr(training_step, "CLIP_IN_OPTIMIZER", in_optimizer)
        unet = FixedNoiseUNet(eps)
        scale = torch.nn.Parameter(torch.ones(1, 3, 4, 1, 1))  # a trainable per-frame gain on the prediction

        def model(x, t, encoder_hidden_states=None):
            return types.SimpleNamespace(sample=unet(x, t).sample * scale)

        optimizer = torch.optim.AdamW([scale], lr=1e-2, fused=True)  # the CPU's fused kernel takes grad_scale too
        assert training_step.clips_in_optimizer(optimizer) == in_optimizer
        config = MotionDistillationConfig(loss="l2", max_grad_norm=max_norm)
        runner = StepRunner(model, clip, None, sched.alphas_cumprod, [scale], optimizer, config, None)
        losses = [runner(t, noise).item() for t, noise in draws]
        assert not hasattr(optimizer, "grad_scale")  # handed over for the step only
        return scale.detach().clone(), scale.grad.clone(), losses

    (scale, grad, losses), (expected, expected_grad, expected_losses) = run(True), run(False)
    assert not torch.equal(expected, torch.ones_like(expected))  # the steps moved the parameter
    torch.testing.assert_close(scale, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-9)  # the clipped gradient stays in .grad
    assert losses == pytest.approx(expected_losses, rel=1e-6)
