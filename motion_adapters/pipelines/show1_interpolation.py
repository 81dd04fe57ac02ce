"""Show-1 stage 2: interpolate F keyframes to 4(F - 1) + 1 frames in pixel space (`showlab/show-1-interpolation`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import T5EncoderModel, T5Tokenizer

from motion_adapters.models import Show1UNet3DConditionModel
from motion_adapters.pipelines._utils import (
    Show1PipelineOutput,
    eval_mode,
    fresh_scheduler,
    has_learned_variance,
    postprocess_video,
    step_kwargs,
)
from motion_adapters.pipelines.show1_base import PIXEL_CHANNELS
from motion_adapters.pipelines.stage import Show1StagePipeline

#: Frames generated for each keyframe pair, the pair's two keyframes included.
FRAMES_PER_PAIR = 5


def interpolated_num_frames(num_keyframes: int) -> int:
    """Return how many frames the interpolation stage makes from `num_keyframes` keyframes: 4(F - 1) + 1.

    Example:
        >>> interpolated_num_frames(8)
        29
    """
    return (FRAMES_PER_PAIR - 1) * (num_keyframes - 1) + 1


def interpolation_condition(pairs: torch.Tensor) -> torch.Tensor:
    """Build the 4-channel condition of each pair: its end frames trilinearly interpolated, and the end mask.

    Args:
        pairs: (N, 3, FRAMES_PER_PAIR, H, W) windows whose first and last frames are the keyframes.

    Returns:
        (N, 4, FRAMES_PER_PAIR, H, W): 3 interpolated pixel channels and a mask that is 1 on the end frames.

    Example:
        >>> interpolation_condition(torch.zeros(2, 3, 5, 8, 8)).shape
        torch.Size([2, 4, 5, 8, 8])
    """
    frames = pairs.shape[2]
    condition = F.interpolate(pairs[:, :, [0, -1]], size=pairs.shape[2:], mode="trilinear", align_corners=True)
    mask = torch.zeros_like(condition[:, :1])
    mask[:, :, [0, frames - 1]] = 1
    return torch.cat([condition, mask], dim=1)


class Show1InterpolationPipeline(Show1StagePipeline):
    """Fill 3 frames between every two keyframes with the Show-1 interpolation 3D UNet (8 -> 29 frames).

    Every keyframe pair becomes a window of 5 frames with the pair at both ends. The UNet sees 7 channels: the
    3 noisy channels, the two end frames trilinearly interpolated over the window (3) and a mask that is 1 on
    the end frames (1). All windows start from one shared initial noise and are denoised together in one batch
    (windows are independent, so this equals Show-1's one-window-at-a-time loop). The windows are then written
    in order into the output, keyframe i at frame 4i; as in Show-1 each window's generated end frames are kept,
    and a window's first frame replaces the previous window's last frame.

    Args:
        tokenizer: T5 tokenizer, or None when embeddings are passed (as a cascade does).
        text_encoder: T5 encoder, or None likewise.
        unet: The Show-1 interpolation 3D UNet (7 input, 6 output channels).
        scheduler: The stage's scheduler (DPMSolverMultistepScheduler in Show-1).

    Example:
        >>> pipe = Show1InterpolationPipeline.from_pretrained("showlab/show-1-interpolation", text_encoder=None,
        ...                                                   tokenizer=None).to("cuda")  # doctest: +SKIP
        >>> video = pipe(video=keyframes, prompt_embeds=embeds, negative_prompt_embeds=negative,
        ...              output_type="pt").frames  # (1, 3, 29, 40, 64)  # doctest: +SKIP
    """

    # bench_stage_kernels.py, H200, real size (stage_kernels_triton_attention_h200.json): the Triton frame-attention
    # kernels with the fused norms measured fastest (14 sequences of 5 frames at every pixel); with channels-last
    # activations 1.14 times faster again (0.219 against 0.249 s a call, stage_kernels_cl_h200.json)
    _gpu_temporal_kernels = "triton_attention"
    _gpu_norm_kernels = "triton"
    _gpu_memory_format = "channels_last"

    def __init__(
        self,
        tokenizer: T5Tokenizer | None,
        text_encoder: T5EncoderModel | None,
        unet: Show1UNet3DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler)

    def check_inputs(
        self,
        video: torch.Tensor,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> int:
        """Validate the call arguments and return the batch size.

        Example:
            >>> pipe.check_inputs(keyframes, "a cat", None, None, None, None, "pt", ["latents"])  # doctest: +SKIP
            1
        """
        batch_size = self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a (batch, 3, frames, height, width) tensor in [-1, 1], got {shape}.")
        if video.shape[2] < 2:
            raise ValueError(
                f"video has {video.shape[2]} frame(s); interpolation needs at least 2 keyframes to place frames "
                "between them."
            )
        if video.shape[0] != batch_size:
            raise ValueError(f"video has batch {video.shape[0]} but there are {batch_size} prompts; match them.")
        self.check_common_inputs(video.shape[3], video.shape[4], output_type, callback_on_step_end_tensor_inputs)
        needed = 2 * PIXEL_CHANNELS + 1
        if self.unet.config.in_channels != needed:
            raise ValueError(
                f"unet has in_channels={self.unet.config.in_channels}; the interpolation stage needs {needed} "
                "(3 noisy + 3 condition + 1 mask): load showlab/show-1-interpolation."
            )
        expected = (batch_size, PIXEL_CHANNELS, FRAMES_PER_PAIR, *video.shape[3:])
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}; the shared initial noise of all pairs must be {expected}."
            )
        return batch_size

    @torch.no_grad()
    def __call__(
        self,
        video: torch.Tensor,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> Show1PipelineOutput | tuple:
        """Interpolate keyframes to 4(F - 1) + 1 frames.

        Args:
            video: (B, 3, F, H, W) keyframes in [-1, 1], F >= 2.
            prompt: Prompt or prompts; or None with `prompt_embeds`.
            num_inference_steps: Denoising steps (75 in Show-1).
            guidance_scale: Classifier-free guidance weight (4.0 in Show-1).
            negative_prompt: Negative prompt(s); "" when None.
            generator: Random generator(s) for the shared initial noise.
            latents: (B, 3, 5, H, W) initial noise shared by all pairs instead of fresh noise.
            prompt_embeds: Precomputed T5 embeddings instead of `prompt`.
            negative_prompt_embeds: Precomputed negative embeddings.
            output_type: `"pt"` ((B, 3, 4(F - 1) + 1, H, W) pixels in [-1, 1]), `"np"` or `"pil"`.
            return_dict: Return a `Show1PipelineOutput` rather than a tuple.
            callback_on_step_end: Called as `callback(pipe, step, timestep, {"latents": ...})` after every step;
                `latents` holds all windows, (B * (F - 1), 3, 5, H, W), batch-major.
            callback_on_step_end_tensor_inputs: Tensor names the callback gets (`["latents"]`).
            cross_attention_kwargs: Passed to the UNet's attention processors.

        Returns:
            `Show1PipelineOutput` with `frames`, or `(frames,)`.

        Example:
            >>> out = pipe(video=keyframes, prompt="a panda surfing", output_type="pt")  # doctest: +SKIP
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        # 1. Check inputs
        batch_size = self.check_inputs(
            video, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, latents, output_type, tensor_inputs
        )
        device = self._execution_device
        dtype = self.unet.dtype
        do_classifier_free_guidance = guidance_scale > 1.0
        num_keyframes, height, width = video.shape[2:]
        num_pairs = num_keyframes - 1

        # 2. Encode the prompt, one copy per pair, negative and positive in one batch
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        prompt_embeds = prompt_embeds.repeat_interleave(num_pairs, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_pairs, dim=0)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 3. Prepare timesteps on a fresh scheduler
        scheduler = fresh_scheduler(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        learned_variance = has_learned_variance(scheduler)

        # 4. Prepare one shared initial noise, and the condition of every pair
        shape = (batch_size, PIXEL_CHANNELS, FRAMES_PER_PAIR, height, width)
        latents = self.prepare_latents(
            shape, dtype, device, generator, latents, init_noise_sigma=scheduler.init_noise_sigma
        )
        latents = latents.repeat_interleave(num_pairs, dim=0)
        video = video.to(device=device, dtype=dtype)
        pairs = torch.zeros(
            batch_size, num_pairs, PIXEL_CHANNELS, FRAMES_PER_PAIR, height, width, device=device, dtype=dtype
        )
        pairs[:, :, :, 0] = video[:, :, :-1].transpose(1, 2)
        pairs[:, :, :, -1] = video[:, :, 1:].transpose(1, 2)
        condition = interpolation_condition(pairs.flatten(0, 1))

        # 5. Denoise all pairs together
        extra = step_kwargs(scheduler, generator)
        steps = len(scheduler.timesteps)
        with eval_mode(self.unet), self._temporal_kernels(), self.progress_bar(total=steps) as progress_bar:
            for i, t in enumerate(scheduler.timesteps):
                latents = self.denoise_step(
                    scheduler, latents, t, i, condition=condition,
                    encoder_hidden_states=prompt_embeds,
                    guidance_scale=guidance_scale,
                    do_classifier_free_guidance=do_classifier_free_guidance,
                    learned_variance=learned_variance,
                    extra=extra,
                    callback_on_step_end=callback_on_step_end,
                    tensor_inputs=tensor_inputs,
                    cross_attention_kwargs=cross_attention_kwargs,
                )  # fmt: skip
                progress_bar.update()

        # 6. Assemble the windows: keyframe i lands at frame 4i
        windows = latents.unflatten(0, (batch_size, num_pairs))
        step = FRAMES_PER_PAIR - 1
        frames = torch.zeros(
            batch_size,
            PIXEL_CHANNELS,
            interpolated_num_frames(num_keyframes),
            height,
            width,
            device=device,
            dtype=dtype,
        )
        for pair in range(num_pairs):
            frames[:, :, pair * step : pair * step + FRAMES_PER_PAIR] = windows[:, pair]

        # 7. Post-process
        video = postprocess_video(frames, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return Show1PipelineOutput(frames=video)
