"""Show-1 stages 3 and 4: pixel video super-resolution in windows (`showlab/show-1-sr1`) and the latent SR2 adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, IFSuperResolutionPipeline, VideoToVideoSDPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import T5EncoderModel, T5Tokenizer

from motion_adapters.models import Show1UNet3DConditionModel
from motion_adapters.pipelines._kernels import SamplingKernels, graphed_unet_calls
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


def window_starts(num_frames: int, window_size: int = 8) -> list[int]:
    """Return the first frame of each SR1 window: windows of `window_size` that overlap by one frame.

    The overlap frame is the previous window's last output, which conditions the next window, so the stride
    is `window_size - 1` and the windows cover the video exactly when `num_frames = k (window_size - 1) + 1`
    with k >= 1 (8, 15, 22, 29, ... for windows of 8).

    Example:
        >>> window_starts(29)
        [0, 7, 14, 21]
    """
    stride = window_size - 1
    if window_size < 2 or num_frames < window_size or (num_frames - 1) % stride:
        raise ValueError(
            f"num_frames={num_frames} cannot be split into windows of {window_size} frames that overlap by one: "
            f"it must be k * {stride} + 1 with k >= 1 (for example {stride + 1}, {2 * stride + 1}, "
            f"{4 * stride + 1}); with 8 windows frames that is 8 keyframes interpolated to 29."
        )
    return list(range(0, num_frames - window_size + 1, stride))


def upsample_frames(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinearly resize every frame of a (B, C, F, h, w) video to (height, width), corners aligned as Show-1.

    Example:
        >>> upsample_frames(torch.zeros(1, 3, 2, 4, 4), 16, 16).shape
        torch.Size([1, 3, 2, 16, 16])
    """
    frames = video.shape[2]
    folded = video.transpose(1, 2).flatten(0, 1)
    folded = F.interpolate(folded, size=(height, width), mode="bilinear", align_corners=True)
    return folded.unflatten(0, (-1, frames)).transpose(1, 2)


@torch.no_grad()
def super_resolve_first_frame(
    pipeline: IFSuperResolutionPipeline,
    frame: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None,
    height: int,
    width: int,
    num_inference_steps: int = 70,
    guidance_scale: float = 4.0,
    noise_level: int = 150,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Super-resolve the first frame with DeepFloyd IF-II (stage 3a of Show-1), on the shared T5 embeddings.

    The pipeline runs on fresh copies of its schedulers and with its UNet in eval mode; all are restored.

    Args:
        pipeline: `IFSuperResolutionPipeline` (`DeepFloyd/IF-II-L-v1.0`, gated), loadable with `text_encoder=None`.
        frame: (B, 3, h, w) low-resolution frame in [-1, 1].
        prompt_embeds: (B, 77, 4096) T5 embeddings (IF and Show-1 share the T5 v1.1 XXL encoder).
        negative_prompt_embeds: Negative embeddings; needed when `guidance_scale > 1`.
        height: Output height (160 in Show-1).
        width: Output width (256 in Show-1).
        num_inference_steps: Denoising steps (70 in Show-1).
        guidance_scale: Guidance weight (4.0 in Show-1).
        noise_level: Noise added to the upscaled frame (150 in Show-1).
        generator: Random generator(s).

    Returns:
        (B, 3, height, width) pixels in [-1, 1].

    Example:
        >>> if_sr = IFSuperResolutionPipeline.from_pretrained("DeepFloyd/IF-II-L-v1.0", text_encoder=None,
        ...                                                    torch_dtype=torch.float16)  # doctest: +SKIP
        >>> first = super_resolve_first_frame(if_sr, video[:, :, 0], embeds, negative, 160, 256)  # doctest: +SKIP
    """
    registered = pipeline.scheduler, pipeline.image_noising_scheduler
    pipeline.scheduler, pipeline.image_noising_scheduler = (fresh_scheduler(s) for s in registered)
    try:
        with eval_mode(pipeline.unet):
            images = pipeline(
                image=frame.to(dtype=pipeline.unet.dtype),
                prompt_embeds=prompt_embeds.to(dtype=pipeline.unet.dtype),
                negative_prompt_embeds=(
                    None if negative_prompt_embeds is None else negative_prompt_embeds.to(dtype=pipeline.unet.dtype)
                ),
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                noise_level=noise_level,
                generator=generator,
                output_type="pt",
            ).images
    finally:
        pipeline.scheduler, pipeline.image_noising_scheduler = registered
    return images.clamp(-1, 1)


@torch.no_grad()
def super_resolve_video_latent(
    pipeline: VideoToVideoSDPipeline,
    video: torch.Tensor,
    prompt: str | list[str],
    height: int = 320,
    width: int = 576,
    strength: float = 0.8,
    num_inference_steps: int = 50,
    guidance_scale: float = 15.0,
    negative_prompt: str | None = "low resolution, blur",
    generator: torch.Generator | list[torch.Generator] | None = None,
    temporal_kernels: str = "auto",
    norm_kernels: str = "auto",
    memory_format: str = "auto",
    cuda_graph: str = "auto",
) -> torch.Tensor:
    """Run Show-1's SR2 (`showlab/show-1-sr2`, a diffusers `VideoToVideoSDPipeline`) on pixel video.

    As Show-1 does, frames are quantised to 8 bits, resized with PIL's bicubic filter to (width, height), and
    refined with strength 0.8. Each video of the batch is its own call (its own CLIP prompt). The pipeline's
    scheduler is swapped for a fresh copy during the call and its UNet put in eval mode; both are restored.
    The UNet samples with the kernels, memory format and CUDA graph chosen as a Show-1 stage pipeline's
    `set_temporal_kernels`, `set_norm_kernels`, `set_memory_format` and `set_cuda_graph` choose them ("auto":
    what measured fastest for SR2 on a GPU, see `SR2Kernels`; the UNet as built elsewhere), for the call only.

    Args:
        pipeline: The SR2 `VideoToVideoSDPipeline`.
        video: (B, 3, F, h, w) pixels in [-1, 1].
        prompt: Text prompt(s) for SR2's CLIP encoder (SR2 does not use the T5 embeddings).
        height: Output height (320 in Show-1).
        width: Output width (576 in Show-1).
        strength: How much of the diffusion to run on the resized video (0.8 in Show-1).
        num_inference_steps: Denoising steps before `strength` (50 in Show-1).
        guidance_scale: Guidance weight (15.0, the pipeline default Show-1 keeps).
        negative_prompt: SR2 negative prompt ("low resolution, blur" in Show-1).
        generator: Random generator(s).
        temporal_kernels: One of `motion_adapters.config.TEMPORAL_KERNELS`.
        norm_kernels: "auto", "torch" or "triton".
        memory_format: "auto", "contiguous" or "channels_last".
        cuda_graph: "auto", "yes" or "no".

    Returns:
        (B, 3, F, height, width) pixels in [-1, 1].

    Example:
        >>> sr2 = VideoToVideoSDPipeline.from_pretrained("showlab/show-1-sr2")  # doctest: +SKIP
        >>> hi = super_resolve_video_latent(sr2, video, "a panda surfing")  # (1, 3, 29, 320, 576)  # doctest: +SKIP
    """
    prompts = [prompt] * video.shape[0] if isinstance(prompt, str) else list(prompt)
    if len(prompts) != video.shape[0]:
        raise ValueError(f"prompt has {len(prompts)} entries but video has batch {video.shape[0]}; match them.")
    pixels = ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    kernels = SR2Kernels(pipeline.unet, temporal_kernels, norm_kernels, memory_format, cuda_graph)
    kernels._kernels_in_use()  # a choice that cannot run here fails before any work
    registered = pipeline.scheduler
    outputs = []
    try:
        with eval_mode(pipeline.unet):
            for frames, text in zip(pixels, prompts):
                pipeline.scheduler = fresh_scheduler(registered)
                resized = [
                    PIL.Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), PIL.Image.BICUBIC)
                    for frame in frames
                ]
                with kernels._temporal_kernels(), graphed_unet_calls(pipeline.unet, kernels):
                    out = pipeline(
                        prompt=text,
                        negative_prompt=negative_prompt,
                        video=resized,
                        strength=strength,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        generator=generator,
                        output_type="pt",
                    ).frames  # (1, F, 3, H, W) in [0, 1]
                outputs.append(out.permute(0, 2, 1, 3, 4) * 2 - 1)
    finally:
        pipeline.scheduler = registered
    return torch.cat(outputs).to(video.device).clamp(-1, 1)


#: The arguments of `super_resolve_video_latent` that choose how SR2's UNet samples (`SR2Kernels`).
SR2_KERNEL_ARGUMENTS = ("temporal_kernels", "norm_kernels", "memory_format", "cuda_graph")


class SR2Kernels(SamplingKernels):
    """How SR2's UNet (diffusers' `UNet3DConditionModel`) samples in `super_resolve_video_latent`.

    The same choices as a Show-1 stage pipeline's, passed as arguments. "auto" on a GPU where Triton runs: the
    Triton frame-attention kernels (where 29 frames of a head fit one program; SDPA elsewhere), the fused norms,
    channels-last activations, calls replayed from a CUDA graph: 0.199 s a call at Show-1's size against 0.250 s
    for the UNet as diffusers builds it (bench_stage_kernels.py, H200, stage_kernels_sr2_h200.json).

    Example:
        >>> kernels = SR2Kernels(sr2.unet, "auto", "auto", "auto", "auto")  # doctest: +SKIP
        >>> kernels._kernels_in_use()  # on a GPU with Triton  # doctest: +SKIP
        ('triton_attention', 'triton')
    """

    _gpu_temporal_kernels = "triton_attention"
    _gpu_norm_kernels = "triton"
    _gpu_memory_format = "channels_last"

    def __init__(self, unet: torch.nn.Module, temporal_kernels: str, norm_kernels: str, memory_format: str,
                 cuda_graph: str):  # fmt: skip
        self.unet = unet
        self.set_temporal_kernels(temporal_kernels)
        self.set_norm_kernels(norm_kernels)
        self.set_memory_format(memory_format)
        self.set_cuda_graph(cuda_graph)

    def _unet_output(self, sample, timestep, encoder_hidden_states, class_labels, cross_attention_kwargs=None):
        # the class's forward: while `graphed_unet_calls` is open, `unet.forward` routes here
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                       return_dict=False)[0]  # fmt: skip

    def _fix(self, name: str, *choices: str) -> str:
        return (f"pass {name}={choices[0]!r} or {choices[1]!r} (stage_kwargs={{'sr2': {{{name!r}: ...}}}} in a "
                "cascade call)")


class Show1SuperResPipeline(Show1StagePipeline):
    """Super-resolve pixel video (29 x 40 x 64 -> 29 x 160 x 256) with the Show-1 SR1 3D UNet, in windows.

    The video is cut into windows of `window_size` frames that overlap by one frame (starts 0, 7, 14, 21 for 29
    frames). Each window is bilinearly upsampled, noised to `noise_level` by `image_noising_scheduler`, its first
    frame replaced by a clean high-resolution first frame, and concatenated to the noisy sample (3 + 3
    channels); the UNet gets `class_labels = noise_level`. The clean first frame of window 0 comes from
    `first_frame`, else from IF-II (`first_frame_pipeline`), else from plain bilinear upsampling; later windows
    take the previous window's last output frame. As in Show-1, which reseeds every window, all windows share
    one initial noise and one noising noise.

    Args:
        tokenizer: T5 tokenizer, or None when embeddings are passed (as a cascade does).
        text_encoder: T5 encoder, or None likewise.
        unet: The Show-1 SR1 3D UNet (6 input, 6 output channels, timestep class embedding).
        scheduler: The stage's sampling scheduler.
        image_noising_scheduler: DDPMScheduler that noises the upsampled condition.

    Example:
        >>> pipe = Show1SuperResPipeline.from_pretrained("showlab/show-1-sr1", text_encoder=None,
        ...                                              tokenizer=None).to("cuda")  # doctest: +SKIP
        >>> hi = pipe(video=frames, prompt_embeds=embeds, negative_prompt_embeds=negative,
        ...           output_type="pt").frames  # (1, 3, 29, 160, 256)  # doctest: +SKIP
    """

    # bench_stage_kernels.py, H200, real size (stage_kernels_cl_h200.json): with channels-last activations, the
    # Triton frame-attention kernels and the fused norms 0.136 s a call, against 0.186 s for the previous defaults
    # (math-kernel attention, fused norms, contiguous) and 0.217 s for the library's layers in the same run
    _gpu_temporal_kernels = "triton_attention"
    _gpu_norm_kernels = "triton"
    _gpu_memory_format = "channels_last"

    def __init__(
        self,
        tokenizer: T5Tokenizer | None,
        text_encoder: T5EncoderModel | None,
        unet: Show1UNet3DConditionModel,
        scheduler: SchedulerMixin,
        image_noising_scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=unet,
            scheduler=scheduler,
            image_noising_scheduler=image_noising_scheduler,
        )

    @classmethod
    def _default_component(cls, name: str, path: str) -> object:
        if name == "image_noising_scheduler":
            # Assumed (unverified): DeepFloyd IF's noising scheduler, cosine betas over 1000 steps.
            return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        return super()._default_component(name, path)

    def check_inputs(
        self,
        video: torch.Tensor,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        height: int,
        width: int,
        noise_level: int,
        window_size: int,
        first_frame: torch.Tensor | None,
        first_frame_pipeline: IFSuperResolutionPipeline | None,
        latents: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> int:
        """Validate the call arguments and return the batch size.

        Example:
            >>> pipe.check_inputs(frames, "a cat", None, None, None, 160, 256, 250, 8, None, None, None, "pt",
            ...                   ["latents"])  # doctest: +SKIP
            1
        """
        batch_size = self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != PIXEL_CHANNELS:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a (batch, 3, frames, height, width) tensor in [-1, 1], got {shape}.")
        if video.shape[0] != batch_size:
            raise ValueError(f"video has batch {video.shape[0]} but there are {batch_size} prompts; match them.")
        window_starts(video.shape[2], window_size)
        self.check_common_inputs(height, width, output_type, callback_on_step_end_tensor_inputs)
        if height < video.shape[3] or width < video.shape[4]:
            raise ValueError(
                f"height={height}, width={width} is smaller than the input frames {tuple(video.shape[3:])}; "
                "super-resolution needs a target at least as large (Show-1 uses 4x)."
            )
        if self.unet.config.in_channels != 2 * PIXEL_CHANNELS or self.unet.config.class_embed_type is None:
            raise ValueError(
                f"unet has in_channels={self.unet.config.in_channels} and class_embed_type="
                f"{self.unet.config.class_embed_type!r}; SR1 needs 6 and a noise-level class embedding: load "
                "showlab/show-1-sr1."
            )
        limit = self.image_noising_scheduler.config.num_train_timesteps
        if not 0 <= noise_level < limit:
            raise ValueError(f"noise_level={noise_level} must be in [0, {limit}) (Show-1 uses 250).")
        if first_frame is not None and first_frame_pipeline is not None:
            raise ValueError("Pass at most one of first_frame and first_frame_pipeline, not both.")
        expected = (batch_size, PIXEL_CHANNELS, height, width)
        if first_frame is not None and tuple(first_frame.shape) != expected:
            raise ValueError(f"first_frame has shape {tuple(first_frame.shape)}, expected {expected}.")
        expected = (batch_size, PIXEL_CHANNELS, window_size, height, width)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}; the initial noise shared by all windows must be "
                f"{expected}."
            )
        return batch_size

    @torch.no_grad()
    def __call__(
        self,
        video: torch.Tensor,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 125,
        guidance_scale: float = 7.0,
        noise_level: int = 250,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        first_frame: torch.Tensor | None = None,
        first_frame_pipeline: IFSuperResolutionPipeline | None = None,
        first_frame_kwargs: dict[str, Any] | None = None,
        window_size: int = 8,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> Show1PipelineOutput | tuple:
        """Super-resolve a video window by window.

        Args:
            video: (B, 3, F, h, w) pixels in [-1, 1]; F = k (window_size - 1) + 1.
            prompt: Prompt or prompts; or None with `prompt_embeds`.
            height: Output height; 4 h when None (160 in Show-1).
            width: Output width; 4 w when None (256 in Show-1).
            num_inference_steps: Denoising steps per window (125 in Show-1).
            guidance_scale: Classifier-free guidance weight (7.0 in Show-1).
            noise_level: Noise level of the upsampled condition and the UNet's class label (250 in Show-1).
            negative_prompt: Negative prompt(s); "" when None.
            generator: Random generator(s) for the shared noises.
            latents: (B, 3, window_size, height, width) initial noise shared by all windows.
            first_frame: (B, 3, height, width) clean high-resolution first frame in [-1, 1].
            first_frame_pipeline: IF-II `IFSuperResolutionPipeline` that makes the first frame from the same T5
                embeddings, when `first_frame` is not given; without either, the first frame is bilinearly upsampled.
            first_frame_kwargs: Settings of `super_resolve_first_frame` (70 steps, guidance 4.0, noise level 150).
            window_size: Frames per window (8 in Show-1).
            prompt_embeds: Precomputed T5 embeddings instead of `prompt`.
            negative_prompt_embeds: Precomputed negative embeddings.
            output_type: `"pt"` ((B, 3, F, height, width) pixels in [-1, 1]), `"np"` or `"pil"`.
            return_dict: Return a `Show1PipelineOutput` rather than a tuple.
            callback_on_step_end: Called as `callback(pipe, step, timestep, {"latents": ...})` after every step
                of every window; `step` restarts at 0 in each window.
            callback_on_step_end_tensor_inputs: Tensor names the callback gets (`["latents"]`).
            cross_attention_kwargs: Passed to the UNet's attention processors.

        Returns:
            `Show1PipelineOutput` with `frames`, or `(frames,)`.

        Example:
            >>> out = pipe(video=frames, prompt="a panda surfing", output_type="pt")  # doctest: +SKIP
        """
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        height = 4 * video.shape[3] if height is None else height
        width = 4 * video.shape[4] if width is None else width
        # 1. Check inputs
        batch_size = self.check_inputs(
            video,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            height,
            width,
            noise_level,
            window_size,
            first_frame,
            first_frame_pipeline,
            latents,
            output_type,
            tensor_inputs,
        )
        device = self._execution_device
        dtype = self.unet.dtype
        do_classifier_free_guidance = guidance_scale > 1.0
        video = video.to(device=device, dtype=dtype)

        # 2. Encode the prompt; negative and positive run in one batch
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        encoder_hidden_states = (
            torch.cat([negative_prompt_embeds, prompt_embeds]) if do_classifier_free_guidance else prompt_embeds
        )

        # 3. Prepare the noises shared by all windows (initial sample first, then the condition's noise)
        shape = (batch_size, PIXEL_CHANNELS, window_size, height, width)
        initial = self.prepare_latents(shape, dtype, device, generator, latents)
        condition_noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        noising_scheduler = fresh_scheduler(self.image_noising_scheduler)  # add_noise moves its tensors
        noise_levels = torch.full((batch_size,), noise_level, device=device, dtype=torch.long)
        class_labels = torch.cat([noise_levels] * 2) if do_classifier_free_guidance else noise_levels

        # 4. Prepare the clean first frame of window 0
        if first_frame is None and first_frame_pipeline is not None:
            first_frame = super_resolve_first_frame(
                first_frame_pipeline,
                video[:, :, 0],
                prompt_embeds,
                negative_prompt_embeds,
                height,
                width,
                generator=generator,
                **(first_frame_kwargs or {}),
            )
        if first_frame is None:
            first_frame = upsample_frames(video[:, :, :1], height, width)[:, :, 0]
        first_frame = first_frame.to(device=device, dtype=dtype).unsqueeze(2)

        # 5. Denoise window by window, each on a fresh scheduler
        starts = window_starts(video.shape[2], window_size)
        output = torch.zeros(batch_size, PIXEL_CHANNELS, video.shape[2], height, width, device=device, dtype=dtype)
        with eval_mode(self.unet), self._temporal_kernels(), \
                self.progress_bar(total=len(starts) * num_inference_steps) as progress_bar:
            for start in starts:
                scheduler = fresh_scheduler(self.scheduler)
                scheduler.set_timesteps(num_inference_steps, device=device)
                learned_variance = has_learned_variance(scheduler)
                extra = step_kwargs(scheduler, generator)
                condition = upsample_frames(video[:, :, start : start + window_size], height, width)
                condition = noising_scheduler.add_noise(condition, condition_noise, noise_levels)
                condition[:, :, :1] = first_frame
                latents = initial * scheduler.init_noise_sigma
                for i, t in enumerate(scheduler.timesteps):
                    latents = self.denoise_step(
                        scheduler, latents, t, i, condition=condition, class_labels=class_labels,
                        encoder_hidden_states=encoder_hidden_states,
                        guidance_scale=guidance_scale,
                        do_classifier_free_guidance=do_classifier_free_guidance,
                        learned_variance=learned_variance,
                        extra=extra,
                        callback_on_step_end=callback_on_step_end,
                        tensor_inputs=tensor_inputs,
                        cross_attention_kwargs=cross_attention_kwargs,
                    )  # fmt: skip
                    progress_bar.update()
                output[:, :, start : start + window_size] = latents
                first_frame = latents[:, :, -1:]

        # 6. Post-process
        video = postprocess_video(output, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return Show1PipelineOutput(frames=video)
