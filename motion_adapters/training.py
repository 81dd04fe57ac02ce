"""train_motion: the one-shot VMC loop that distils a clip's motion into a video UNet's temporal attention.

Each step draws a timestep t uniformly, noises the clip with the backbone's own schedule, predicts epsilon, and
minimises the motion distillation loss between consecutive-frame residuals of the true and predicted noise.
Only the adapter's parameters move. The loop is deterministic for a seed (each step's timestep and noise come
from a generator seeded by (seed, step)), so a run resumed from a checkpoint continues exactly as it would have.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from tqdm.auto import tqdm

from motion_adapters import training_step
from motion_adapters.config import TRITON_TEMPORAL_FALLBACK, MotionDistillationConfig
from motion_adapters.fused_norm import TRITON_IMPORT_ERROR, fused_norm_available
from motion_adapters.injection import (
    AdapterInfo,
    adapter_infos,
    adapter_parameters,
    inject_temporal_adapter,
    load_adapter_state_dict,
)
from motion_adapters.layout import channels_last_training
from motion_adapters.lean_backward import (
    frozen_activations_recomputed,
    frozen_convs_keep_no_input,
    norms_in_compute_dtype,
)
from motion_adapters.losses import prediction_type
from motion_adapters.serialization import (
    atomic_save_safetensors,
    atomic_write_text,
    motion_from_unet,
    save_motion_adapter,
)
from motion_adapters.targets import backbone_targets
from motion_adapters.training_step import (
    StepRunner,
    WeightPrecision,
    autocast_dtype,
    checkpointing,
    compiled,
    cudnn_benchmark,
    joint_attention_processors,
    keep_implementation_flags,
    optimizer_for,
    regional_compile,
    temporal_kernels,
    use_cuda_graph,
)

CHECKPOINT_DIR = "checkpoint"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass
class TrainState:
    """What a callback sees after each optimisation step.

    Attributes:
        step: steps completed (1-based after the first step).
        loss: this step's loss.
        losses: every loss so far.
        timestep: this step's diffusion timestep.
        unet: the UNet being trained.
        optimizer: the optimizer.
    """

    step: int
    loss: float
    losses: list[float]
    timestep: int
    unet: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class TrainingResult:
    """The outcome of `train_motion`.

    Attributes:
        losses: the loss of every step, in order (resumed runs include the earlier steps).
        info: what was adapted.
        seconds: wall time of this call's steps.
        steps: steps completed.
        output_dir: where the motion was saved, if anywhere.
        stopped_early: True when a callback stopped the run.
    """

    losses: list[float]
    info: AdapterInfo
    seconds: float
    steps: int
    output_dir: Path | None = None
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


Callback = Callable[[TrainState], bool | None]


#: Whether `train_motion` draws the next step's timestep and noise (on CUDA in page-locked memory) while the GPU runs
#: the current step, instead of between steps with the GPU idle. The draws are the same either way.
DRAW_AHEAD = True


def train_motion(
    unet: nn.Module,
    video: torch.Tensor,
    prompt_embeds: torch.Tensor,
    noise_scheduler,
    config: MotionDistillationConfig | None = None,
    *,
    vae: nn.Module | None = None,
    adapter_name: str = "default",
    output_dir: str | Path | None = None,
    resume: bool = True,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    training_info: dict | None = None,
    noise_prior: torch.Tensor | None = None,
) -> TrainingResult:
    """Learn the motion of one clip into `unet`'s temporal attention (VMC, Jeong et al. 2023).

    Args:
        unet: an epsilon-prediction video UNet of a registered backbone (Show-1, UNet3DConditionModel,
            UNetMotionModel). It stays on its device; the adapter is injected unless `adapter_name` is already on it.
        video: the clip, (C, F, H, W) or (1, C, F, H, W) in [-1, 1], already at the training size.
        prompt_embeds: the encoded appearance-invariant prompt, (1, L, D); the text encoder is not needed here.
        noise_scheduler: a diffusers scheduler whose `alphas_cumprod` and `config.num_train_timesteps` define the
            forward process (the backbone's own training schedule).
        config: the hyperparameters; defaults to `MotionDistillationConfig()`.
        vae: for latent backbones, the VAE that encodes frames (its `config.scaling_factor` is applied).
        adapter_name: the adapter's name on the UNet.
        output_dir: where checkpoints and the final motion folder go; `None` keeps everything in memory.
        resume: continue from `output_dir/checkpoint` when it exists.
        callbacks: called after every step with a `TrainState`; returning True stops training.
        progress: show a tqdm bar with the loss.
        training_info: extra facts recorded in the saved motion (prompt, base model, clip).
        noise_prior: an inverted initial noise saved beside the motion.

    Returns:
        A `TrainingResult`.

    Raises:
        ValueError: for a video or embedding of the wrong shape.
        NonFiniteLossError: when a loss is NaN or infinite (the last checkpoint in `output_dir` is kept).

    Example:
        >>> result = train_motion(unet, clip, embeds, scheduler, MotionDistillationConfig(max_train_steps=50))
        ... # doctest: +SKIP
    """
    config = config or MotionDistillationConfig()
    device = next(unet.parameters()).device
    video = _check_video(video, config)
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
        shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds)
        raise ValueError(f"prompt_embeds must be (1, L, D) from the text encoder; got {shape}.")
    spec = backbone_targets(unet) if not isinstance(config.target, list) else None
    x0 = _encode(video.to(device), vae) if vae is not None else video.to(device)
    embeds = prompt_embeds.to(device)
    if spec is not None and spec.text_per_frame:
        embeds = embeds.repeat_interleave(x0.shape[2], dim=0)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    predicts = prediction_type(noise_scheduler)  # an unsupported one fails here, before any work
    max_t = config.max_timestep or noise_scheduler.config.num_train_timesteps
    if max_t > alphas_cumprod.numel():
        raise ValueError(f"max_timestep={max_t} exceeds the scheduler's {alphas_cumprod.numel()} timesteps.")

    if adapter_name not in adapter_infos(unet):
        inject_temporal_adapter(unet, config=config, adapter_name=adapter_name)
    info = adapter_infos(unet)[adapter_name]
    params = adapter_parameters(unet, adapter_name)
    trainable_ids = {id(p) for p in params.values()}
    frozen_dtypes = [p.dtype for p in unet.parameters() if id(p) not in trainable_ids and p.is_floating_point()]
    weights_dtype = frozen_dtypes[0] if frozen_dtypes else torch.float32
    compute_dtype = autocast_dtype(config.mixed_precision, device, weights_dtype)
    scaler = torch.amp.GradScaler("cuda") if compute_dtype == torch.float16 else None
    graph = use_cuda_graph(config.cuda_graph, device, scaler is not None, config.gradient_checkpointing)
    cast_frozen = config.frozen_dtype == "compute" or (
        config.frozen_dtype == "auto" and device.type == "cuda" and compute_dtype is not None
    )
    input_grad_convs = config.frozen_convs != "autograd"
    recompute = config.frozen_activations == "recompute" or (
        config.frozen_activations == "auto" and device.type == "cuda" and config.compile == "no"
    )
    fused_norms = _fused_norms(config.norm_kernels, device, recompute)
    # "auto": channels-last where the norm pairs run on the Triton kernels (bench_training.py, H200: 0.0780 against
    # 0.0908 s a step, training_cl_h200.json), else contiguous (PyTorch's CUDA group norm would convert it back)
    channels_last = config.memory_format == "channels_last" or (config.memory_format == "auto" and fused_norms)
    kernels = _temporal_kernels(config.temporal_kernels, device)
    timed_convs = config.cudnn_benchmark and device.type == "cuda"
    half_norms = compute_dtype is not None and (
        config.norm_dtype == "compute" or (config.norm_dtype == "auto" and device.type == "cuda")
    )

    out_dir = Path(output_dir) if output_dir is not None else None
    losses: list[float] = []
    step_seconds: list[float] = []
    start = 0
    was_training = unet.training
    precision = WeightPrecision(unet, params, compute_dtype, cast_frozen, cast_norms=half_norms)
    num_cast = precision.num_cast
    bar = tqdm(total=config.max_train_steps, initial=0, desc="train_motion", disable=not progress, leave=False)
    stopped_early = False
    began = time.perf_counter()
    runner = None
    try:
        for p in params.values():
            p.requires_grad_(True)
        optimizer = optimizer_for(list(params.values()), config, device, graph)
        if out_dir is not None and resume and (out_dir / CHECKPOINT_DIR).is_dir():
            start, losses = _load_checkpoint(out_dir / CHECKPOINT_DIR, unet, adapter_name, optimizer, config)
            bar.update(start)
        unet.train()
        runner = StepRunner(
            compiled(unet, config.compile), x0, embeds, alphas_cumprod, list(params.values()), optimizer, config,
            compute_dtype, scaler, graph, predicts, defer_updates=not callbacks,
        )
        # dropout (Show-1's temporal convolutions use p=0.1) draws from the global generators: train on a fork of
        # them, seeded from the config, so that a run does not depend on what the process did before and leaves
        # the caller's random state alone. On CPU each step is seeded on its own, so a resumed run is exact; a
        # CUDA graph replays its captured RNG offsets, so there the fork is seeded once.
        cuda_devices = [device] if device.type == "cuda" else []
        with checkpointing(unet, config.gradient_checkpointing), temporal_kernels(unet, kernels), \
                joint_attention_processors(unet, training_step.STACKED_JOINT_QKV and device.type == "cuda",
                                           training_step.MEMO_TEXT_KV), \
                channels_last_training(unet, channels_last, half_norms), \
                frozen_convs_keep_no_input(unet, input_grad_convs), norms_in_compute_dtype(unet, half_norms), \
                frozen_activations_recomputed(unet, recompute, not half_norms, fused_norms), \
                regional_compile(unet, config.compile == "regional"), cudnn_benchmark(timed_convs), \
                torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(config.seed * 1_000_003 + start)
            pinned = DRAW_AHEAD and device.type == "cuda"
            draw = _step_draw(config, start, max_t, x0.shape, pinned=pinned)
            # the step after: a graphed step runs its frozen prefix beside its own backward pass (StepRunner)
            upcoming = _step_draw(config, start + 1, max_t, x0.shape, pinned=pinned) if (
                DRAW_AHEAD and start + 1 < config.max_train_steps) else None
            for step in range(start, config.max_train_steps):
                tick = time.perf_counter()
                if device.type != "cuda":
                    torch.manual_seed(config.seed * 1_000_003 + step)
                t, noise = draw or _step_draw(config, step, max_t, x0.shape, pinned=False)
                pending = runner(t, noise, upcoming)
                draw, upcoming = upcoming, None
                if DRAW_AHEAD and step + 2 < config.max_train_steps:  # drawn on the CPU while the GPU runs this step
                    upcoming = _step_draw(config, step + 2, max_t, x0.shape, pinned=pinned)
                value = float(pending)
                if not math.isfinite(value):
                    kept = f"; the last good checkpoint is in {out_dir / CHECKPOINT_DIR}" if out_dir else ""
                    raise NonFiniteLossError(
                        f"loss is {value} at step {step + 1} (timestep {int(t[0])}){kept}. Lower learning_rate, "
                        f"use mixed_precision='bf16' or 'no', or check the clip and prompt_embeds for NaN."
                    )
                losses.append(value)
                step_seconds.append(time.perf_counter() - tick)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                done = step + 1
                if out_dir is not None and config.checkpointing_steps and done % config.checkpointing_steps == 0:
                    runner.flush()  # a deferred update (training_step.OVERLAP_OPTIMIZER) belongs to this step
                    _save_checkpoint(out_dir / CHECKPOINT_DIR, unet, adapter_name, optimizer, done, losses, config)
                state = TrainState(done, value, losses, int(t[0]), unet, optimizer)
                if any(callback(state) for callback in callbacks):
                    stopped_early = done < config.max_train_steps
                    break
            runner.flush()
        seconds = time.perf_counter() - began
        prefix = runner.prefix if runner.prefix is not None and runner.prefix.modules else None
        prefix_info = {"modules": [m.name for m in prefix.modules], "bytes": prefix.nbytes} if prefix else None
        if out_dir is not None:
            facts = {
                **(training_info or {}),
                "steps": len(losses), "loss_first": losses[0] if losses else None,
                "loss_last": losses[-1] if losses else None, "losses": [round(v, 6) for v in losses],
                "seconds": round(seconds, 3), "device": str(device),
            }
            motion = motion_from_unet(
                unet, adapter_name, distillation=config.to_dict(), training=facts, noise_prior=noise_prior
            )
            save_motion_adapter(motion, out_dir)
    finally:
        bar.close()
        unet.train(was_training)
        for p in params.values():
            p.grad = None
        if runner is not None:
            runner.close()
        runner = optimizer = None
        precision.restore()
    extra = {
        "step_seconds": step_seconds,
        "compute_dtype": str(compute_dtype).replace("torch.", "") if compute_dtype else None,
        "frozen_weights_cast": num_cast,
        "cuda_graph": graph,
        # the frozen layers run a step ahead beside the backward pass (training_step.OVERLAP_FROZEN_PREFIX)
        "frozen_prefix": prefix_info,
        "cudnn_benchmark": timed_convs,
        "compile": config.compile,
        "temporal_kernels": kernels,
        "norm_dtype": "compute" if half_norms else "float32",
        "frozen_convs": "input_grad_only" if input_grad_convs else "autograd",
        "frozen_activations": "recompute" if recompute else "autograd",
        "norm_kernels": "triton" if fused_norms else "torch",
        "memory_format": "channels_last" if channels_last else "contiguous",
    }
    return TrainingResult(losses, info, seconds, len(losses), out_dir, stopped_early, extra)


def _fused_norms(choice: str, device: torch.device, recompute: bool) -> bool:
    """Whether `norm_kernels=choice` runs the recomputed norm -> activation pairs as Triton kernels on `device`."""
    if choice == "torch":
        return False
    usable = device.type == "cuda" and fused_norm_available()
    if choice == "triton":
        if not usable:
            why = f"Triton cannot be imported ({TRITON_IMPORT_ERROR})" if TRITON_IMPORT_ERROR else (
                f"the UNet is on {device.type}, not CUDA"
            )
            raise ValueError(f"norm_kernels='triton' cannot run: {why}. Use norm_kernels='auto' or 'torch'.")
        if not recompute:
            raise ValueError(
                "norm_kernels='triton' runs the norm -> activation pairs that frozen_activations='recompute' "
                "swaps in: set frozen_activations='recompute' (or 'auto' on CUDA without compile)."
            )
    return usable and recompute


def _temporal_kernels(choice: str, device: torch.device) -> str:
    """`temporal_kernels=choice` resolved for `device`; the Triton choices refused where Triton cannot run."""
    if choice == "auto":  # bench_training.py, H200: triton_fast 0.090 s a step against 0.097 s for fast
        if device.type != "cuda":
            return "library"
        return "triton_fast" if fused_norm_available() else TRITON_TEMPORAL_FALLBACK["triton_fast"]
    if choice.startswith("triton") and not (device.type == "cuda" and fused_norm_available()):
        why = f"Triton cannot be imported ({TRITON_IMPORT_ERROR})" if TRITON_IMPORT_ERROR else (
            f"the UNet is on {device.type}, not CUDA"
        )
        raise ValueError(f"temporal_kernels={choice!r} cannot run: {why}. Use temporal_kernels='auto' or 'fast'.")
    return choice


def _step_draw(config: MotionDistillationConfig, step: int, max_t: int, shape: torch.Size, pinned: bool):
    """Step `step`'s timestep and noise, from a generator seeded by the config's seed and the step alone.

    `pinned` puts them in page-locked memory, so that their copies to the GPU do not wait for the step before.
    """
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    t = torch.randint(config.min_timestep, max_t, (shape[0],), generator=generator, pin_memory=pinned)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, pin_memory=pinned)
    return t, noise


def _check_video(video: torch.Tensor, config: MotionDistillationConfig) -> torch.Tensor:
    if not isinstance(video, torch.Tensor) or video.ndim not in (4, 5):
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a (C, F, H, W) or (1, C, F, H, W) tensor in [-1, 1]; got {shape}.")
    video = video.unsqueeze(0) if video.ndim == 4 else video
    if video.shape[0] != 1:
        raise ValueError(f"video holds {video.shape[0]} clips; VMC learns from one clip: pass (1, C, F, H, W).")
    frames = video.shape[2]
    if frames <= config.frame_stride:
        raise ValueError(
            f"video has {frames} frame(s); frame_stride={config.frame_stride} needs at least "
            f"{config.frame_stride + 1}. Load more frames."
        )
    if not torch.isfinite(video).all():
        raise ValueError("video contains NaN or infinite values; check the decoded clip.")
    return video.float()


@torch.no_grad()
def _encode(video: torch.Tensor, vae: nn.Module) -> torch.Tensor:
    b, c, f, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(dtype=next(vae.parameters()).dtype)
    latents = vae.encode(frames).latent_dist.mean * vae.config.scaling_factor
    return latents.float().reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)


def _save_checkpoint(folder: Path, unet, adapter_name, optimizer, step, losses, config) -> None:
    """Write adapter + optimizer state as safetensors and JSON into a fresh folder, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu() for k, v in adapter_parameters(unet, adapter_name).items()}
    atomic_save_safetensors(tensors, tmp / "adapter.safetensors")
    opt = optimizer.state_dict()
    opt_tensors = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            opt_tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().reshape(-1) if key == "step" else (
                value.detach().cpu()
            )
    atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    atomic_write_text(
        tmp / "state.json",
        json.dumps({"step": step, "losses": losses, "param_groups": opt["param_groups"], "config": config.to_dict()}),
    )
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, unet, adapter_name, optimizer, config) -> tuple[int, list[float]]:
    state = json.loads((folder / "state.json").read_text())
    saved = MotionDistillationConfig.from_dict(state["config"])
    if (saved.mode, saved.target, saved.r, saved.seed) != (config.mode, config.target, config.r, config.seed):
        raise ValueError(
            f"the checkpoint in {folder} was made with mode={saved.mode!r}, target={saved.target!r}, r={saved.r}, "
            f"seed={saved.seed}; this run asks for mode={config.mode!r}, target={config.target!r}, r={config.r}, "
            f"seed={config.seed}. Pass resume=False or another output_dir."
        )
    load_adapter_state_dict(unet, load_file(folder / "adapter.safetensors"), adapter_name)
    tensors = load_file(folder / "optimizer.safetensors")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    groups = keep_implementation_flags(state["param_groups"], optimizer)
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    return int(state["step"]), [float(v) for v in state["losses"]]
