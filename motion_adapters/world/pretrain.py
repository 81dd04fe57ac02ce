"""Pretrain the default Show-1 cascade from scratch on freshly rendered shapes-world clips of the seen motions.

Stages train one after the other, each for its share of ``--minutes`` of wall-clock time, with v prediction
(``NOISE_SCHEDULER_CONFIG``) on the squaredcos_cap_v2 schedule, uniform timesteps and Min-SNR-5 loss weights,
AdamW, a cosine learning rate over the time budget, bf16 autocast on CUDA and an EMA of the weights (the EMA
weights are saved):

1. ``keyframes``: 8 keyframes of 32 x 32 from the caption; the T5 encoder trains jointly with this UNet.
2. ``interpolation``: 5-frame windows of the 29-frame clip between two keyframes, conditioned on the two ends
   trilinearly interpolated plus an end-frame mask (7 input channels), with the T5 frozen.
3. ``sr``: 8-frame windows of the 29-frame clip at 96 x 96, conditioned on the same frames rendered at 32 x 32,
   upsampled and noised to a random noise level (the UNet's class label), with the first frame clean.

Clips are rendered on the training device from a pool of ``ClipSpec`` sampled up front by CPU workers
(``TRAIN_MOTIONS`` only: the unseen motions never appear). Each stage is saved when it ends, in the folder layout
of ``Show1CascadePipeline.save_pretrained`` with float16 safetensors, and ``training_log.json`` gets its loss
curve as ``{"step", "loss", "seconds"}`` records.

Example:
    $ python -m motion_adapters.world.pretrain --out runs/default --stage all --minutes 8 --eval-samples 44
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from ..metrics import appearance_check, video_motion_fidelity
from ..models import Show1UNet3DConditionModel
from .default_model import (
    DEFAULT_MODEL_DIR,
    KEYFRAME_SIZE,
    NOISE_SCHEDULER_CONFIG,
    NUM_KEYFRAMES,
    SCHEDULER_CONFIG,
    SR_SIZE,
    STAGE_FOLDERS,
    build_default_components,
    caption_tokenizer,
    keyframes_unet_config,
    load_default_components,
    train_caption_tokenizer,
    use_tiny_head_attention,
)
from .pretrain_data import TIMELINE, ClipBatches, SpecPool
from .render import render_clip
from .spec import sample_spec
from .vocab import TRAIN_MOTIONS

__all__ = [
    "STAGES",
    "evaluate_keyframes",
    "evaluate_motion_reading",
    "evaluate_upsampling",
    "main",
    "save_stage",
    "train_stage",
]

WEIGHTINGS = ("min-snr", "v-capped")
"""Loss weightings of ``train_stage`` (see its ``weighting`` argument)."""
STAGES = ("keyframes", "interpolation", "sr")
"""Stages in training order; ``--stage all`` trains every one."""
DEFAULTS = {  # per stage: share of the minutes, batch size in clips or windows, peak learning rate
    "keyframes": {"share": 0.65, "batch_size": 64, "lr": 7e-4},
    "interpolation": {"share": 0.12, "batch_size": 64, "lr": 7e-4},
    "sr": {"share": 0.23, "batch_size": 16, "lr": 7e-4},
}


# --- text -----------------------------------------------------------------------------------------------------


def tokenize_captions(tokenizer, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize as the pipelines do (lower-cased, stripped, padded to 77, truncated); returns ids and mask."""
    tokens = tokenizer(
        [c.lower().strip() for c in captions], padding="max_length", max_length=77, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


# --- training -------------------------------------------------------------------------------------------------


class _EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay: min(decay, (1+n)/(10+n))."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_stage(
    name: str,
    unet: torch.nn.Module,
    make_batch: Callable[[int], dict[str, torch.Tensor]],
    encode: Callable[[torch.Tensor], torch.Tensor],
    seconds: float,
    batch_size: int,
    lr: float,
    trainable_text: torch.nn.Module | None = None,
    max_steps: int | None = None,
    ema_decay: float = 0.999,
    warmup_steps: int = 100,
    min_snr_gamma: float | None = 5.0,
    weighting: str = "min-snr",
    log_every: int = 20,
) -> dict[str, Any]:
    """Train one stage's UNet (and the text encoder if given) for ``seconds`` of wall time; EMA weights at the end.

    The loss is the MSE between the first 3 output channels and the target of ``NOISE_SCHEDULER_CONFIG``'s
    prediction type (v = sqrt(abar) eps - sqrt(1 - abar) x_0, or epsilon), with timesteps uniform in [0, 1000) and
    the squaredcos_cap_v2 schedule, each sample weighted by min(SNR, gamma) / (SNR + 1) for v (/ SNR for epsilon;
    Min-SNR-gamma, Hang et al. 2023): the low-noise timesteps no longer drown the high-noise ones, where a stage
    decides colors and layout and a conditioned stage must learn to follow its condition. With epsilon prediction
    the first checkpoint's high-noise clean-frame estimates were worse than those of predicting x_t itself, and its
    colors were at chance; v prediction keeps that regime well conditioned. The learning rate warms up linearly over
    ``warmup_steps`` and then follows a cosine from ``lr`` to ``lr / 10`` over the time budget.

    Args:
        name: Stage name, for logs.
        unet: The stage's UNet; its parameters are set to their EMA on return.
        make_batch: ``batch_size -> {"sample", "captions", optional "condition", "class_labels"}``.
        encode: Caption ids (B,) -> text states (B, 77, D); must be differentiable if ``trainable_text``.
        seconds: Wall-clock budget of the loop.
        batch_size: Clips or windows per step.
        lr: Peak learning rate of AdamW.
        trainable_text: The text encoder when it trains jointly with this stage.
        max_steps: Stop after this many steps even within the budget (for tests).
        ema_decay: EMA decay.
        warmup_steps: Linear warm-up steps.
        min_snr_gamma: Gamma of the loss weighting; None for the plain mean.
        weighting: ``"min-snr"``: min(SNR, gamma) / (SNR + 1) on the v error, which is Min-SNR-gamma on the clean-frame
            error and gives the high-noise steps almost no weight (SNR 0.02 at t = 900); ``"v-capped"``:
            min(1, gamma / (SNR + 1)), the plain v error capped at low noise, which weighs the clean-frame error at
            high noise, where layout and motion are decided, about 1 / SNR times more.
        log_every: Steps between loss records.

    Returns:
        ``{"steps", "seconds", "samples_seen", "final_loss", "curve": [{"step", "loss", "seconds"}, ...], ...}``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {WEIGHTINGS}.")
    device = next(unet.parameters()).device
    modules = [unet] + ([trainable_text] if trainable_text is not None else [])
    for module in modules:
        module.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = _EMA(modules, ema_decay)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULER_CONFIG)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    curve, window, step, start = [], [], 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = min(elapsed / seconds, 1.0) if seconds > 0 else 1.0
        if max_steps is not None:
            progress = max(progress, step / max_steps)
        if progress >= 1.0 and step > 0:
            break
        for group in optimizer.param_groups:
            group["lr"] = (
                lr * min(1.0, (step + 1) / warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            )
        batch = make_batch(batch_size)
        sample = batch["sample"]
        noise = torch.randn_like(sample)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (sample.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(sample, noise, timesteps)
        model_input = torch.cat([noisy, batch["condition"]], dim=1) if "condition" in batch else noisy
        with autocast:
            text = encode(batch["captions"])
            prediction = unet(model_input, timesteps, text, class_labels=batch.get("class_labels")).sample
        v_target = noise_scheduler.config.prediction_type == "v_prediction"
        target = noise_scheduler.get_velocity(sample, noise, timesteps) if v_target else noise
        loss = (prediction[:, :3].float() - target).pow(2).mean(dim=(1, 2, 3, 4))
        if min_snr_gamma is not None:  # min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v
            alpha_bar = noise_scheduler.alphas_cumprod.to(device)[timesteps]
            snr = alpha_bar / (1 - alpha_bar)
            if weighting == "v-capped" and v_target:
                loss = loss * (min_snr_gamma / (snr + 1)).clamp(max=1.0)
            else:
                loss = loss * snr.clamp(max=min_snr_gamma) / (snr + 1 if v_target else snr)
        loss = loss.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}; lower --lr or the batch size.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(step)
        step += 1
        window.append(loss.detach())
        if step % log_every == 0 or step == 1:
            record = {"step": step, "loss": round(torch.stack(window).mean().item(), 5),
                      "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
            curve.append(record)
            window = []
            print(f"[{name}] step {step} loss {record['loss']:.4f} {record['seconds']:.0f}s", flush=True)
    if window:
        curve.append({"step": step, "loss": round(torch.stack(window).mean().item(), 5),
                      "seconds": round(time.perf_counter() - start, 2)})  # fmt: skip
    ema.copy_to()
    for module in modules:
        module.eval().requires_grad_(False)
    tail = [r["loss"] for r in curve[-5:]]
    return {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "batch_size": batch_size,
        "samples_seen": step * batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "final_loss": round(float(np.mean(tail)), 5),
        "text_encoder_trained": trainable_text is not None,
        "min_snr_gamma": min_snr_gamma,
        "weighting": weighting,
        "curve": curve,
    }


# --- evaluation -----------------------------------------------------------------------------------------------


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


# --- saving ---------------------------------------------------------------------------------------------------


def save_stage(out: Path, stage: str, components: dict[str, Any]) -> Path:
    """Save one stage as a Show-1 stage pipeline folder (float16 safetensors) and refresh ``cascade_index.json``."""
    from ..pipelines import Show1InterpolationPipeline, Show1KeyframesPipeline, Show1SuperResPipeline
    from ..pipelines.cascade import INDEX_FILE

    def half(module: torch.nn.Module) -> torch.nn.Module:
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # ModelMixin.to warns about dtype casts; none of our modules need fp32
        try:
            return copy.deepcopy(module).to("cpu", torch.float16)
        finally:
            diffusers_logging.set_verbosity(verbosity)

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    if stage == "keyframes":
        pipeline = Show1KeyframesPipeline(
            tokenizer=components["tokenizer"], text_encoder=half(components["text_encoder"]),
            unet=half(components["unet"]), scheduler=scheduler,
        )  # fmt: skip
    elif stage == "interpolation":
        pipeline = Show1InterpolationPipeline(None, None, unet=half(components["interpolation_unet"]),
                                              scheduler=scheduler)  # fmt: skip
    else:
        pipeline = Show1SuperResPipeline(
            None, None, unet=half(components["sr_unet"]), scheduler=scheduler,
            image_noising_scheduler=DDPMScheduler(**NOISE_SCHEDULER_CONFIG),
        )  # fmt: skip
    folder = out / STAGE_FOLDERS[stage]
    pipeline.save_pretrained(folder, safe_serialization=True)
    present = {
        name: name for name in ("keyframes", "interpolation", "sr1") if (out / name / "model_index.json").is_file()
    }
    index = {"_class_name": "Show1CascadePipeline", "stages": present}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


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


def _environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
    }


def _evaluate(log: dict, name: str, function: Callable, *args: Any) -> None:
    """Run one evaluation into ``log["evaluation"][name]``; errors are printed and logged, not raised.

    A failing evaluation must not cost the stages still to train in the same run.
    """
    t0 = time.perf_counter()
    try:
        log["evaluation"][name] = function(*args)
    except Exception as error:  # noqa: BLE001 - reported in the log and on stdout
        log["evaluation"][name] = {"error": repr(error)}
    print(f"[{name}] evaluation ({time.perf_counter() - t0:.0f}s): {json.dumps(log['evaluation'][name])}", flush=True)


def _evaluate_keyframes_stage(components: dict, num_samples: int, seed: int, out: Path) -> list[dict]:
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


def _evaluate_upsampling_stages(components: dict, num_samples: int, seed: int) -> dict:
    from ..pipelines import Show1InterpolationPipeline, Show1SuperResPipeline

    text = (components["tokenizer"], components["text_encoder"])
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)
    interpolation = Show1InterpolationPipeline(*text, components["interpolation_unet"], scheduler)
    sr = Show1SuperResPipeline(*text, components["sr_unet"], scheduler, DDPMScheduler(**NOISE_SCHEDULER_CONFIG))
    for pipeline in (interpolation, sr):
        pipeline.set_progress_bar_config(disable=True)
    return evaluate_upsampling(interpolation, sr, num_samples, seed=seed + 4321)


# --- command line ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m motion_adapters.world.pretrain",
        description="Pretrain the default shapes-world Show-1 cascade from scratch (seen motions only).",
    )
    parser.add_argument(
        "--out", required=True, help="Output folder (Show1CascadePipeline layout + training_log.json)."
    )
    parser.add_argument(
        "--stage", default="all", help=f"Stage(s) to train: all, or comma-separated names of {', '.join(STAGES)}."
    )
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="Wall-clock minutes of training, all stages together."
    )
    parser.add_argument(
        "--shares", default=None, help="Shares of the minutes for keyframes,interpolation,sr (default 0.65,0.12,0.23)."
    )
    parser.add_argument("--batch-sizes", default=None, help="Comma-separated batch sizes (default 64,64,16).")
    parser.add_argument("--lr", type=float, default=None, help="Peak learning rate of every stage (default 7e-4).")
    parser.add_argument("--max-steps", type=int, default=None, help="Stop each stage after this many steps.")
    parser.add_argument("--num-specs", type=int, default=100_000, help="Clip specs in the sampled pool.")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="CPU processes for specs.")
    parser.add_argument("--eval-samples", type=int, default=0, help="Keyframe samples scored after the first stage.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--motions", default=None, help="Comma-separated subset of TRAIN_MOTIONS to train on (default: all of them)."
    )
    parser.add_argument(
        "--init-from", default=None,
        help="Start from the weights of a folder this script wrote (default: the shipped model with 'default').",
    )  # fmt: skip
    parser.add_argument(
        "--text-encoder-from", default=None,
        help="Take the T5 encoder from this folder ('default': the shipped model) and keep it frozen, so the other "
        "stages of that model keep their text embeddings; default: train it jointly with the keyframe stage.",
    )  # fmt: skip
    parser.add_argument(
        "--attention-head-dim", type=int, default=None,
        help="attention_head_dim of a freshly built keyframe UNet (default: keyframes_unet_config's).",
    )  # fmt: skip
    parser.add_argument(
        "--frame-embedding-frames", type=int, default=None,
        help="Give the keyframe UNet learned frame embeddings for this many frames (zero-initialised, also when "
        "continuing with --init-from); default: keyframes_unet_config's.",
    )  # fmt: skip
    parser.add_argument("--weighting", default="min-snr", choices=WEIGHTINGS, help="Loss weighting over noise levels.")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu.")
    parser.add_argument("--log-every", type=int, default=20, help="Steps between loss records.")
    return parser


def _per_stage(value: str | None, key: str, cast: type) -> dict[str, Any]:
    if value is None:
        return {stage: DEFAULTS[stage][key] for stage in STAGES}
    parts = value.split(",")
    if len(parts) != len(STAGES):
        raise ValueError(f"--{key.replace('_', '-')}s={value!r} must give {len(STAGES)} comma-separated values.")
    return {stage: cast(part) for stage, part in zip(STAGES, parts)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pretraining command line; returns the training log.

    Example:
        >>> log = main(["--out", "runs/tiny", "--minutes", "0.1", "--max-steps", "2", "--num-specs", "64"])
    """
    args = _parser().parse_args(argv)
    out = Path(args.out)
    stages = STAGES if args.stage == "all" else tuple(s for s in STAGES if s in args.stage.split(","))
    unknown = sorted(set(args.stage.split(",")) - {"all", *STAGES})
    if unknown or not stages:
        raise ValueError(f"--stage {args.stage!r}: unknown stage(s) {unknown}; use all or names from {STAGES}.")
    shares = _per_stage(args.shares, "share", float)
    batch_sizes = _per_stage(args.batch_sizes, "batch_size", int)
    total_share = sum(shares[s] for s in stages)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()

    # 1. Tokenizer and models
    spiece = out / STAGE_FOLDERS["keyframes"] / "tokenizer" / "spiece.model"
    if "keyframes" in stages:
        train_caption_tokenizer(spiece)
    elif not (out / STAGE_FOLDERS["keyframes"] / "text_encoder").is_dir():
        raise ValueError(
            f"--stage {args.stage} needs the trained keyframe stage (its T5 encoder) in --out {str(out)!r}; "
            "train it first with --stage keyframes or --stage all."
        )
    tokenizer = caption_tokenizer(spiece)
    components = build_default_components(tokenizer, seed=args.seed)
    if args.attention_head_dim is not None:
        torch.manual_seed(args.seed)
        config = {**keyframes_unet_config(), "attention_head_dim": args.attention_head_dim}
        components["unet"] = Show1UNet3DConditionModel(**config).eval()
    if args.init_from:  # continue training: the same tokenizer (it is deterministic), the saved weights
        source = DEFAULT_MODEL_DIR if args.init_from == "default" else Path(args.init_from)
        saved = load_default_components(model_dir=source, tiny_head_attention=False)
        for key in ("text_encoder", "unet", "interpolation_unet", "sr_unet"):
            components[key] = saved[key].float()
    if args.frame_embedding_frames is not None:  # new zero-initialised tables; every other weight is kept
        unet = components["unet"]
        # diffusers drops keys listed in the private `_use_default_values` of a loaded config: pass public keys only.
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        config["frame_embedding_frames"] = args.frame_embedding_frames
        components["unet"] = Show1UNet3DConditionModel.from_config(config).eval()
        missing, unexpected = components["unet"].load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(".frame_embeddings." not in key for key in missing):
            raise RuntimeError(f"frame embeddings: unexpected {unexpected}, missing {missing}")
    frozen_text = "keyframes" not in stages or args.text_encoder_from is not None
    if frozen_text:
        from transformers import T5EncoderModel

        source = out if args.text_encoder_from is None else Path(args.text_encoder_from)
        source = DEFAULT_MODEL_DIR if args.text_encoder_from == "default" else source
        folder = source / STAGE_FOLDERS["keyframes"] / "text_encoder"
        components["text_encoder"] = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).eval()
    for key in ("text_encoder", "unet", "interpolation_unet", "sr_unet"):
        components[key].to(device)
    for key in ("unet", "interpolation_unet", "sr_unet"):
        if components[key].config.attention_head_dim > 16:  # temporal heads of C / 64: 1 or 2 channels here
            use_tiny_head_attention(components[key])
    trained = [{"keyframes": "unet", "interpolation": "interpolation_unet", "sr": "sr_unet"}[s] for s in stages]
    tiny_heads = any(components[key].config.attention_head_dim > 16 for key in trained)
    if device.type == "cuda" and tiny_heads:
        # The cuDNN and memory-efficient SDPA kernels fail in backward on temporal attention heads of 1 or 2
        # channels (torch 2.11, H100: "mha_graph.execute" and an illegal memory access); the math kernel is exact.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)

    # 2. The pool of seen-motion clips
    t0 = time.perf_counter()
    motions = TRAIN_MOTIONS if args.motions is None else tuple(args.motions.split(","))
    pool = SpecPool(args.num_specs, seed=args.seed, workers=args.workers, motions=motions).to(device)
    pool_seconds = time.perf_counter() - t0
    print(f"pool: {len(pool)} specs, {len(pool.unique_captions) - 1} captions in {pool_seconds:.1f}s", flush=True)
    ids, mask = tokenize_captions(tokenizer, pool.unique_captions, device)
    batches = ClipBatches(pool, torch.Generator(device=device).manual_seed(args.seed))
    text_encoder = components["text_encoder"]

    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"stages": {}, "evaluation": {}}
    log.setdefault("runs", []).append({
        "command": "python -m motion_adapters.world.pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": _environment(device),
        "pool": {"num_specs": len(pool), "motions": list(motions), "seconds": round(pool_seconds, 1),
                 "unique_captions": len(pool.unique_captions) - 1},
    })  # fmt: skip

    # 3. Stages, one after the other; each is saved as soon as it ends
    for stage in stages:
        seconds = args.minutes * 60 * shares[stage] / total_share
        if stage == "keyframes" and not frozen_text:

            def encode(captions: torch.Tensor) -> torch.Tensor:
                return text_encoder(ids[captions], attention_mask=mask[captions]).last_hidden_state

            unet, make_batch, trainable_text = components["unet"], batches.keyframes, text_encoder
        else:
            with torch.no_grad():
                cache = torch.cat([
                    text_encoder(ids[i : i + 512], attention_mask=mask[i : i + 512]).last_hidden_state
                    for i in range(0, len(ids), 512)
                ])  # fmt: skip

            def encode(captions: torch.Tensor, cache: torch.Tensor = cache) -> torch.Tensor:
                return cache[captions]

            key = {"keyframes": "unet", "interpolation": "interpolation_unet", "sr": "sr_unet"}[stage]
            unet, make_batch, trainable_text = components[key], getattr(batches, stage), None
        result = train_stage(
            stage, unet, make_batch, encode, seconds, batch_sizes[stage], args.lr or DEFAULTS[stage]["lr"],
            trainable_text=trainable_text, max_steps=args.max_steps, log_every=args.log_every,
            weighting=args.weighting,
        )  # fmt: skip
        result["parameters"] = sum(p.numel() for p in unet.parameters())
        if args.init_from:  # the stage continued from these weights; the earlier record moves to "previous"
            result["init_from"] = args.init_from
            if stage in log["stages"]:
                result["previous"] = {k: v for k, v in log["stages"][stage].items() if k != "previous"}
        log["stages"][stage] = result
        save_stage(out, stage, components)
        if stage == "keyframes" and args.eval_samples:
            clips = min(64, 8 * args.eval_samples)
            _evaluate(log, "motion_reading", evaluate_motion_reading, components, clips)
            _evaluate(log, "keyframes", _evaluate_keyframes_stage, components, args.eval_samples, args.seed, out)
        log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    if {"interpolation", "sr"} <= set(stages) and args.eval_samples:
        _evaluate(log, "upsampling", _evaluate_upsampling_stages, components, min(args.eval_samples, 16), args.seed)

    # 4. Summary
    log["runs"][-1]["seconds"] = round(time.perf_counter() - started, 1)
    log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(f"done in {log['runs'][-1]['seconds']:.0f}s on {log['runs'][-1]['environment']['device']}:")
    for stage in stages:
        r = log["stages"][stage]
        print(f"  {stage:13s} {r['steps']:6d} steps x {r['batch_size']:4d} in {r['seconds']:6.1f}s, "
              f"final loss {r['final_loss']:.4f}, {r['parameters'] / 1e6:.2f} M parameters")  # fmt: skip
    return log


if __name__ == "__main__":
    main()
