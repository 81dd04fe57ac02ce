"""Score a pretraining run's stages: keyframe look and motion, motion-word reading, interpolation and SR fidelity.

``python -m motion_adapters.world.pretrain`` runs these after the stages it trains and writes their results into
``training_log.json``; ``benchmarks/keyframe_recipes.py`` reads them back.

Example:
    >>> from motion_adapters.world.default_model import load_default_components
    >>> evaluate_motion_reading(load_default_components(), num_clips=8)["opposite_over_true"]  # doctest: +SKIP
    0.999
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from ..metrics import appearance_check, video_motion_fidelity
from .default_model import KEYFRAME_SIZE, NOISE_SCHEDULER_CONFIG, NUM_KEYFRAMES, SCHEDULER_CONFIG, SR_SIZE
from .pretrain_data import TIMELINE, SpecPool, tokenize_captions
from .render import render_clip
from .spec import sample_spec
from .vocab import TRAIN_MOTIONS

__all__ = [
    "evaluate_keyframe_stage",
    "evaluate_keyframes",
    "evaluate_motion_at_pure_noise",
    "evaluate_motion_reading",
    "evaluate_upsampling",
    "evaluate_upsampling_stages",
    "save_grid",
]


@torch.no_grad()
def evaluate_keyframes(
    pipeline,
    num_samples: int,
    seed: int = 1234,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
) -> tuple[dict[str, Any], list[torch.Tensor], list]:
    """Sample keyframes for captions of fresh seen-motion specs and score appearance and motion.

    For each spec, the generated 8 x 32 x 32 clip is scored with ``appearance_check`` (color, shape, background)
    and ``video_motion_fidelity`` against the spec's own rendering (same caption; start and size may differ, which
    these metrics ignore: paths are compared from a common start).

    Args:
        pipeline: A ``Show1KeyframesPipeline``.
        num_samples: Captions to sample; motions cycle through ``TRAIN_MOTIONS``.
        seed: Seed of the specs and of the sampling noise.
        num_inference_steps: Sampling steps.
        guidance_scale: Classifier-free guidance weight.
        batch_size: Captions per pipeline call.

    Returns:
        ``(metrics, videos, specs)``: the mean scores (overall and per motion), the (3, 8, 32, 32) clips, the specs.

    Example:
        >>> metrics, videos, specs = evaluate_keyframes(cascade.keyframes, 11)  # doctest: +SKIP
        >>> metrics["appearance_accuracy"]  # doctest: +SKIP
    """
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, motions=(TRAIN_MOTIONS[i % len(TRAIN_MOTIONS)],)) for i in range(num_samples)]
    device = pipeline._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    videos = []
    for start in range(0, num_samples, batch_size):
        chunk = specs[start : start + batch_size]
        frames = pipeline(
            [spec.caption for spec in chunk], num_frames=NUM_KEYFRAMES, height=KEYFRAME_SIZE, width=KEYFRAME_SIZE,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            output_type="pt",
        ).frames  # fmt: skip
        videos.extend(frames.float().cpu())
    rows = []
    for video, spec in zip(videos, specs):
        appearance = appearance_check(video, spec)
        motion = video_motion_fidelity(video, render_clip(spec, NUM_KEYFRAMES, KEYFRAME_SIZE, KEYFRAME_SIZE))
        row = {"motion": spec.motion, **{k: float(appearance[k]) for k in ("color", "shape", "background")}}
        row.update({k: float(motion[k]) for k in ("displacement_cosine", "scale_agreement", "tracked_fraction")})
        rows.append(row)

    def mean(key: str, motions: tuple[str, ...] = TRAIN_MOTIONS) -> float | None:
        values = [r[key] for r in rows if r["motion"] in motions and np.isfinite(r[key])]
        return round(float(np.mean(values)), 4) if values else None

    translations = tuple(m for m in TRAIN_MOTIONS if m not in ("still", "growing", "shrinking"))
    metrics = {
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "appearance_accuracy": round(
            float(np.mean([(r["color"] + r["shape"] + r["background"]) / 3 for r in rows])), 4
        ),
        "color_accuracy": mean("color"),
        "shape_accuracy": mean("shape"),
        "background_accuracy": mean("background"),
        "tracked_fraction": mean("tracked_fraction"),
        "translation_displacement_cosine": mean("displacement_cosine", translations),
        "still_displacement_cosine": mean("displacement_cosine", ("still",)),
        "growing_shrinking_scale_agreement": mean("scale_agreement", ("growing", "shrinking")),
        "per_motion_displacement_cosine": {m: mean("displacement_cosine", (m,)) for m in TRAIN_MOTIONS},
    }
    return metrics, videos, specs


def _psnr(video: torch.Tensor, reference: torch.Tensor, frames: torch.Tensor | slice = slice(None)) -> float:
    """PSNR in dB of [-1, 1] videos (B, 3, F, H, W) over the chosen frames, on the [0, 1] scale."""
    mse = ((video.float() - reference.float())[:, :, frames] / 2).pow(2).mean().item()
    return round(10 * math.log10(1 / max(mse, 1e-12)), 2)


@torch.no_grad()
def evaluate_upsampling(
    interpolation,
    sr,
    num_samples: int,
    seed: int = 4321,
    interpolation_steps: tuple[int, ...] = (6, 10),
    sr_steps: tuple[int, ...] = (4, 10),
    noise_level: int = 100,
) -> dict[str, Any]:
    """Score interpolation and super-resolution on ground-truth inputs of fresh seen-motion clips (PSNR, dB).

    Interpolation gets the true 8 keyframes (32 x 32) and is compared with the true 29 frames on the 21 frames
    between keyframes, beside the trilinear interpolation of the keyframes (its condition alone). Super-resolution
    gets the true 29 frames of 32 x 32 and is compared with the true 96 x 96 frames, beside bilinear upsampling.
    Both run without guidance, as ``DEFAULT_CALL_KWARGS`` does.

    Args:
        interpolation: A ``Show1InterpolationPipeline`` with tokenizer and text encoder.
        sr: A ``Show1SuperResPipeline`` with tokenizer and text encoder.
        num_samples: Clips to score.
        seed: Seed of the clips and of the sampling noise.
        interpolation_steps: Step counts to score the interpolation stage at.
        sr_steps: Step counts to score the SR stage at.
        noise_level: SR condition noise level.

    Returns:
        ``{"interpolation": {"psnr_trilinear", "psnr_<n>_steps", ...}, "sr": {"psnr_bilinear", ...}}``.

    Example:
        >>> evaluate_upsampling(cascade.interpolation, cascade.sr1, 4)["sr"]["psnr_bilinear"]  # doctest: +SKIP
    """
    from ..pipelines.show1_superres import upsample_frames
    from .pretrain_data import render_frames

    device = interpolation._execution_device
    pool = SpecPool(num_samples, seed=seed).to(device)
    args = (pool.shapes, pool.colors, pool.backgrounds)
    low = render_frames(pool.centers, pool.diameters, *args, KEYFRAME_SIZE).float()
    high = render_frames(pool.centers, pool.diameters, *args, SR_SIZE).float()
    keyframes = low[:, :, ::4]
    between = torch.tensor([i % 4 != 0 for i in range(TIMELINE)], device=device)
    trilinear = F.interpolate(keyframes, size=low.shape[2:], mode="trilinear", align_corners=True)
    bilinear = upsample_frames(low, SR_SIZE, SR_SIZE)
    result = {
        "num_samples": num_samples,
        "interpolation": {"psnr_trilinear": _psnr(trilinear, low, between)},
        "sr": {"noise_level": noise_level, "psnr_bilinear": _psnr(bilinear, high)},
    }
    for steps in interpolation_steps:
        generator = torch.Generator(device=device).manual_seed(seed)
        video = interpolation(
            video=keyframes, prompt=pool.captions, num_inference_steps=steps, guidance_scale=1.0,
            generator=generator, output_type="pt",
        ).frames  # fmt: skip
        result["interpolation"][f"psnr_{steps}_steps"] = _psnr(video, low, between)
    for steps in sr_steps:
        generator = torch.Generator(device=device).manual_seed(seed)
        video = sr(
            video=low, prompt=pool.captions, height=SR_SIZE, width=SR_SIZE, num_inference_steps=steps,
            guidance_scale=1.0, noise_level=noise_level, generator=generator, output_type="pt",
        ).frames  # fmt: skip
        result["sr"][f"psnr_{steps}_steps"] = _psnr(video, high)
    return result


def save_grid(videos: list[torch.Tensor], path: str | os.PathLike, scale: int = 2) -> Path:
    """Write clips as a PNG grid: one row per clip, one column per frame, pixels enlarged ``scale`` times.

    Example:
        >>> save_grid([render_clip(sample_spec(0))], "grid.png")
        PosixPath('grid.png')
    """
    from PIL import Image

    rows = [torch.cat(list(video.unbind(1)), dim=2) for video in videos]  # (3, H, F * W) each
    grid = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return Path(path)


_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "up-left": "down-right",
             "down-right": "up-left", "up-right": "down-left", "down-left": "up-right"}  # fmt: skip


@torch.no_grad()
def evaluate_motion_reading(
    components: dict[str, Any], num_clips: int = 64, timesteps: tuple[int, ...] = (500, 700, 850, 950), seed: int = 99
) -> dict[str, Any]:
    """Does the keyframe UNet read the caption's motion? Its v error on real clips, true caption against the opposite.

    Fresh translation clips are noised at each timestep (the same noise for every variant) and denoised with their
    own caption, with the caption of the opposite direction ("moving left" for "moving right"), and, with the true
    caption, time-reversed (the opposite motion's frames). A model that ignores the motion words scores ratios of 1;
    one that follows them scores above 1. The first shipped keyframe stage scored 1.00 at every timestep.

    Args:
        components: ``tokenizer``, ``text_encoder`` and ``unet`` (keyframes), on one device.
        num_clips: Clips, drawn from the 8 translations at every speed.
        timesteps: Noise levels of the DDPM training schedule.
        seed: Seed of the specs and the noise.

    Returns:
        ``{"num_clips", "per_timestep": [{"t", "true", "opposite_caption", "reversed_clip"}], "opposite_over_true",
        "reversed_over_true"}`` (the ratios are means over the timesteps).
    """
    from .vocab import motion_phrase

    unet, device = components["unet"], next(components["unet"].parameters()).device
    rng = np.random.default_rng(seed)
    specs = [sample_spec(rng, motions=(tuple(_OPPOSITE)[i % 8],)) for i in range(num_clips)]
    clips = torch.stack([render_clip(s, NUM_KEYFRAMES, KEYFRAME_SIZE, KEYFRAME_SIZE) for s in specs]).to(device)
    opposite = [s.caption.replace(motion_phrase(s.motion, s.speed), motion_phrase(_OPPOSITE[s.motion], s.speed))
                for s in specs]  # fmt: skip

    def encode(captions: list[str]) -> torch.Tensor:
        ids, mask = tokenize_captions(components["tokenizer"], captions, device)
        return components["text_encoder"](ids, attention_mask=mask).last_hidden_state.to(unet.dtype)

    true_text, opposite_text = encode([s.caption for s in specs]), encode(opposite)
    scheduler = DDPMScheduler(**NOISE_SCHEDULER_CONFIG)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for t in timesteps:
        ts = torch.full((num_clips,), t, device=device)
        noise = torch.randn(clips.shape, generator=generator, device=device)

        def error(x: torch.Tensor, text: torch.Tensor, noise: torch.Tensor = noise, ts: torch.Tensor = ts) -> float:
            prediction = unet(scheduler.add_noise(x, noise, ts).to(unet.dtype), ts, text).sample[:, :3].float()
            return (prediction - scheduler.get_velocity(x, noise, ts)).pow(2).mean().item()

        rows.append({"t": t, "true": round(error(clips, true_text), 6),
                     "opposite_caption": round(error(clips, opposite_text), 6),
                     "reversed_clip": round(error(clips.flip(2), true_text), 6)})  # fmt: skip
    return {
        "num_clips": num_clips,
        "per_timestep": rows,
        "opposite_over_true": round(float(np.mean([r["opposite_caption"] / r["true"] for r in rows])), 4),
        "reversed_over_true": round(float(np.mean([r["reversed_clip"] / r["true"] for r in rows])), 4),
    }


@torch.no_grad()
def evaluate_motion_at_pure_noise(
    components: dict[str, Any],
    pairs: tuple[tuple[str, str], ...] = (("right", "left"), ("down", "up")),
    num_clips: int = 100,
    num_noises: int = 16,
    seed: int = 7,
) -> dict[str, Any]:
    """Does the caption's direction change what the keyframe UNet draws from pure noise? Against what it should.

    At the last training timestep the input is noise, and the error-minimising clean-clip estimate is the mean clip
    of the caption. Objects stay inside the frame, so an object moving right starts on the left: the mean clips of
    opposite directions differ (``ideal_difference``, their mean squared difference over ``num_clips`` renders
    each of a red circle moving quickly on blue). The model's clean-clip estimates for the two captions, from the
    same noise, differ by ``model_difference``; ``model_over_ideal`` is 1 for a model that draws each direction's
    layout and 0 for one that ignores the direction word.

    Args:
        components: ``tokenizer``, ``text_encoder`` and ``unet`` (keyframes), on one device.
        pairs: Opposite directions to compare.
        num_clips: Renders per direction for the mean clips.
        num_noises: Noise draws the model's estimates are averaged over (per-pixel errors, then the mean).
        seed: Seed of the specs and the noise.

    Returns:
        ``{"timestep", "pairs": [{"directions", "ideal_difference", "model_difference", "model_error",
        "ideal_error"}], "model_over_ideal"}``; the errors are the model's and the caption mean's squared error
        against the caption's clips.
    """
    unet, device = components["unet"], next(components["unet"].parameters()).device
    scheduler = DDPMScheduler(**NOISE_SCHEDULER_CONFIG)
    t = scheduler.config.num_train_timesteps - 1
    alpha = scheduler.alphas_cumprod[t].item()
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (num_noises, 3, NUM_KEYFRAMES, KEYFRAME_SIZE, KEYFRAME_SIZE)
    noise = torch.randn(shape, generator=generator, device=device)
    ts = torch.full((num_noises,), t, device=device)
    rows = []
    for pair in pairs:
        means, estimates, clips = [], [], []
        for direction in pair:
            specs = [sample_spec(rng, motions=(direction,), shapes=("circle",), colors=("red",), backgrounds=("blue",),
                                 speeds=("quickly",)) for _ in range(num_clips)]  # fmt: skip
            rendered = torch.stack([render_clip(s, NUM_KEYFRAMES, KEYFRAME_SIZE, KEYFRAME_SIZE) for s in specs])
            clips.append(rendered.to(device))
            means.append(clips[-1].mean(0))
            ids, mask = tokenize_captions(components["tokenizer"], [specs[0].caption], device)
            text = components["text_encoder"](ids, attention_mask=mask).last_hidden_state.to(unet.dtype)
            v = unet(noise.to(unet.dtype), ts, text.expand(num_noises, -1, -1)).sample[:, :3].float()
            estimates.append((alpha**0.5 * noise - (1 - alpha) ** 0.5 * v).mean(0))
        rows.append({
            "directions": list(pair),
            "ideal_difference": round((means[0] - means[1]).pow(2).mean().item(), 6),
            "model_difference": round((estimates[0] - estimates[1]).pow(2).mean().item(), 8),
            "model_error": round(float(np.mean([(c - e).pow(2).mean().item() for c, e in zip(clips, estimates)])), 5),
            "ideal_error": round(float(np.mean([(c - m).pow(2).mean().item() for c, m in zip(clips, means)])), 5),
        })  # fmt: skip
    ratio = np.mean([r["model_difference"] / r["ideal_difference"] for r in rows])
    return {"timestep": t, "pairs": rows, "model_over_ideal": round(float(ratio), 5)}


def evaluate_keyframe_stage(components: dict, num_samples: int, seed: int, out: Path) -> list[dict]:
    """``evaluate_keyframes`` at guidance 3, 5 and 7.5 on a trained keyframe stage; saves the guidance-5 samples.

    Example:
        >>> results = evaluate_keyframe_stage(components, 44, seed=0, out=Path("runs/default"))  # doctest: +SKIP
    """
    from ..pipelines import Show1KeyframesPipeline

    pipeline = Show1KeyframesPipeline(components["tokenizer"], components["text_encoder"], components["unet"],
                                      DPMSolverMultistepScheduler(**SCHEDULER_CONFIG))  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    results = []
    for guidance_scale in (3.0, 5.0, 7.5):
        metrics, videos, _ = evaluate_keyframes(pipeline, num_samples, seed=seed + 1234, guidance_scale=guidance_scale)
        results.append(metrics)
        if guidance_scale == 5.0:
            save_grid(videos[: 2 * len(TRAIN_MOTIONS)], out / "samples_keyframes.png")
    return results


def evaluate_upsampling_stages(components: dict, num_samples: int, seed: int) -> dict:
    """``evaluate_upsampling`` on trained interpolation and SR stages, with the sampling scheduler of the cascade.

    Example:
        >>> evaluate_upsampling_stages(components, 16, seed=0)["interpolation"]  # doctest: +SKIP
    """
    from ..pipelines import Show1InterpolationPipeline, Show1SuperResPipeline

    text = (components["tokenizer"], components["text_encoder"])
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    interpolation = Show1InterpolationPipeline(*text, components["interpolation_unet"], scheduler)
    sr = Show1SuperResPipeline(*text, components["sr_unet"], scheduler, DDPMScheduler(**NOISE_SCHEDULER_CONFIG))
    for pipeline in (interpolation, sr):
        pipeline.set_progress_bar_config(disable=True)
    return evaluate_upsampling(interpolation, sr, num_samples, seed=seed + 4321)
