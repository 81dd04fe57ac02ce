import pytest
import torch
from fixtures_tiny import (
    tiny_noising_scheduler,
    tiny_scheduler,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
)

from motion_adapters import MotionDistillationConfig
from motion_adapters.pipelines import Show1InterpolationPipeline, Show1KeyframesPipeline, Show1SuperResPipeline
from motion_adapters.pipelines.vmc import VMCPipeline
from motion_adapters.serialization import MotionFileError
from motion_adapters.world import ClipSpec, render_clip

FAST = {"keyframes": {"num_inference_steps": 3}, "interpolation": {"num_inference_steps": 2},
        "sr1": {"num_inference_steps": 2}}


def make_pipe(tmp_path, with_stages=False) -> VMCPipeline:
    tokenizer = tiny_tokenizer(tmp_path)
    keyframes = Show1KeyframesPipeline(tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer)),
                                       unet=tiny_unet("keyframes", 1), scheduler=tiny_scheduler())
    stages = {}
    if with_stages:
        stages["interpolation"] = Show1InterpolationPipeline(
            tokenizer=None, text_encoder=None, unet=tiny_unet("interpolation", 2), scheduler=tiny_scheduler())
        stages["sr1"] = Show1SuperResPipeline(
            tokenizer=None, text_encoder=None, unet=tiny_unet("sr1", 3), scheduler=tiny_scheduler(),
            image_noising_scheduler=tiny_noising_scheduler())
    for p in (keyframes, *stages.values()):
        p.set_progress_bar_config(disable=True)
        p.unet.eval()  # as from_pretrained gives them: fresh modules are in training mode, with dropout on
    return VMCPipeline(keyframes, **stages)


def clip(frames=8, size=(16, 24)):
    return render_clip(ClipSpec("square", "red", "blue", "zigzag"), num_frames=frames, height=size[0], width=size[1])


CONFIG = MotionDistillationConfig(max_train_steps=3, learning_rate=1e-3, checkpointing_steps=0)


def test_train_motion_moves_only_keyframe_temporal_attention_and_stores_a_prior(tmp_path):
    pipe = make_pipe(tmp_path, with_stages=True)
    before = {name: {k: v.clone() for k, v in p.unet.state_dict().items()}
              for name, p in (("keyframes", pipe.keyframes), ("interpolation", pipe.interpolation), ("sr1", pipe.sr1))}
    text_before = {k: v.clone() for k, v in pipe.keyframes.text_encoder.state_dict().items()}
    result = pipe.train_motion(clip(), "a red square zigzagging", CONFIG, output_dir=tmp_path / "m",
                               num_inversion_steps=4, progress=False)
    assert len(result.losses) == 3
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before["keyframes"][k])}
    assert changed == {f"{n}.weight" for n in result.info.module_names}
    assert all("temp_attentions" in k and k.rsplit(".", 2)[-2] in {"to_q", "to_k", "to_v"} for k in changed)
    for name in ("interpolation", "sr1"):
        for k, v in getattr(pipe, name).unet.state_dict().items():
            assert torch.equal(v, before[name][k]), f"{name}.{k} changed"
    for k, v in pipe.keyframes.text_encoder.state_dict().items():
        assert torch.equal(v, text_before[k])
    assert pipe._noise_priors["default"].shape == (1, 3, 8, 16, 24)
    assert (tmp_path / "m" / "noise_prior.safetensors").is_file()
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_a_motion_trained_in_place_is_switched_off_and_on_by_set_motions(tmp_path):
    pipe = make_pipe(tmp_path)
    video = clip()[None]
    before = pipe.invert(video, 4, progress=False)
    pipe.train_motion(video, "a red square zigzagging", CONFIG, invert=False, progress=False)
    trained = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.set_motions([])
    torch.testing.assert_close(pipe.invert(video, 4, progress=False), before, rtol=0, atol=0)
    pipe.set_motions(["default"])
    for key, value in pipe.unet.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_noise_prior_comes_from_the_base_unet_by_default_and_from_the_tuned_one_when_asked(tmp_path):
    pipe = make_pipe(tmp_path)
    video = clip()[None]
    base_prior = pipe.invert(video, 4, progress=False).cpu()
    pipe.train_motion(video, "a red square zigzagging", CONFIG, adapter_name="other", invert=False, progress=False)
    pipe.set_motions(["other"], [0.5])
    assert not torch.allclose(pipe.invert(video, 4, progress=False).cpu(), base_prior)  # it changes the inversion
    torch.testing.assert_close(pipe._invert_without_motions(video, 4, "model", False), base_prior, rtol=0, atol=0)
    assert pipe.motions == {"other": 0.5}  # switched off for the inversion only
    pipe.unload_motion()  # full-mode motions do not stack: one at a time

    pipe.train_motion(video, "a red square zigzagging", CONFIG, output_dir=tmp_path / "m", num_inversion_steps=4,
                      progress=False)
    torch.testing.assert_close(pipe._noise_priors["default"], base_prior, rtol=0, atol=0)
    assert not torch.allclose(pipe.invert(video, 4, progress=False).cpu(), base_prior)
    from motion_adapters.serialization import load_motion_adapter

    assert load_motion_adapter(tmp_path / "m").training["noise_prior_inverted_with"] == "base"
    pipe.unload_motion()
    pipe.train_motion(video, "a red square zigzagging", CONFIG, num_inversion_steps=4, invert_with="tuned",
                      progress=False)
    torch.testing.assert_close(pipe._noise_priors["default"], pipe.invert(video, 4, progress=False).cpu(),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="invert_with='both' must be one of"):
        pipe.train_motion(video, "a red square zigzagging", CONFIG, invert_with="both", progress=False)


def test_saved_motion_reloads_into_a_fresh_pipeline_and_generates_identically(tmp_path):
    pipe = make_pipe(tmp_path)
    pipe.train_motion(clip(), "a red square zigzagging", CONFIG, output_dir=tmp_path / "m", num_inversion_steps=4,
                      progress=False)
    kwargs = dict(stage_kwargs=FAST, output_type="pt", generator=torch.Generator().manual_seed(0))
    expected = pipe("a green circle zigzagging", **kwargs).frames
    fresh = make_pipe(tmp_path)
    base = fresh("a green circle zigzagging", height=16, width=24,
                 **{**kwargs, "generator": torch.Generator().manual_seed(0)}).frames
    name = fresh.load_motion(tmp_path / "m")
    assert name == "m" and fresh.motions == {"m": 1.0}
    got = fresh("a green circle zigzagging", **{**kwargs, "generator": torch.Generator().manual_seed(0)}).frames
    # the UNet weights and the noise prior reload bit-exactly; the frames agree to float rounding (6e-5 measured;
    # it was 2e-3 while these fresh test UNets sampled in training mode, with dropout on)
    for key, value in fresh.unet.state_dict().items():
        torch.testing.assert_close(value, pipe.unet.state_dict()[key], rtol=0, atol=0)
    torch.testing.assert_close(fresh._noise_priors["m"], pipe._noise_priors["default"], rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    assert (got - base).abs().max() > 10 * (got - expected).abs().max()
    fresh.unload_motion()
    again = fresh("a green circle zigzagging", height=16, width=24,
                  **{**kwargs, "generator": torch.Generator().manual_seed(0)}).frames
    torch.testing.assert_close(again, base)


def test_call_starts_from_the_noise_prior_unless_told_otherwise(tmp_path):
    pipe = make_pipe(tmp_path)
    pipe.train_motion(clip(), "a red square zigzagging", CONFIG, num_inversion_steps=4, progress=False)
    prior = pipe._noise_priors["default"]
    run = lambda **kw: pipe("a cat", stage_kwargs=FAST, output_type="pt",  # noqa: E731
                            generator=torch.Generator().manual_seed(1), **kw).frames
    torch.testing.assert_close(run(), run(latents=prior.clone()))
    assert not torch.allclose(run(), run(noise_prior=False, height=16, width=24))
    with pytest.raises(ValueError, match=r"the initial sample is \(8, 16, 24\) .* but the call asks for \(8, 32, 24\)"):
        run(height=32)


def test_two_motions_combine_with_weights(tmp_path):
    pipe = make_pipe(tmp_path)
    lora = MotionDistillationConfig(max_train_steps=2, learning_rate=1e-2, mode="lora", r=2, checkpointing_steps=0)
    pipe.train_motion(clip(), "a square zigzagging", lora, output_dir=tmp_path / "a", invert=False, progress=False)
    pipe.unload_motion()
    pipe.train_motion(clip().flip(1), "a square zigzagging back", lora, output_dir=tmp_path / "b", invert=False,
                      progress=False)
    pipe.unload_motion()
    run = lambda: pipe("a cat", height=16, width=24, stage_kwargs=FAST, output_type="pt",  # noqa: E731
                       generator=torch.Generator().manual_seed(2)).frames
    base = run()
    pipe.load_motion(tmp_path / "a")
    pipe.load_motion(tmp_path / "b", scale=0.5)
    assert pipe.motions == {"a": 1.0, "b": 0.5}
    both = run()
    pipe.set_motions(["a", "b"], [0.0, 0.0])
    torch.testing.assert_close(run(), base, rtol=1e-5, atol=1e-5)
    pipe.set_motions(["a", "b"], [1.0, 0.5])
    torch.testing.assert_close(run(), both, rtol=1e-5, atol=1e-5)


def test_missing_motion_gets_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = make_pipe(tmp_path)
    with pytest.raises(MotionFileError, match="nobody/no-such-motion"):
        pipe.load_motion("nobody/no-such-motion", cache_dir=tmp_path / "cache")
    with pytest.raises(MotionFileError):
        pipe.load_motion(tmp_path / "does-not-exist")


def test_call_merges_stage_kwargs_over_the_pipeline_defaults(tmp_path):
    pipe = make_pipe(tmp_path)
    pipe._default_stage_kwargs = {"keyframes": {"num_inference_steps": 5, "guidance_scale": 1.0}}
    steps = []

    def count(pipeline, step, timestep, tensors):
        steps.append(int(timestep))
        return tensors

    def run(**keyframes):
        steps.clear()
        frames = pipe("a cat", height=16, width=24, output_type="pt", noise_prior=False,
                      generator=torch.Generator().manual_seed(0), callback_on_step_end=count,
                      stage_kwargs={"keyframes": keyframes}).frames
        return frames, len(steps)

    default, n_default = run()
    assert n_default == 5  # the pipeline's default holds when the call sets no keyframe arguments
    fewer, n_fewer = run(num_inference_steps=2)
    assert n_fewer == 2 and not torch.allclose(default, fewer)
    explicit, _ = run(num_inference_steps=2, guidance_scale=1.0)  # the default guidance_scale=1.0 survives too
    torch.testing.assert_close(fewer, explicit)
    assert not torch.allclose(fewer, run(num_inference_steps=2, guidance_scale=5.0)[0])
