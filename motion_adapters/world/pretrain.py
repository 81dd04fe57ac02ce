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
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.utils import logging as diffusers_logging

from ..models import Show1UNet3DConditionModel
from ..models.extensions import EXTENSIONS, extend_unet
from .default_model import (
    DEFAULT_MODEL_DIR,
    NOISE_SCHEDULER_CONFIG,
    SCHEDULER_CONFIG,
    STAGE_FOLDERS,
    build_default_components,
    caption_tokenizer,
    keyframes_unet_config,
    load_default_components,
    train_caption_tokenizer,
    use_tiny_head_attention,
)
from .pretrain_data import ClipBatches, SpecPool, tokenize_captions
from .pretrain_eval import (
    evaluate_keyframe_stage,
    evaluate_motion_at_pure_noise,
    evaluate_motion_reading,
    evaluate_upsampling_stages,
)
from .vocab import TRAIN_MOTIONS

__all__ = ["STAGES", "WEIGHTINGS", "main", "motions_at", "parse_curriculum", "save_stage", "train_stage"]

WEIGHTINGS = ("min-snr", "v-capped")
"""Loss weightings of ``train_stage`` (see its ``weighting`` argument)."""
STAGES = ("keyframes", "interpolation", "sr")
"""Stages in training order; ``--stage all`` trains every one."""
STAGE_UNETS = {"keyframes": "unet", "interpolation": "interpolation_unet", "sr": "sr_unet"}
"""The components key of each stage's UNet."""
DEFAULTS = {  # per stage: share of the minutes, batch size in clips or windows, peak learning rate
    "keyframes": {"share": 0.65, "batch_size": 64, "lr": 7e-4},
    "interpolation": {"share": 0.12, "batch_size": 64, "lr": 7e-4},
    "sr": {"share": 0.23, "batch_size": 16, "lr": 7e-4},
}


# --- curriculum -----------------------------------------------------------------------------------------------


def parse_curriculum(text: str) -> list[tuple[tuple[str, ...], float]]:
    """Read ``--curriculum``: phases ``motions:share`` separated by ``;``, motions comma-separated or ``all``.

    The keyframe stage trains phase after phase, each for its share of the stage's time (shares are normalised),
    on clips of the phase's motions only. Opposite directions cancel in a direction-blind model's gradient (their
    mean residuals are mirror images), so a curriculum can first teach one direction's drift and then the word that
    flips it.

    Raises:
        ValueError: for an empty phase, an unknown or unseen motion, or a share that is not a positive number.

    Example:
        >>> parse_curriculum("right,still:1;all:3")[0]
        (('right', 'still'), 0.25)
    """
    phases = []
    for part in [p.strip() for p in text.split(";") if p.strip()]:
        names, sep, share = part.rpartition(":")
        if not sep or not names.strip():
            raise ValueError(f"--curriculum phase {part!r} must read 'motion,motion,...:share' or 'all:share'.")
        try:
            weight = float(share)
        except ValueError:
            weight = float("nan")
        if not weight > 0 or not math.isfinite(weight):
            raise ValueError(f"--curriculum phase {part!r}: the share {share!r} must be a positive number.")
        motions = TRAIN_MOTIONS if names.strip() == "all" else tuple(m.strip() for m in names.split(","))
        unknown = [m for m in motions if m not in TRAIN_MOTIONS]
        if unknown:
            raise ValueError(f"--curriculum phase {part!r} names {unknown}; use motions of {TRAIN_MOTIONS} or 'all'.")
        phases.append((motions, weight))
    if not phases:
        raise ValueError(f"--curriculum {text!r} has no phase; pass e.g. 'right,still:1;all:2'.")
    total = sum(w for _, w in phases)
    return [(motions, w / total) for motions, w in phases]


def motions_at(curriculum: list[tuple[tuple[str, ...], float]], progress: float) -> tuple[str, ...]:
    """The motions of the curriculum phase that ``progress`` (0 to 1 of the stage's time) falls in.

    Example:
        >>> motions_at([(("right",), 0.5), (("left", "right"), 0.5)], 0.7)
        ('left', 'right')
    """
    end = 0.0
    for motions, share in curriculum:
        end += share
        if progress < end:
            return motions
    return curriculum[-1][0]


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
    make_batch: Callable[[int, float], dict[str, torch.Tensor]],
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
        make_batch: ``(batch_size, progress) -> {"sample", "captions", optional "condition", "class_labels"}``, with
            ``progress`` the fraction of the budget used so far (a curriculum picks its phase from it).
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
        batch = make_batch(batch_size, progress)
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
    parser.add_argument(
        "--temporal-conv-spatial-kernel", type=int, default=None,
        help="Widen the keyframe UNet's temporal convolutions to (3, K, K) so frames read their neighbours' nearby "
        "pixels (new taps zero-initialised, also when continuing with --init-from); default: keyframes_unet_config's.",
    )  # fmt: skip
    parser.add_argument(
        "--coordinate-frequencies", type=int, default=None,
        help="Give the keyframe UNet absolute (x, y) position features with this many frequencies (zero-initialised "
        "projection, also when continuing with --init-from); default: keyframes_unet_config's.",
    )  # fmt: skip
    parser.add_argument(
        "--curriculum", default=None,
        help="Train the keyframe stage in phases 'motions:share;...' (motions comma-separated, or all), e.g. "
        "'right,still:1;right,left,still:1;all:2'; default: every motion of --motions throughout.",
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
        if args.init_from:
            raise ValueError(
                "--attention-head-dim builds a fresh keyframe UNet, but --init-from loads saved weights whose config "
                "fixes the head split; drop one of the two."
            )
        torch.manual_seed(args.seed)
        config = {**keyframes_unet_config(), "attention_head_dim": args.attention_head_dim}
        components["unet"] = Show1UNet3DConditionModel(**config).eval()
    if args.init_from:  # continue training: the same tokenizer (it is deterministic), the saved weights
        source = DEFAULT_MODEL_DIR if args.init_from == "default" else Path(args.init_from)
        saved = load_default_components(model_dir=source, tiny_head_attention=False)
        for key in ("text_encoder", "unet", "interpolation_unet", "sr_unet"):
            components[key] = saved[key].float()
    # each extension key has its option (--frame-embedding-frames, ...), whose dest is the key itself
    extensions = {key: getattr(args, key) for key in EXTENSIONS if getattr(args, key) is not None}
    if extensions:  # new tables start at zero, widened kernels keep the old weights at their centre
        components["unet"] = extend_unet(components["unet"], **extensions).eval()
    frozen_text = "keyframes" not in stages or args.text_encoder_from is not None
    if frozen_text:
        from transformers import T5EncoderModel

        source = out if args.text_encoder_from is None else Path(args.text_encoder_from)
        source = DEFAULT_MODEL_DIR if args.text_encoder_from == "default" else source
        folder = source / STAGE_FOLDERS["keyframes"] / "text_encoder"
        components["text_encoder"] = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).eval()
    for key in ("text_encoder", "unet", "interpolation_unet", "sr_unet"):
        components[key].to(device)
    # Show-1's split (attention_head_dim 64) gives this model's temporal attention heads of C / 64 = 1 or 2 channels.
    tiny_heads = {key for key in STAGE_UNETS.values() if components[key].config.attention_head_dim > 16}
    for key in tiny_heads:
        use_tiny_head_attention(components[key])
    if device.type == "cuda" and tiny_heads & {STAGE_UNETS[stage] for stage in stages}:
        # The cuDNN and memory-efficient SDPA kernels fail in backward on temporal attention heads of 1 or 2
        # channels (torch 2.11, H100: "mha_graph.execute" and an illegal memory access); the math kernel is exact.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_flash_sdp(False)

    # 2. The pool of seen-motion clips
    t0 = time.perf_counter()
    motions = TRAIN_MOTIONS if args.motions is None else tuple(args.motions.split(","))
    curriculum = None
    if args.curriculum is not None:
        if args.motions is not None:
            raise ValueError("--curriculum names the motions of each phase; drop --motions.")
        curriculum = parse_curriculum(args.curriculum)
        motions = tuple(m for m in TRAIN_MOTIONS if any(m in phase for phase, _ in curriculum))
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

            unet, trainable_text = components["unet"], text_encoder
        else:
            with torch.no_grad():
                cache = torch.cat([
                    text_encoder(ids[i : i + 512], attention_mask=mask[i : i + 512]).last_hidden_state
                    for i in range(0, len(ids), 512)
                ])  # fmt: skip

            def encode(captions: torch.Tensor, cache: torch.Tensor = cache) -> torch.Tensor:
                return cache[captions]

            unet, trainable_text = components[STAGE_UNETS[stage]], None
        phased = stage == "keyframes" and curriculum is not None
        if phased:

            def make_batch(size: int, progress: float) -> dict[str, torch.Tensor]:
                return batches.keyframes(size, motions=motions_at(curriculum, progress))

        else:
            draw = getattr(batches, stage)

            def make_batch(size: int, progress: float, draw: Callable = draw) -> dict[str, torch.Tensor]:
                return draw(size)

        result = train_stage(
            stage, unet, make_batch, encode, seconds, batch_sizes[stage], args.lr or DEFAULTS[stage]["lr"],
            trainable_text=trainable_text, max_steps=args.max_steps, log_every=args.log_every,
            weighting=args.weighting,
        )  # fmt: skip
        result["parameters"] = sum(p.numel() for p in unet.parameters())
        if phased:
            result["curriculum"] = [{"motions": list(m), "share": round(w, 4)} for m, w in curriculum]
        if args.init_from:  # the stage continued from these weights; the earlier record moves to "previous"
            result["init_from"] = args.init_from
            if stage in log["stages"]:
                result["previous"] = {k: v for k, v in log["stages"][stage].items() if k != "previous"}
        log["stages"][stage] = result
        save_stage(out, stage, components)
        if stage == "keyframes" and args.eval_samples:
            clips = min(64, 8 * args.eval_samples)
            _evaluate(log, "motion_reading", evaluate_motion_reading, components, clips)
            _evaluate(log, "motion_at_pure_noise", evaluate_motion_at_pure_noise, components)
            _evaluate(log, "keyframes", evaluate_keyframe_stage, components, args.eval_samples, args.seed, out)
        log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    if {"interpolation", "sr"} <= set(stages) and args.eval_samples:
        _evaluate(log, "upsampling", evaluate_upsampling_stages, components, min(args.eval_samples, 16), args.seed)

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
