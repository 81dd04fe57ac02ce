"""Show-1 stage 1: text to low-resolution keyframes in pixel space (`showlab/show-1-base`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
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
from motion_adapters.pipelines.stage import Show1StagePipeline

#: Channels of a pixel sample.
PIXEL_CHANNELS = 3


class Show1KeyframesPipeline(Show1StagePipeline):
    """Generate keyframes (8 x 40 x 64 by default) from text with the Show-1 base 3D UNet.

    Guidance runs negative and positive prompts in one batch; the scheduler steps every frame as its own
    sample; the UNet samples in eval mode and gets its previous mode back afterwards; each call uses a fresh
    copy of `scheduler`, which is never changed.

    Args:
        tokenizer: T5 tokenizer; None when prompts come as embeddings.
        text_encoder: T5 encoder (T5 v1.1 XXL for show-1-base); None when prompts come as embeddings.
        unet: The base Show-1 3D UNet (3 input, 6 output channels).
        scheduler: DPMSolverMultistepScheduler with the show-1-base config.

    Example:
        >>> pipe = Show1KeyframesPipeline.from_pretrained("showlab/show-1-base", torch_dtype=torch.float16,
        ...                                               variant="fp16").to("cuda")  # doctest: +SKIP
        >>> video = pipe("a panda surfing", output_type="pt").frames  # (1, 3, 8, 40, 64)  # doctest: +SKIP
    """

    # bench_stage_kernels.py, H200, real size: the Triton frame-attention kernels (stage_kernels_triton_attention_
    # h200.json). With the UNet calls replayed from CUDA graphs, channels-last activations on the fused norms are
    # fastest (0.044 against 0.071 s a call with PyTorch's norms, contiguous; 3 interleaved rounds,
    # stage_kernels_graph_h200.json); launched from Python they were slower for this stage's small activations
    # (0.205 against 0.087 s, stage_kernels_cl_h200.json), so eager calls keep PyTorch's norms, contiguous.
    _gpu_temporal_kernels = "triton_attention"
    _gpu_norm_kernels = "triton"
    _gpu_memory_format = "channels_last"
    _gpu_eager_choices = ("torch", "contiguous")

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
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_frames: int,
        height: int,
        width: int,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> int:
        """Validate the call arguments and return the batch size.

        Example:
            >>> pipe.check_inputs("a cat", None, None, None, 8, 40, 64, None, "pt", ["latents"])  # doctest: +SKIP
            1
        """
        batch_size = self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        self.check_common_inputs(height, width, output_type, callback_on_step_end_tensor_inputs)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive int (Show-1 makes 8 keyframes).")
        if self.unet.config.in_channels != PIXEL_CHANNELS:
            raise ValueError(
                f"unet has in_channels={self.unet.config.in_channels}; the keyframe stage needs a base UNet with "
                f"{PIXEL_CHANNELS} (load showlab/show-1-base, not an interpolation or super-resolution UNet)."
            )
        expected = (batch_size, PIXEL_CHANNELS, num_frames, height, width)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}; the initial sample must be (batch, 3, num_frames, "
                f"height, width) = {expected}."
            )
        return batch_size

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 8,
        height: int = 40,
        width: int = 64,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
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
        """Generate keyframes.

        Args:
            prompt: Prompt or prompts; or None with `prompt_embeds`.
            num_frames: Keyframes per video (8 in Show-1; a cascade with SR1 needs 7k + 1).
            height: Frame height, a multiple of the UNet's downsampling factor (40 in Show-1).
            width: Frame width, likewise (64 in Show-1).
            num_inference_steps: Denoising steps (75 in Show-1).
            guidance_scale: Classifier-free guidance weight (9.0 in Show-1); 1.0 or less turns guidance off.
            negative_prompt: Negative prompt(s); "" when None.
            generator: Random generator(s) for the initial noise.
            latents: (B, 3, num_frames, height, width) initial sample instead of fresh noise, for example the
                inverted noise of a video; it is multiplied by the scheduler's `init_noise_sigma` (1.0 for
                DPMSolver).
            prompt_embeds: Precomputed T5 embeddings (B, L, D) instead of `prompt`.
            negative_prompt_embeds: Precomputed negative embeddings instead of `negative_prompt`.
            output_type: `"pt"` ((B, 3, F, H, W) pixels in [-1, 1]), `"np"` or `"pil"`.
            return_dict: Return a `Show1PipelineOutput` rather than a tuple.
            callback_on_step_end: Called as `callback(pipe, step, timestep, {"latents": ...})` after every step;
                a returned `"latents"` replaces the sample.
            callback_on_step_end_tensor_inputs: Tensor names the callback gets (`["latents"]`).
            cross_attention_kwargs: Passed to the UNet's attention processors.

        Returns:
            `Show1PipelineOutput` with `frames`, or `(frames,)`.

        Example:
            >>> out = pipe("a red ball rolls", num_inference_steps=25, output_type="pil")  # doctest: +SKIP
            >>> len(out.frames[0])  # doctest: +SKIP
            8
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        # 1. Check inputs
        batch_size = self.check_inputs(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            num_frames,
            height,
            width,
            latents,
            output_type,
            tensor_inputs,
        )
        device = self._execution_device
        do_classifier_free_guidance = guidance_scale > 1.0

        # 2. Encode the prompt; negative and positive run in one batch
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        # 3. Prepare timesteps on a fresh scheduler
        scheduler = fresh_scheduler(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        learned_variance = has_learned_variance(scheduler)

        # 4. Prepare the initial sample
        shape = (batch_size, PIXEL_CHANNELS, num_frames, height, width)
        latents = self.prepare_latents(
            shape, self.unet.dtype, device, generator, latents, init_noise_sigma=scheduler.init_noise_sigma
        )

        # 5. Denoise
        extra = step_kwargs(scheduler, generator)
        steps = len(scheduler.timesteps)
        with eval_mode(self.unet), self._temporal_kernels(), self.progress_bar(total=steps) as progress_bar:
            for i, t in enumerate(scheduler.timesteps):
                latents = self.denoise_step(
                    scheduler, latents, t, i,
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

        # 6. Post-process
        video = postprocess_video(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return Show1PipelineOutput(frames=video)
