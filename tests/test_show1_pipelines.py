"""Show-1 stage pipelines and cascade on tiny random components built from config."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from fixtures_tiny import tiny_cascade, tiny_if_superres, tiny_scheduler, tiny_sr2

from motion_adapters.models import Show1UNet3DConditionModel
from motion_adapters.pipelines import (
    Show1CascadePipeline,
    Show1InterpolationPipeline,
    Show1KeyframesPipeline,
    Show1StagePipeline,
    Show1SuperResPipeline,
    combine_guidance,
    interpolated_num_frames,
    scheduler_step_per_frame,
    super_resolve_first_frame,
    super_resolve_video_latent,
    window_starts,
)
from motion_adapters.pipelines.show1_interpolation import interpolation_condition

FAST = {
    "keyframes": {"num_inference_steps": 2},
    "interpolation": {"num_inference_steps": 1},
    "sr1": {"num_inference_steps": 1, "height": 16, "width": 16},
}
SIZE = {"num_frames": 8, "height": 8, "width": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; two threads spin-wait badly on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cascade(tmp_path):
    return tiny_cascade(tmp_path)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def record_unet_inputs(unet):
    """Record (sample, class_labels) of every UNet call; returns the list and the hook handle."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].clone(), kwargs.get("class_labels")))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def component_state(cascade):
    """Everything a call must leave as it was: train/eval flags and scheduler configs and state."""
    state = {}
    for name, pipe in cascade._pipelines().items():
        for attr in ("unet", "text_encoder"):
            module = getattr(pipe, attr, None)
            if module is not None:
                state[f"{name}.{attr}.training"] = [m.training for m in module.modules()]
        for attr in ("scheduler", "image_noising_scheduler"):
            scheduler = getattr(pipe, attr, None)
            if scheduler is not None:
                state[f"{name}.{attr}"] = (
                    dict(scheduler.config),
                    scheduler.num_inference_steps,
                    scheduler.timesteps.tolist(),
                    getattr(scheduler, "_step_index", None),
                    len(getattr(scheduler, "model_outputs", []) or []),
                )
    return state


# --- end to end --------------------------------------------------------------------------------------------------


def test_cascade_runs_all_stages_with_show1_shapes(cascade):
    out = cascade("a cat runs", **SIZE, stage_kwargs=FAST, generator=seeded(), output_type="pt",
                  return_stage_outputs=True)  # fmt: skip
    shapes = {name: tuple(video.shape) for name, video in out.stage_frames.items()}
    assert shapes == {
        "keyframes": (1, 3, 8, 8, 8),
        "interpolation": (1, 3, 29, 8, 8),
        "sr1": (1, 3, 29, 16, 16),
    }
    torch.testing.assert_close(out.frames, out.stage_frames["sr1"])
    assert out.frames.abs().max() <= 1
    assert torch.isfinite(out.frames).all()


def test_cascade_stops_after_chosen_stage_and_returns_numpy(cascade):
    out = cascade(["a cat runs", "a dog jumps"], **SIZE, stages=("keyframes", "interpolation"), stage_kwargs=FAST,
                  generator=seeded(), output_type="np")  # fmt: skip
    assert out.frames.shape == (2, 29, 8, 8, 3)
    assert out.frames.min() >= 0 and out.frames.max() <= 1
    assert out.stage_frames is None


def test_keyframes_pil_output_has_one_list_of_frames_per_video(cascade):
    frames = cascade.keyframes("a cat runs", **SIZE, num_inference_steps=1, output_type="pil").frames
    assert len(frames) == 1 and len(frames[0]) == 8 and frames[0][0].size == (8, 8)


def test_interpolated_num_frames_places_keyframes_every_fourth_frame():
    assert interpolated_num_frames(8) == 29
    assert interpolated_num_frames(2) == 5
    assert window_starts(29) == [0, 7, 14, 21]
    assert window_starts(8) == [0]
    assert window_starts(15, window_size=8) == [0, 7]


# --- saving and loading --------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_gives_identical_output(cascade, tmp_path):
    cascade.first_frame_pipeline = tiny_if_superres()
    stage_kwargs = {**FAST, "first_frame": {"num_inference_steps": 2}}
    kwargs = {"prompt": "a red ball rolls", **SIZE, "stage_kwargs": stage_kwargs, "output_type": "pt"}
    expected = cascade(**kwargs, generator=seeded(3)).frames
    cascade.save_pretrained(tmp_path / "saved")
    loaded = Show1CascadePipeline.from_pretrained(tmp_path / "saved")
    assert loaded.stages == ("keyframes", "interpolation", "sr1")
    assert isinstance(loaded.sr1.unet, Show1UNet3DConditionModel)
    assert loaded.interpolation.text_encoder is None and loaded.first_frame_pipeline is not None
    loaded.first_frame_pipeline.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(**kwargs, generator=seeded(3)).frames, expected)


def test_from_pretrained_maps_showone_unet_entry_to_our_class(cascade, tmp_path):
    folder = tmp_path / "show-1-base"
    cascade.keyframes.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["showone.models.unet_3d_condition", "UNet3DConditionModel"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["_class_name"] = "UNet3DConditionModel"
    (folder / "unet" / "config.json").write_text(json.dumps(config))

    loaded = Show1KeyframesPipeline.from_pretrained(folder)
    assert type(loaded.unet) is Show1UNet3DConditionModel
    for (name, a), b in zip(cascade.keyframes.unet.state_dict().items(), loaded.unet.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    only_keyframes = Show1CascadePipeline.from_pretrained(base=folder, stages=("keyframes",))
    assert only_keyframes.stages == ("keyframes",)


def test_cascade_from_pretrained_rejects_folder_without_index(tmp_path):
    with pytest.raises(ValueError, match="has no cascade_index.json"):
        Show1CascadePipeline.from_pretrained(tmp_path)


# --- guidance and the scheduler ------------------------------------------------------------------------------------


@pytest.mark.parametrize("learned", [False, True])
def test_combine_guidance_guides_epsilon_and_keeps_text_variance_only_when_learned(learned):
    negative, text = torch.randn(2, 1, 6, 2, 3, 3).unbind(0)
    out = combine_guidance(torch.cat([negative, text]), guidance_scale=4.0, sample_channels=3,
                           do_classifier_free_guidance=True, learned_variance=learned)  # fmt: skip
    guided = negative[:, :3] + 4.0 * (text[:, :3] - negative[:, :3])
    expected = torch.cat([guided, text[:, 3:]], dim=1) if learned else guided
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("learned, channels", [(False, 3), (True, 6)])
def test_combine_guidance_without_guidance_passes_text_output(learned, channels):
    output = torch.randn(1, 6, 2, 3, 3)
    out = combine_guidance(output, guidance_scale=9.0, sample_channels=3, do_classifier_free_guidance=False,
                           learned_variance=learned)  # fmt: skip
    torch.testing.assert_close(out, output[:, :channels])


@pytest.mark.parametrize("variance_type, channels", [("fixed_small", 3), ("learned_range", 6)])
def test_keyframes_give_scheduler_variance_channels_only_when_learned(cascade, variance_type, channels):
    seen = []

    class RecordingScheduler(DPMSolverMultistepScheduler):
        def step(self, model_output, *args, **kwargs):
            seen.append(tuple(model_output.shape))
            return super().step(model_output, *args, **kwargs)

    pipe = cascade.keyframes
    pipe.scheduler = RecordingScheduler.from_config({**pipe.scheduler.config, "variance_type": variance_type})
    calls, handle = record_unet_inputs(pipe.unet)
    try:
        pipe(["a cat runs", "a dog jumps"], **SIZE, num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    finally:
        handle.remove()
    assert seen == [(2 * 8, channels, 8, 8)] * 2  # frames folded into the batch, both steps
    assert calls[0][0].shape[0] == 4  # negative and positive in one batch


def test_guidance_scale_one_runs_the_unet_on_one_batch(cascade):
    calls, handle = record_unet_inputs(cascade.keyframes.unet)
    try:
        cascade.keyframes("a cat runs", **SIZE, num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    finally:
        handle.remove()
    assert [sample.shape[0] for sample, _ in calls] == [1]


def test_scheduler_step_per_frame_thresholds_each_frame_alone():
    scheduler = tiny_scheduler()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    sample = torch.randn(2, 3, 4, 5, 5) * torch.tensor([0.5, 1.0, 4.0, 9.0]).view(1, 1, 4, 1, 1)
    output = torch.randn(2, 3, 4, 5, 5)
    folded = scheduler_step_per_frame(scheduler, output, t, sample)
    for b in range(2):
        for f in range(4):
            alone = tiny_scheduler()
            alone.set_timesteps(4)
            expected = alone.step(output[b : b + 1, :, f], t, sample[b : b + 1, :, f]).prev_sample
            torch.testing.assert_close(folded[b : b + 1, :, f], expected)


# --- stage behaviour -----------------------------------------------------------------------------------------------


def test_keyframes_accept_user_latents(cascade):
    pipe = cascade.keyframes
    noise = torch.randn(1, 3, 8, 8, 8, generator=seeded(5))
    kwargs = {"prompt": "a cat runs", **SIZE, "num_inference_steps": 2, "output_type": "pt"}
    from_latents = pipe(**kwargs, latents=noise, generator=seeded(1)).frames
    from_generator = pipe(**kwargs, generator=seeded(5)).frames
    torch.testing.assert_close(from_latents, from_generator)
    other = pipe(**kwargs, latents=torch.randn(1, 3, 8, 8, 8, generator=seeded(6))).frames
    assert not torch.allclose(from_latents, other)


def test_cascade_passes_latents_to_keyframe_stage_and_subclass_can_override_it(cascade):
    noise = torch.randn(1, 3, 8, 8, 8, generator=seeded(7))
    stage = cascade.keyframes("a cat runs", **SIZE, num_inference_steps=2, latents=noise, output_type="pt").frames
    out = cascade("a cat runs", **SIZE, stages=("keyframes",), stage_kwargs=FAST, latents=noise, output_type="pt")
    torch.testing.assert_close(out.frames, stage)

    class InvertedNoiseCascade(Show1CascadePipeline):
        def _run_keyframes(self, **kwargs):
            assert kwargs["latents"] is None
            return super()._run_keyframes(**{**kwargs, "latents": noise})

    sub = InvertedNoiseCascade(cascade.keyframes, cascade.interpolation, cascade.sr1)
    torch.testing.assert_close(
        sub("a cat runs", **SIZE, stages=("keyframes",), stage_kwargs=FAST, output_type="pt").frames, stage
    )


def test_interpolation_condition_interpolates_end_frames_with_end_mask():
    pairs = torch.zeros(1, 3, 5, 2, 2)
    pairs[:, :, 0], pairs[:, :, -1] = -1.0, 1.0
    condition = interpolation_condition(pairs)
    torch.testing.assert_close(condition[0, :3, :, 0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).expand(3, 5))
    torch.testing.assert_close(condition[0, 3, :, 0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]))


def test_interpolation_conditions_every_pair_on_its_keyframes_from_one_noise(cascade):
    keyframes = torch.rand(1, 3, 4, 8, 8, generator=seeded(2)) * 2 - 1
    calls, handle = record_unet_inputs(cascade.interpolation.unet)
    first_latents = []

    def keep_first(pipe, step, t, tensors):
        first_latents.append(tensors["latents"])
        return tensors

    try:
        out = cascade.interpolation(video=keyframes, prompt_embeds=torch.randn(1, 77, 64), num_inference_steps=1,
                                    guidance_scale=1.0, output_type="pt", callback_on_step_end=keep_first)  # fmt: skip
    finally:
        handle.remove()
    sample = calls[0][0]  # (3 pairs, 7, 5, 8, 8)
    assert sample.shape == (3, 7, 5, 8, 8) and out.frames.shape == (1, 3, 13, 8, 8)
    for pair in range(3):
        torch.testing.assert_close(sample[pair, 3:6, 0], keyframes[0, :, pair])
        torch.testing.assert_close(sample[pair, 3:6, -1], keyframes[0, :, pair + 1])
        torch.testing.assert_close(sample[pair, 6, :, 0, 0], torch.tensor([1.0, 0, 0, 0, 1]))
        torch.testing.assert_close(sample[pair, :3], sample[0, :3])  # one shared initial noise
    windows = first_latents[-1].clamp(-1, 1)
    torch.testing.assert_close(out.frames[0, :, 1:4], windows[0, :, 1:4])
    torch.testing.assert_close(out.frames[0, :, 4:8], windows[1, :, :4])  # keyframe 1 lands at frame 4
    torch.testing.assert_close(out.frames[0, :, 8:], windows[2])  # a window's first frame overwrites the last


def test_sr1_conditions_windows_on_noise_level_and_previous_window(cascade):
    video = torch.rand(1, 3, 15, 8, 8, generator=seeded(4)) * 2 - 1
    first = torch.rand(1, 3, 16, 16, generator=seeded(8)) * 2 - 1
    calls, handle = record_unet_inputs(cascade.sr1.unet)
    window_ends = []

    def keep_last(pipe, step, t, tensors):
        if step == 1:
            window_ends.append(tensors["latents"])

    try:
        out = cascade.sr1(video=video, prompt_embeds=torch.randn(1, 77, 64),
                          negative_prompt_embeds=torch.zeros(1, 77, 64), height=16, width=16, first_frame=first,
                          num_inference_steps=2, guidance_scale=3.0, noise_level=250, output_type="pt",
                          callback_on_step_end=keep_last)  # fmt: skip
    finally:
        handle.remove()
    assert out.frames.shape == (1, 3, 15, 16, 16) and len(calls) == 4  # 2 windows x 2 steps
    for sample, class_labels in calls:
        assert sample.shape == (2, 6, 8, 16, 16)  # negative and positive, 3 noisy + 3 condition channels
        assert class_labels.tolist() == [250, 250]
    torch.testing.assert_close(calls[0][0][1, 3:, 0], first[0])
    torch.testing.assert_close(calls[2][0][1, 3:, 0], window_ends[0][0, :, -1])
    torch.testing.assert_close(calls[0][0][:, :3], calls[2][0][:, :3])  # one shared initial noise
    torch.testing.assert_close(out.frames[:, :, 7:], window_ends[1].clamp(-1, 1))


def test_sr1_without_first_frame_upsamples_it_bilinearly(cascade):
    video = torch.rand(1, 3, 8, 8, 8, generator=seeded(4)) * 2 - 1
    calls, handle = record_unet_inputs(cascade.sr1.unet)
    try:
        cascade.sr1(video=video, prompt_embeds=torch.randn(1, 77, 64), guidance_scale=1.0, height=16, width=16,
                    num_inference_steps=1, output_type="pt")  # fmt: skip
    finally:
        handle.remove()
    upsampled = torch.nn.functional.interpolate(video[:, :, 0], size=(16, 16), mode="bilinear", align_corners=True)
    torch.testing.assert_close(calls[0][0][0, 3:, 0], upsampled[0])


def test_sr1_takes_first_frame_from_if_superresolution(cascade):
    if_sr = tiny_if_superres()
    before = (if_sr.scheduler.num_inference_steps, if_sr.scheduler.timesteps.tolist())
    video = torch.rand(1, 3, 8, 8, 8, generator=seeded(4)) * 2 - 1
    embeds = {"prompt_embeds": torch.randn(1, 77, 64), "negative_prompt_embeds": torch.zeros(1, 77, 64)}
    first_kwargs = {"num_inference_steps": 2, "noise_level": 150}
    calls, handle = record_unet_inputs(cascade.sr1.unet)
    try:
        cascade.sr1(video=video, **embeds, height=16, width=16, num_inference_steps=1, first_frame_pipeline=if_sr,
                    first_frame_kwargs=first_kwargs, generator=seeded(0), output_type="pt")  # fmt: skip
    finally:
        handle.remove()
    generator = seeded(0)
    for _ in range(2):  # SR1 draws its initial noise and its condition noise first
        torch.randn(1, 3, 8, 16, 16, generator=generator)
    expected = super_resolve_first_frame(if_sr, video[:, :, 0], embeds["prompt_embeds"],
                                         embeds["negative_prompt_embeds"], 16, 16, generator=generator,
                                         **first_kwargs)  # fmt: skip
    torch.testing.assert_close(calls[0][0][1, 3:, 0], expected[0])
    assert (if_sr.scheduler.num_inference_steps, if_sr.scheduler.timesteps.tolist()) == before
    with pytest.raises(ValueError, match="at most one of first_frame and first_frame_pipeline"):
        cascade.sr1(video=video, **embeds, first_frame=expected, first_frame_pipeline=if_sr)


def test_sr2_adapter_resizes_and_returns_pixels(cascade):
    sr2 = tiny_sr2()
    before = (sr2.scheduler.num_inference_steps, sr2.scheduler.timesteps.tolist())
    video = torch.rand(1, 3, 8, 8, 8, generator=seeded(1)) * 2 - 1
    out = super_resolve_video_latent(sr2, video, "a cat runs", height=16, width=24, num_inference_steps=2,
                                     generator=seeded(0))  # fmt: skip
    assert out.shape == (1, 3, 8, 16, 24) and out.abs().max() <= 1
    assert (sr2.scheduler.num_inference_steps, sr2.scheduler.timesteps.tolist()) == before


def test_sr2_kernel_choices_are_validated_and_run_for_the_call_only():
    from motion_adapters.pipelines.show1_superres import SR2Kernels

    sr2 = tiny_sr2()
    video = torch.rand(1, 3, 4, 8, 8, generator=seeded(1)) * 2 - 1
    kwargs = {"height": 16, "width": 16, "num_inference_steps": 2}
    with pytest.raises(ValueError, match="memory format must be one of"):
        super_resolve_video_latent(sr2, video, "a cat runs", memory_format="nhwc", **kwargs)
    with pytest.raises(ValueError, match=r"pass temporal_kernels='auto' or 'library' \(stage_kwargs="):
        SR2Kernels(sr2.unet, "triton_attention", "auto", "auto", "auto")._kernels_in_use()  # Triton off CUDA
    assert SR2Kernels(sr2.unet, "auto", "auto", "auto", "auto")._kernels_in_use() == ("library", "torch")  # CPU
    outputs = {}
    for layout in ("contiguous", "channels_last"):
        outputs[layout] = super_resolve_video_latent(sr2, video, "a cat runs", memory_format=layout,
                                                     generator=seeded(0), **kwargs)  # fmt: skip
        assert all(m.weight.is_contiguous() for m in sr2.unet.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(outputs["channels_last"], outputs["contiguous"], atol=1e-4, rtol=0)


def test_graphed_unet_calls_route_plain_calls_and_restore_the_forward():
    from motion_adapters.pipelines._kernels import graphed_unet_calls
    from motion_adapters.pipelines.show1_superres import SR2Kernels

    unet = tiny_sr2().unet.eval()
    kernels = SR2Kernels(unet, "auto", "auto", "auto", "auto")
    x, t, text = torch.randn(1, 4, 3, 8, 8, generator=seeded(1)), torch.tensor(10), torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=text).sample
        with graphed_unet_calls(unet, kernels):  # no graph in use: nothing changes
            assert "forward" not in vars(unet)
        routed = []
        kernels._graphed = object()  # as inside `_temporal_kernels()` with a graph; off CUDA the call runs eagerly
        kernels._unet_output = lambda *args, **kw: routed.append(1) or SR2Kernels._unet_output(kernels, *args, **kw)
        with graphed_unet_calls(unet, kernels):
            tuple_out = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            dict_out = unet(x, t, encoder_hidden_states=text).sample
            unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"scale": 1.0})  # not routed
        assert "forward" not in vars(unet) and len(routed) == 2
    torch.testing.assert_close(tuple_out, expected)
    torch.testing.assert_close(dict_out, expected)


def test_cascade_with_sr2_runs_and_round_trips(cascade, tmp_path):
    full = Show1CascadePipeline(cascade.keyframes, sr2=tiny_sr2())
    kwargs = {
        "prompt": "a cat runs",
        **SIZE,
        "stage_kwargs": {"sr2": {"num_inference_steps": 2, "height": 16, "width": 16}, **FAST},
        "output_type": "pt",
    }
    frames = full(**kwargs, generator=seeded(2)).frames
    assert frames.shape == (1, 3, 8, 16, 16)
    full.save_pretrained(tmp_path / "saved")
    loaded = Show1CascadePipeline.from_pretrained(tmp_path / "saved")
    assert loaded.stages == ("keyframes", "sr2") and loaded.sr2.vae.use_slicing
    loaded.sr2.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(**kwargs, generator=seeded(2)).frames, frames)
    # SR2's kernel choices go through stage_kwargs like its other arguments
    kwargs["stage_kwargs"]["sr2"].update(memory_format="channels_last", cuda_graph="no")
    torch.testing.assert_close(loaded(**kwargs, generator=seeded(2)).frames, frames, atol=1e-4, rtol=0)
    kwargs["stage_kwargs"]["sr2"]["memory_format"] = "nhwc"
    keyframe_calls, handle = record_unet_inputs(loaded.keyframes.unet)
    try:
        with pytest.raises(ValueError, match="memory format must be one of"):
            loaded(**kwargs, generator=seeded(2))
    finally:
        handle.remove()
    assert keyframe_calls == []  # refused before any stage ran


# --- components are left as they were -------------------------------------------------------------------------------


def test_call_samples_in_eval_mode_and_leaves_components_unchanged(cascade):
    cascade.keyframes.unet.train()
    cascade.keyframes.text_encoder.train()
    before = component_state(cascade)
    modes = []

    def record_mode(pipe, step, t, tensors):
        modes.append(pipe.unet.training)
        return tensors

    cascade("a cat runs", **SIZE, stage_kwargs=FAST, output_type="pt", callback_on_step_end=record_mode)
    assert modes and not any(modes)
    assert component_state(cascade) == before


def test_error_in_a_stage_leaves_components_unchanged(cascade):
    cascade.sr1.unet.train()
    before = component_state(cascade)

    sr1_steps = []

    def fail_in_sr1(pipe, step, t, tensors):
        sr1_steps.extend([step] if pipe is cascade.sr1 else [])
        if len(sr1_steps) == 2:  # first step of the second window
            raise RuntimeError("stop here")
        return tensors

    with pytest.raises(RuntimeError, match="stop here"):
        cascade("a cat runs", **SIZE, stage_kwargs=FAST, output_type="pt", callback_on_step_end=fail_in_sr1)
    assert component_state(cascade) == before
    assert cascade.sr1.unet.training


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 9}, "multiples of 2"),
        ({"prompt": None}, "exactly one of prompt"),
        ({"prompt_embeds": torch.zeros(1, 77, 64)}, "exactly one of prompt"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 77, 32)}, r"\(batch, length, 64\)"),
        ({"latents": torch.zeros(1, 3, 7, 8, 8)}, "latents has shape"),
        ({"output_type": "latent"}, "output_type='latent' is not supported"),
        ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, "offers \\['latents'\\]"),
        ({"negative_prompt": ["", ""]}, "negative_prompt has 2 entries"),
    ],
)
def test_keyframes_reject_bad_input_with_message(cascade, kwargs, message):
    call = {"prompt": "a cat runs", **SIZE, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        cascade.keyframes(**call)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_frames": 7}, "num_frames=7 keyframes give 25 frames before SR1, which SR1 cannot place"),
        ({"stages": ("interpolation", "sr1")}, "must start with 'keyframes'"),
        ({"stages": ("keyframes", "sr1", "interpolation")}, "in the order"),
        ({"stages": ("keyframes", "sr2")}, r"asks for \['sr2'\], which this cascade has not loaded"),
        ({"stage_kwargs": {"sr3": {}}}, r"unknown stages \['sr3'\]"),
        ({"stage_kwargs": {"keyframes": {"height": 16}}}, r"sets \['height'\]"),
        ({"stage_kwargs": {"sr1": {"height": 15, "width": 16}}}, "SR1 output 15 x 16 must be a multiple of 2"),
    ],
)
def test_cascade_rejects_bad_input_before_running(cascade, kwargs, message):
    calls, handle = record_unet_inputs(cascade.keyframes.unet)
    try:
        with pytest.raises(ValueError, match=message):
            cascade(**{"prompt": "a cat runs", **SIZE, "stage_kwargs": FAST, **kwargs})
    finally:
        handle.remove()
    assert calls == []


def test_stages_reject_inputs_they_cannot_place(cascade):
    embeds = {"prompt_embeds": torch.zeros(1, 77, 64)}
    with pytest.raises(ValueError, match="needs at least 2 keyframes"):
        cascade.interpolation(video=torch.zeros(1, 3, 1, 8, 8), **embeds)
    with pytest.raises(ValueError, match="num_frames=10 cannot be split into windows of 8"):
        cascade.sr1(video=torch.zeros(1, 3, 10, 8, 8), **embeds)
    with pytest.raises(ValueError, match="in_channels=3; the interpolation stage needs 7"):
        type(cascade.interpolation)(None, None, cascade.keyframes.unet, tiny_scheduler())(
            video=torch.zeros(1, 3, 2, 8, 8), **embeds
        )
    with pytest.raises(ValueError, match="noise_level=1000 must be in"):
        cascade.sr1(video=torch.zeros(1, 3, 8, 8, 8), noise_level=1000, **embeds)
    with pytest.raises(ValueError, match="no tokenizer or text_encoder"):
        cascade.sr1(video=torch.zeros(1, 3, 8, 8, 8), prompt="a cat runs")
    with pytest.raises(ValueError, match="pass prompt, not only embeddings"):
        Show1CascadePipeline(cascade.keyframes, sr2=object())(**embeds, **SIZE, stages=("keyframes", "sr2"))


def test_cascade_requires_keyframe_stage_with_text_encoder(cascade):
    with pytest.raises(ValueError, match="with its tokenizer and text_encoder"):
        Show1CascadePipeline(cascade.interpolation)
    assert np.isfinite(cascade.keyframes.encode_prompt("a cat")[0].numpy()).all()


def test_stage_temporal_kernels_run_the_same_function_and_are_restored_after_the_call(cascade):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from motion_adapters.training_step import FrameConv, ShortSequenceAttnProcessor

    pipe, unet = cascade.interpolation, cascade.interpolation.unet
    keyframes = torch.rand(1, 3, 3, 8, 8, generator=seeded(3)) * 2 - 1
    embeds = torch.randn(1, 77, 64, generator=seeded(4))
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    assert pipe.temporal_kernels == "auto" and type(pipe)._gpu_temporal_kernels == "triton_attention"
    seen = []

    def record(pipe_, step, t, tensors):
        seen.append({type(p) for name, p in unet.attn_processors.items() if ".temp_attentions." in f".{name}"})
        seen[-1] |= {type(m) for m in unet.modules() if isinstance(m, FrameConv)}
        return tensors

    outputs = {}
    for choice in ("library", "fast", "auto"):  # "auto" on the CPU runs the library's layers
        pipe.set_temporal_kernels(choice)
        outputs[choice] = pipe(video=keyframes, prompt_embeds=embeds, num_inference_steps=2, guidance_scale=1.0,
                               generator=seeded(5), output_type="pt", callback_on_step_end=record).frames  # fmt: skip
        assert {name: type(p) for name, p in unet.attn_processors.items()} == before  # restored after the call
        assert not any(isinstance(m, FrameConv) for m in unet.modules())
    assert seen[0] == {AttnProcessor2_0} and seen[2] == {ShortSequenceAttnProcessor, FrameConv} and seen[4] == seen[0]
    torch.testing.assert_close(outputs["fast"], outputs["library"], atol=1e-4, rtol=0)  # float32 rounding
    assert torch.equal(outputs["auto"], outputs["library"])
    with pytest.raises(ValueError, match="temporal kernels must be one of"):
        pipe.set_temporal_kernels("turbo")


def test_stage_norm_kernels_are_validated_and_triton_off_a_gpu_is_refused(cascade):
    pipe = cascade.keyframes
    assert pipe.norm_kernels == "auto"
    with pytest.raises(ValueError, match="norm kernels must be one of"):
        pipe.set_norm_kernels("cudnn")
    pipe.set_norm_kernels("triton")
    try:
        with pytest.raises(ValueError, match=r"norm_kernels='triton' needs the UNet on a CUDA device .* on cpu"):
            pipe(prompt_embeds=torch.randn(1, 77, 64), num_inference_steps=1, output_type="pt")
    finally:
        pipe.set_norm_kernels("auto")
    assert all("forward" not in vars(m) for m in pipe.unet.modules())


@pytest.mark.parametrize("triton_usable", [True, False])
@pytest.mark.parametrize(
    ("stage", "on_gpu"),
    [
        (Show1KeyframesPipeline, ("triton_attention", "triton", "channels_last")),
        (Show1InterpolationPipeline, ("triton_attention", "triton", "channels_last")),
        (Show1SuperResPipeline, ("triton_attention", "triton", "channels_last")),
    ],
)
def test_auto_stage_kernels_follow_the_measurements_and_fall_back_without_triton(
    monkeypatch, stage, on_gpu, triton_usable
):
    import types

    import motion_adapters.pipelines._kernels as kernels_module

    monkeypatch.setattr(kernels_module, "fused_norm_available", lambda x=None: triton_usable)
    fallback = {"triton_attention": "math_attention"}

    def in_use(device, temporal="auto", norms="auto", graph="auto"):
        pipe = types.SimpleNamespace(unet=types.SimpleNamespace(device=torch.device(device)),
                                     temporal_kernels=temporal, norm_kernels=norms, memory_format="auto",
                                     cuda_graph=graph, _gpu_temporal_kernels=stage._gpu_temporal_kernels,
                                     _gpu_norm_kernels=stage._gpu_norm_kernels,
                                     _gpu_memory_format=stage._gpu_memory_format,
                                     _gpu_eager_choices=stage._gpu_eager_choices)  # fmt: skip
        pipe._graphs_run = lambda: Show1StagePipeline._graphs_run(pipe)
        pipe._gpu_auto_choices = lambda: Show1StagePipeline._gpu_auto_choices(pipe)
        pipe._fix = lambda *args: Show1StagePipeline._fix(pipe, *args)
        return (*Show1StagePipeline._kernels_in_use(pipe), Show1StagePipeline._memory_format_in_use(pipe))

    # without Triton: the SDPA twin, PyTorch's norms, and contiguous activations (the layout needs the fused norms)
    expected = on_gpu if triton_usable else (fallback.get(on_gpu[0], on_gpu[0]), "torch", "contiguous")
    assert in_use("cuda") == expected
    # eager UNet calls: the keyframes keep PyTorch's norms, contiguous (faster launched from Python); the others
    # keep their choices
    eager = (expected[0], "torch", "contiguous") if stage is Show1KeyframesPipeline else expected
    assert in_use("cuda", graph="no") == eager
    assert in_use("cpu") == ("library", "torch", "contiguous")
    if not triton_usable:
        with pytest.raises(ValueError, match=r"set_temporal_kernels\('auto'\)"):
            in_use("cuda", temporal="triton_attention")[0]


def test_stage_memory_format_is_validated_and_runs_the_layout_for_the_call_only(cascade):
    pipe, unet = cascade.keyframes, cascade.keyframes.unet
    assert pipe.memory_format == "auto" and pipe._memory_format_in_use() == "contiguous"  # on the CPU
    with pytest.raises(ValueError, match="memory format must be one of"):
        pipe.set_memory_format("nhwc")
    layouts = {}
    for choice in ("contiguous", "channels_last"):
        pipe.set_memory_format(choice)
        with pipe._temporal_kernels():  # the context every stage's denoising loop runs in (tests/test_layout.py
            # checks the channels-last UNet samples like the contiguous one)
            layouts[choice] = unet.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    pipe.set_memory_format("auto")
    assert layouts == {"contiguous": False, "channels_last": True}
    assert unet.conv_out.weight.is_contiguous() and all("forward" not in vars(m) for m in unet.modules())


def test_stage_cuda_graph_is_validated_and_off_cuda_calls_the_unet_eagerly(cascade):
    pipe = cascade.keyframes
    assert pipe.cuda_graph == "auto"
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        pipe.set_cuda_graph("always")
    calls, handle = record_unet_inputs(pipe.unet)
    try:
        pipe(prompt_embeds=torch.randn(1, 77, 64), num_inference_steps=3, output_type="pt")
    finally:
        handle.remove()
    assert len(calls) == 3 and pipe._graphed is None  # on the CPU every step calls the UNet itself


def test_graphed_call_runs_eagerly_then_captures_and_falls_back_when_capture_fails(monkeypatch):
    from motion_adapters.pipelines._graph import GraphedCall

    seen = []
    call = GraphedCall(lambda x: seen.append(x.shape) or x * 2)
    monkeypatch.setattr(call, "_capture", lambda tensors: (_ for _ in ()).throw(RuntimeError("not capturable")))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    x = torch.ones(2)
    assert torch.equal(call(x), x * 2) and not call.eager  # the first call: eager, no capture yet
    assert torch.equal(call(x), x * 2) and call.eager  # the capture failed: eager from now on, with a warning
    strict = GraphedCall(lambda x: x, strict=True)
    monkeypatch.setattr(strict, "_capture", lambda tensors: (_ for _ in ()).throw(RuntimeError("not capturable")))
    strict(x)
    with pytest.raises(RuntimeError, match="not capturable"):
        strict(x)


@pytest.mark.gpu
def test_stage_calls_replay_from_a_cuda_graph_like_eager_calls(tmp_path, monkeypatch):
    cascade = tiny_cascade(tmp_path).to("cuda")
    pipe = cascade.keyframes
    # the same kernels with and without the graph ("auto" runs the keyframes' eager calls on PyTorch's norms,
    # contiguous), and float32 convolutions in float32 (cuDNN's TF32 differs between algorithms)
    pipe.set_norm_kernels("triton")
    pipe.set_memory_format("channels_last")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    outputs, replays = {}, {}
    for choice in ("no", "yes"):
        pipe.set_cuda_graph(choice)
        seen = []

        def record(pipe_, step, t, tensors):
            seen.append(pipe_._graphed.replays if pipe_._graphed is not None else 0)
            return tensors

        outputs[choice] = pipe(prompt_embeds=torch.randn(1, 77, 64, generator=seeded(1)).to("cuda"),
                               num_inference_steps=4, generator=torch.Generator("cuda").manual_seed(2),
                               output_type="pt", callback_on_step_end=record).frames  # fmt: skip
        replays[choice] = seen
    pipe.set_cuda_graph("auto")
    pipe.set_norm_kernels("auto")
    pipe.set_memory_format("auto")
    assert replays == {"no": [0, 0, 0, 0], "yes": [0, 1, 2, 3]}  # eager first, captured second, replayed after
    assert pipe._graphed is None
    torch.testing.assert_close(outputs["yes"], outputs["no"], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_sr2_calls_replay_from_a_cuda_graph_like_eager_calls(monkeypatch):
    import motion_adapters.pipelines._kernels as kernels_module

    replays = []

    class Counting(kernels_module.GraphedCall):
        def close(self):
            replays.append(self.replays)
            super().close()

    monkeypatch.setattr(kernels_module, "GraphedCall", Counting)
    sr2 = tiny_sr2().to("cuda")
    video = (torch.rand(1, 3, 4, 8, 8, generator=seeded(1)) * 2 - 1).cuda()
    outputs = {
        choice: super_resolve_video_latent(sr2, video, "a cat runs", height=16, width=16, num_inference_steps=5,
                                           cuda_graph=choice, generator=torch.Generator("cuda").manual_seed(0))
        for choice in ("no", "yes")
    }  # fmt: skip
    assert replays == [3]  # 4 steps (strength 0.8 of 5): eager first, captured second, replayed after
    assert "forward" not in vars(sr2.unet)
    torch.testing.assert_close(outputs["yes"], outputs["no"], rtol=0, atol=1e-4)


def test_encode_prompt_encodes_prompt_and_negative_in_one_t5_pass_with_the_same_embeddings(cascade):
    pipe = cascade.keyframes
    calls = []
    forward = pipe.text_encoder.forward

    def counting(input_ids, **kwargs):
        calls.append(input_ids.shape[0])
        return forward(input_ids, **kwargs)

    embeds, negative = pipe.encode_prompt(["a cat runs", "a dog jumps"], "blurry")
    pipe.text_encoder.forward = counting
    try:
        again, again_negative = pipe.encode_prompt(["a cat runs", "a dog jumps"], "blurry")
        alone = pipe.encode_prompt("a dog jumps", do_classifier_free_guidance=False)[0]
    finally:
        del pipe.text_encoder.forward
    assert calls == [4, 1]  # prompts and negatives together, then one prompt without guidance
    torch.testing.assert_close(again, embeds)
    torch.testing.assert_close(again_negative, negative)
    torch.testing.assert_close(alone[0], embeds[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(negative[0], negative[1])


def test_text_encoder_offload_streams_t5_blocks_and_keeps_its_weights_on_the_cpu(cascade):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from motion_adapters.pipelines._utils import _path_to_blocks, stream_blocks

    encoder = cascade.keyframes.text_encoder
    assert _path_to_blocks(encoder) == ["encoder"]  # T5EncoderModel.encoder.block
    before = cascade.encode_prompt("a cat runs")
    with pytest.raises(ValueError, match="use_stream=True needs a CUDA device"):
        cascade.enable_text_encoder_offload("cpu", use_stream=True)
    cascade.enable_text_encoder_offload("cpu")
    cascade.enable_text_encoder_offload("cpu")  # a second call does nothing
    cascade.to("cpu")  # moving the pipelines leaves the group-offloaded T5 to its hooks
    assert _is_group_offload_enabled(encoder)
    assert all(p.device.type == "cpu" for p in encoder.parameters())
    after = cascade.encode_prompt("a cat runs")
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="no ModuleList of blocks"):
        stream_blocks(torch.nn.Linear(2, 2), "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_text_encoder_offload_on_cuda_matches_a_resident_encoder_and_leaves_it_on_the_cpu(cascade):
    resident = copy.deepcopy(cascade.keyframes.text_encoder).cuda()
    cascade.enable_text_encoder_offload("cuda")
    encoded = cascade.keyframes.tokenizer(["a cat runs", ""], padding="max_length", max_length=77, return_tensors="pt")
    tokens, mask = encoded.input_ids.cuda(), encoded.attention_mask.cuda()
    with torch.no_grad():
        streamed = cascade.keyframes.text_encoder(tokens, attention_mask=mask).last_hidden_state
        expected = resident(tokens, attention_mask=mask).last_hidden_state
    assert streamed.device.type == "cuda"
    assert all(p.device.type == "cpu" for p in cascade.keyframes.text_encoder.parameters())
    torch.testing.assert_close(streamed, expected)
