"""Pieces shared by the Show-1 pipelines: outputs, guidance, per-frame scheduler steps, modes and shapes."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.video_processor import VideoProcessor

from motion_adapters.models import Show1UNet3DConditionModel

logger = logging.get_logger(__name__)

#: Tokenizer length of the Show-1 (DeepFloyd IF) T5 prompts.
T5_MAX_LENGTH = 77
#: Output types every stage pipeline accepts.
OUTPUT_TYPES = ("pt", "np", "pil")
#: Keyword arguments of `from_pretrained` that go to the Hub download calls of every component.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


@dataclass
class Show1PipelineOutput(BaseOutput):
    """Output of a Show-1 stage pipeline.

    Args:
        frames: With `output_type="pt"` a (batch, 3, frames, height, width) tensor of pixels in [-1, 1]; with
            `"np"` a (batch, frames, height, width, 3) float array in [0, 1]; with `"pil"` one list of PIL frames
            per video.

    Example:
        >>> out = Show1PipelineOutput(frames=torch.zeros(1, 3, 8, 40, 64))
        >>> out.frames.shape
        torch.Size([1, 3, 8, 40, 64])
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]


@dataclass
class Show1CascadeOutput(BaseOutput):
    """Output of `Show1CascadePipeline`.

    Args:
        frames: The last stage's video in the requested output type (see `Show1PipelineOutput`).
        stage_frames: With `return_stage_outputs=True`, each stage's (batch, 3, frames, height, width) pixels in
            [-1, 1], by stage name (`keyframes`, `interpolation`, `sr1`, `sr2`); else None.

    Example:
        >>> out = Show1CascadeOutput(frames=torch.zeros(1, 3, 8, 40, 64))
        >>> out.stage_frames is None
        True
    """

    frames: torch.Tensor | np.ndarray | list[list[PIL.Image.Image]]
    stage_frames: dict[str, torch.Tensor] | None = None


def combine_guidance(
    model_output: torch.Tensor,
    *,
    guidance_scale: float,
    sample_channels: int,
    do_classifier_free_guidance: bool,
    learned_variance: bool,
) -> torch.Tensor:
    """Turn the UNet output of one step into the model output the scheduler gets.

    With guidance the batch holds the negative half first; the guided epsilon is
    `eps_neg + guidance_scale * (eps_text - eps_neg)` over the first `sample_channels` channels, and the text
    half's remaining (learned-variance) channels are concatenated back beside it. With a non-learned variance
    type only the epsilon channels are kept, as Show-1 does.

    Args:
        model_output: UNet output (2B or B, C_out, F, H, W); C_out is 6 for Show-1 (epsilon and variance).
        guidance_scale: Guidance weight `w`; 1.0 gives the text branch.
        sample_channels: Channels of the sample being denoised (3 for pixels).
        do_classifier_free_guidance: Whether `model_output` holds a negative and a text half.
        learned_variance: Whether the scheduler's `variance_type` is `learned` or `learned_range`.

    Returns:
        (B, sample_channels or C_out, F, H, W) model output for `scheduler.step`.

    Example:
        >>> out = torch.randn(2, 6, 1, 2, 2)
        >>> combine_guidance(out, guidance_scale=7.0, sample_channels=3, do_classifier_free_guidance=True,
        ...                  learned_variance=False).shape
        torch.Size([1, 3, 1, 2, 2])
    """
    if do_classifier_free_guidance:
        negative, text = model_output.chunk(2)
        eps_negative = negative[:, :sample_channels]
        eps_text, variance_text = text[:, :sample_channels], text[:, sample_channels:]
        eps = eps_negative + guidance_scale * (eps_text - eps_negative)
        model_output = torch.cat([eps, variance_text], dim=1)
    if not learned_variance:
        model_output = model_output[:, :sample_channels]
    return model_output


def scheduler_step_per_frame(
    scheduler: SchedulerMixin, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Take one scheduler step with every frame as its own batch element.

    (B, C, F, H, W) is folded to (B*F, C, H, W), so per-sample operations of the scheduler (dynamic
    thresholding quantiles) are per frame, as in Show-1.

    Args:
        scheduler: Scheduler whose timesteps are set.
        model_output: (B, C_out, F, H, W) output of `combine_guidance`.
        timestep: Current timestep.
        sample: (B, C, F, H, W) current sample.
        **kwargs: Extra `scheduler.step` arguments (`generator`, `eta`).

    Returns:
        The (B, C, F, H, W) previous sample.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> s = DDPMScheduler(); s.set_timesteps(2)
        >>> x = torch.zeros(1, 3, 4, 2, 2)
        >>> scheduler_step_per_frame(s, torch.zeros_like(x), s.timesteps[0], x).shape
        torch.Size([1, 3, 4, 2, 2])
    """
    batch, channels, frames, height, width = sample.shape
    folded_sample = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    folded_output = model_output.permute(0, 2, 1, 3, 4).reshape(batch * frames, -1, height, width)
    previous = scheduler.step(folded_output, timestep, folded_sample, **kwargs).prev_sample
    return previous.reshape(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)


def fresh_scheduler(scheduler: SchedulerMixin) -> SchedulerMixin:
    """Return a new scheduler built from `scheduler`'s config, so a call never changes the registered one.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> s = DDPMScheduler()
        >>> fresh_scheduler(s) is s
        False
    """
    return scheduler.__class__.from_config(scheduler.config)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator | list[torch.Generator] | None) -> dict:
    """Return the `generator` keyword for `scheduler.step` when the scheduler takes one.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> sorted(step_kwargs(DDPMScheduler(), None))
        ['generator']
    """
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def has_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler's `variance_type` makes it read the UNet's variance channels.

    Example:
        >>> from diffusers import DDPMScheduler
        >>> has_learned_variance(DDPMScheduler(variance_type="learned_range"))
        True
    """
    return scheduler.config.get("variance_type") in ("learned", "learned_range")


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Put modules in eval mode and restore every submodule's previous mode afterwards, even on error.

    Example:
        >>> layer = torch.nn.Dropout().train()
        >>> with eval_mode(layer):
        ...     layer.training
        False
        >>> layer.training
        True
    """
    saved = [(sub, sub.training) for module in modules if module is not None for sub in module.modules()]
    try:
        for module in modules:
            if module is not None:
                module.eval()
        yield
    finally:
        for sub, training in saved:
            sub.training = training


def postprocess_video(video: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray | list:
    """Convert (B, 3, F, H, W) pixels in about [-1, 1] to the requested output type.

    Args:
        video: Pixels as (B, 3, F, H, W).
        output_type: `"pt"` (clamped to [-1, 1], same layout), `"np"` ((B, F, H, W, 3) in [0, 1]) or `"pil"`.

    Example:
        >>> postprocess_video(torch.zeros(1, 3, 2, 4, 4), "np").shape
        (1, 2, 4, 4, 3)
    """
    if output_type == "pt":
        return video.clamp(-1, 1)
    return VideoProcessor(do_resize=False).postprocess_video(video.float().cpu(), output_type=output_type)


def downsampling_factor(unet: Show1UNet3DConditionModel) -> int:
    """Return by how much the UNet divides height and width (2 per down block after the first).

    Example:
        >>> # a UNet with 4 down blocks needs sizes divisible by 8
        >>> # downsampling_factor(unet) == 8
    """
    return 2 ** (len(unet.config.block_out_channels) - 1)


def embedding_width(unet: Show1UNet3DConditionModel) -> int:
    """Return the width of the text embeddings the UNet takes (`encoder_hid_dim`, else `cross_attention_dim`).

    Example:
        >>> # 4096 for show-1-base, whose T5 is T5 v1.1 XXL
        >>> # embedding_width(unet) == 4096
    """
    return unet.config.encoder_hid_dim or unet.config.cross_attention_dim


def _path_to_blocks(module: torch.nn.Module) -> list[str] | None:
    """Names of the children leading from `module` to the shallowest list of blocks under it, breadth first."""
    level = [([], module)]
    while level:
        for path, parent in level:
            for _, child in parent.named_children():
                if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and len(child):
                    return path
        level = [([*path, name], child) for path, parent in level for name, child in parent.named_children()]
    return None


def stream_blocks(module: torch.nn.Module, device: torch.device | str, use_stream: bool | None = None) -> None:
    """Keep `module` on the CPU and run it on `device` one block at a time (diffusers' block-level group offloading).

    The blocks are those of the shallowest `ModuleList` (or `Sequential`) under `module` (T5's `encoder.block`,
    CLIP's `text_model.encoder.layers`); the offloading applies to the module holding that list (T5's `encoder`),
    whose other layers move to `device` for its whole forward. Parameters outside that module, if any (T5's tied
    `shared` embedding is inside), move to `device`. With `use_stream` (True on CUDA when None) the next block is
    copied from pinned memory on a side stream while the current one runs. Does nothing if `module` is
    group-offloaded already. Raises `ValueError` for a module without such a list of blocks, or `use_stream` off
    CUDA.

    Example:
        >>> stream_blocks(pipe.text_encoder, "cuda")  # doctest: +SKIP
    """
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    device = torch.device(device)
    if _is_group_offload_enabled(module):
        return
    path = _path_to_blocks(module)
    if path is None:
        raise ValueError(
            f"{type(module).__name__} has no ModuleList of blocks to stream one at a time; move it with "
            "enable_model_cpu_offload() instead."
        )
    if use_stream is None:
        use_stream = device.type == "cuda"
    if use_stream and device.type != "cuda":
        raise ValueError(f"use_stream=True needs a CUDA device, not device={str(device)!r}; pass use_stream=False.")
    # offloading the holder of the blocks, not `module` with the path as `block_modules`: nested offloaded modules
    # with streams register their lazy hooks twice on the same layers, which diffusers 0.42 refuses
    holder = module.get_submodule(".".join(path)) if path else module
    module.to("cpu")
    inside = {id(t) for t in (*holder.parameters(), *holder.buffers())}
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in inside:
            tensor.data = tensor.data.to(device)
    apply_group_offloading(
        holder,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=use_stream,
    )
