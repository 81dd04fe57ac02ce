"""The Show-1 cascade: keyframes, interpolation, SR1 and SR2, on one set of T5 embeddings."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import IFSuperResolutionPipeline, VideoToVideoSDPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from motion_adapters.pipelines._utils import (
    HUB_KWARGS,
    Show1CascadeOutput,
    downsampling_factor,
    postprocess_video,
    stream_blocks,
)
from motion_adapters.pipelines.show1_base import Show1KeyframesPipeline
from motion_adapters.pipelines.show1_interpolation import Show1InterpolationPipeline, interpolated_num_frames
from motion_adapters.pipelines.show1_superres import (
    SR2_KERNEL_ARGUMENTS,
    Show1SuperResPipeline,
    SR2Kernels,
    super_resolve_video_latent,
    window_starts,
)

#: Stage names, in the order they run.
STAGES = ("keyframes", "interpolation", "sr1", "sr2")
#: Hub repositories of the Show-1 stages.
HUB_IDS = {
    "keyframes": "showlab/show-1-base",
    "interpolation": "showlab/show-1-interpolation",
    "sr1": "showlab/show-1-sr1",
    "sr2": "showlab/show-1-sr2",
}
#: Settings of Show-1's reference script; `stage_kwargs` overrides them per stage.
DEFAULT_STAGE_KWARGS = {
    "keyframes": {"num_inference_steps": 75, "guidance_scale": 9.0},
    "interpolation": {"num_inference_steps": 75, "guidance_scale": 4.0},
    "first_frame": {"num_inference_steps": 70, "guidance_scale": 4.0, "noise_level": 150},
    "sr1": {"num_inference_steps": 125, "guidance_scale": 7.0, "noise_level": 250},
    "sr2": {
        "num_inference_steps": 50,
        "guidance_scale": 15.0,
        "strength": 0.8,
        "height": 320,
        "width": 576,
        "negative_prompt": "low resolution, blur",
    },
}
#: Arguments the cascade passes to every stage itself, so `stage_kwargs` may not set them.
_RESERVED = {
    "prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
    "video",
    "latents",
    "generator",
    "output_type",
    "return_dict",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "num_frames",
    "first_frame_kwargs",
    "first_frame_pipeline",
}
INDEX_FILE = "cascade_index.json"


class Show1CascadePipeline:
    """Text to video with the Show-1 cascade: 8 keyframes -> 29 frames -> 160 x 256 -> 320 x 576.

    Holds one pipeline per stage: `keyframes` (`Show1KeyframesPipeline`, which owns the T5 encoder),
    `interpolation`, `sr1` and `sr2` (a diffusers `VideoToVideoSDPipeline`), each optional but the first, and an
    optional IF-II `first_frame_pipeline` for SR1's first frame. The prompt is encoded once by T5 and the
    embeddings are shared by stages 1-3; SR2 has its own CLIP encoder. Stage pipelines never change their
    schedulers or train/eval modes, so neither does the cascade, even when a call fails.

    Subclasses change a stage by overriding `_run_keyframes`, `_run_interpolation`, `_run_sr1` or `_run_sr2`;
    the keyframe stage's initial noise is the `latents` argument of `__call__`.

    Args:
        keyframes: Stage 1, with tokenizer and text encoder.
        interpolation: Stage 2, or None.
        sr1: Stage 3, or None.
        sr2: Stage 4, or None.
        first_frame_pipeline: IF-II super-resolution for SR1's first frame; bilinear upsampling when None.

    Example:
        >>> fp16 = {"keyframes": "fp16", "interpolation": "fp16"}
        >>> cascade = Show1CascadePipeline.from_pretrained(torch_dtype=torch.float16, variant=fp16)  # doctest: +SKIP
        >>> cascade.enable_model_cpu_offload()  # doctest: +SKIP
        >>> frames = cascade("a panda surfing", output_type="pil").frames[0]  # doctest: +SKIP
        >>> len(frames), frames[0].size  # doctest: +SKIP
        (29, (576, 320))
    """

    def __init__(
        self,
        keyframes: Show1KeyframesPipeline,
        interpolation: Show1InterpolationPipeline | None = None,
        sr1: Show1SuperResPipeline | None = None,
        sr2: VideoToVideoSDPipeline | None = None,
        first_frame_pipeline: IFSuperResolutionPipeline | None = None,
    ):
        if keyframes is None or keyframes.tokenizer is None or keyframes.text_encoder is None:
            raise ValueError(
                "keyframes must be a Show1KeyframesPipeline with its tokenizer and text_encoder: the cascade "
                "encodes prompts once with its T5 for stages 1-3."
            )
        self.keyframes = keyframes
        self.interpolation = interpolation
        self.sr1 = sr1
        self.sr2 = sr2
        self.first_frame_pipeline = first_frame_pipeline

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this cascade holds, in running order."""
        return tuple(name for name in STAGES if getattr(self, name) is not None)

    def _pipelines(self) -> dict[str, DiffusionPipeline]:
        pipelines = {name: getattr(self, name) for name in self.stages}
        if self.first_frame_pipeline is not None:
            pipelines["first_frame"] = self.first_frame_pipeline
        return pipelines

    @property
    def device(self) -> torch.device:
        """The keyframe stage's execution device."""
        return self.keyframes._execution_device

    def to(self, *args: Any, **kwargs: Any) -> Show1CascadePipeline:
        """Move every stage pipeline, as `DiffusionPipeline.to` (device and/or dtype); returns self."""
        for pipeline in self._pipelines().values():
            pipeline.to(*args, **kwargs)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Keep every model on the CPU until it runs, one at a time on `device` (see `DiffusionPipeline`)."""
        for pipeline in self._pipelines().values():
            pipeline.enable_model_cpu_offload(gpu_id=gpu_id, device=device)

    def enable_text_encoder_offload(self, device: torch.device | str = "cuda", use_stream: bool | None = None) -> None:
        """Keep the T5 encoder on the CPU and stream it to `device` one block at a time while it encodes.

        Show-1's T5 v1.1 XXL is 4.8 B parameters, 9.1 GiB in bf16: more than the three Show-1 UNets together. With
        this, it never resides on `device`: diffusers' block-level group offloading (`apply_group_offloading`)
        moves one T5 block at a time, and on CUDA (`use_stream`, the default there) copies the next block from
        pinned CPU memory on a side stream while the current one runs. A prompt then costs one pass of T5's weights
        over the bus instead of moving the whole encoder off the GPU after encoding. The other models stay where they
        are: put them on `device` with `.to(device)`, before or after this call. T5 moves to the CPU first if it is
        elsewhere; calling this again does nothing.

        Args:
            device: Where T5's blocks run.
            use_stream: Prefetch the next block on a CUDA stream (pinned CPU copies); True on CUDA when None.

        Example:
            >>> cascade = Show1CascadePipeline.from_pretrained(torch_dtype=torch.bfloat16)  # doctest: +SKIP
            >>> cascade.enable_text_encoder_offload("cuda")  # doctest: +SKIP
            >>> cascade.to("cuda")  # the UNets; T5 stays on the CPU  # doctest: +SKIP
        """
        stream_blocks(self.keyframes.text_encoder, device, use_stream)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save each stage pipeline to its own subfolder and write `cascade_index.json`.

        Args:
            save_directory: Folder to write; `from_pretrained(save_directory)` reads it back.
            **kwargs: Passed to each `DiffusionPipeline.save_pretrained` (`safe_serialization`, `variant`).
        """
        os.makedirs(save_directory, exist_ok=True)
        for name, pipeline in self._pipelines().items():
            pipeline.save_pretrained(os.path.join(save_directory, name), **kwargs)
        index = {"_class_name": type(self).__name__, "stages": {name: name for name in self._pipelines()}}
        with open(os.path.join(save_directory, INDEX_FILE), "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        base: str | os.PathLike | None = None,
        interpolation: str | os.PathLike | None = None,
        sr1: str | os.PathLike | None = None,
        sr2: str | os.PathLike | None = None,
        first_frame: str | os.PathLike | None = None,
        stages: Sequence[str] | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Show1CascadePipeline:
        """Load the cascade from the Show-1 Hub repositories, local stage folders, or a saved cascade.

        Args:
            pretrained_model_name_or_path: A folder written by `save_pretrained`; its stages are the defaults.
            base: Keyframe stage; defaults to the saved folder's `keyframes/`, else `showlab/show-1-base`.
            interpolation: Interpolation stage; defaults likewise, else `showlab/show-1-interpolation`.
            sr1: SR1 stage; defaults likewise, else `showlab/show-1-sr1`.
            sr2: SR2 stage; defaults likewise, else `showlab/show-1-sr2`.
            first_frame: IF-II super-resolution for SR1's first frame (`DeepFloyd/IF-II-L-v1.0`, gated); not
                loaded when None unless the saved folder has one.
            stages: Stages to load (a subset of `STAGES` with `keyframes`); the saved folder's stages, else all.
            torch_dtype: dtype of every model.
            variant: Weight variant for every stage (`"fp16"`), or by stage name; Show-1 ships fp16 variants of
                base and interpolation.
            **kwargs: Hub arguments for every download (`cache_dir`, `revision`, `token`, `local_files_only`).

        Example:
            >>> cascade = Show1CascadePipeline.from_pretrained(stages=("keyframes",))  # doctest: +SKIP
            >>> cascade.save_pretrained("show1")  # doctest: +SKIP
            >>> again = Show1CascadePipeline.from_pretrained("show1")  # doctest: +SKIP
        """
        unknown = sorted(set(kwargs) - set(HUB_KWARGS))
        if unknown:
            raise ValueError(f"from_pretrained got unknown arguments {unknown}; Hub arguments are {list(HUB_KWARGS)}.")
        saved = {}
        if pretrained_model_name_or_path is not None:
            root = os.fspath(pretrained_model_name_or_path)
            index_file = os.path.join(root, INDEX_FILE)
            if not os.path.isfile(index_file):
                raise ValueError(
                    f"{root!r} has no {INDEX_FILE}, so it is not a folder written by Show1CascadePipeline."
                    "save_pretrained; pass Hub ids or stage folders as base=, interpolation=, sr1=, sr2= instead."
                )
            with open(index_file, encoding="utf-8") as handle:
                saved = {name: os.path.join(root, sub) for name, sub in json.load(handle)["stages"].items()}
        explicit = {
            "keyframes": base,
            "interpolation": interpolation,
            "sr1": sr1,
            "sr2": sr2,
            "first_frame": first_frame,
        }
        stages = tuple(stages) if stages is not None else tuple(n for n in STAGES if n in saved) or STAGES
        _check_stage_names(stages, "stages")
        sources = {}
        for name in (*stages, "first_frame") if "sr1" in stages else stages:
            source = explicit[name] or saved.get(name)
            if source is None and name != "first_frame":
                if saved:
                    raise ValueError(f"{pretrained_model_name_or_path!r} has no {name!r} stage; pass {name}=... .")
                source = HUB_IDS[name]
            if source is not None:
                sources[name] = os.fspath(source)

        def load_kwargs(name: str) -> dict:
            stage_variant = variant.get(name) if isinstance(variant, dict) else variant
            return {"torch_dtype": torch_dtype, "variant": stage_variant, **kwargs}

        no_text = {"tokenizer": None, "text_encoder": None}
        pipelines = {
            "keyframes": Show1KeyframesPipeline.from_pretrained(sources["keyframes"], **load_kwargs("keyframes"))
        }
        if "interpolation" in sources:
            pipelines["interpolation"] = Show1InterpolationPipeline.from_pretrained(
                sources["interpolation"], **no_text, **load_kwargs("interpolation")
            )
        if "sr1" in sources:
            pipelines["sr1"] = Show1SuperResPipeline.from_pretrained(sources["sr1"], **no_text, **load_kwargs("sr1"))
        if "sr2" in sources:
            pipelines["sr2"] = VideoToVideoSDPipeline.from_pretrained(sources["sr2"], **load_kwargs("sr2"))
            pipelines["sr2"].vae.enable_slicing()
        if "first_frame" in sources:
            pipelines["first_frame_pipeline"] = IFSuperResolutionPipeline.from_pretrained(
                sources["first_frame"],
                **no_text,
                safety_checker=None,
                feature_extractor=None,
                watermarker=None,
                requires_safety_checker=False,
                **load_kwargs("first_frame"),
            )
        return cls(**pipelines)

    def stage_settings(self, stage_kwargs: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
        """Merge `stage_kwargs` over `DEFAULT_STAGE_KWARGS`, after checking names.

        Example:
            >>> cascade.stage_settings({"keyframes": {"num_inference_steps": 50}})["keyframes"]  # doctest: +SKIP
            {'num_inference_steps': 50, 'guidance_scale': 9.0}
        """
        stage_kwargs = stage_kwargs or {}
        unknown = sorted(set(stage_kwargs) - set(DEFAULT_STAGE_KWARGS))
        if unknown:
            raise ValueError(f"stage_kwargs has unknown stages {unknown}; use {sorted(DEFAULT_STAGE_KWARGS)}.")
        settings = {}
        for name, defaults in DEFAULT_STAGE_KWARGS.items():
            given = stage_kwargs.get(name) or {}
            reserved = set(_RESERVED)
            reserved |= {"height", "width"} if name in ("keyframes", "first_frame") else set()  # from call / SR1
            reserved |= {"negative_prompt"} if name != "sr2" else set()  # T5 embeddings are shared
            reserved = sorted(set(given) & reserved)
            if reserved:
                raise ValueError(
                    f"stage_kwargs[{name!r}] sets {reserved}, which the cascade passes itself; set them as "
                    "arguments of the cascade call."
                )
            settings[name] = {**defaults, **given}
        return settings

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        stages: tuple[str, ...],
        num_frames: int,
        height: int,
        width: int,
        settings: dict[str, dict[str, Any]],
    ) -> None:
        """Fail before any stage runs when the stages cannot place the frames or are not loaded.

        Example:
            >>> settings = cascade.stage_settings(None)  # doctest: +SKIP
            >>> cascade.check_inputs("a cat", ("keyframes", "sr1"), 8, 40, 64, settings)  # doctest: +SKIP
        """
        _check_stage_names(stages, "stages")
        missing = [name for name in stages if getattr(self, name) is None]
        if missing:
            raise ValueError(
                f"stages={stages} asks for {missing}, which this cascade has not loaded; load them with "
                f"from_pretrained(stages=...) or leave them out of stages."
            )
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive int.")
        frames = num_frames
        if "interpolation" in stages:
            if num_frames < 2:
                raise ValueError(f"num_frames={num_frames}: interpolation needs at least 2 keyframes.")
            frames = interpolated_num_frames(num_frames)
        for name in ("keyframes", "interpolation"):
            factor = downsampling_factor(getattr(self, name).unet) if name in stages else 1
            if height % factor or width % factor:
                raise ValueError(
                    f"height={height} and width={width} must be multiples of {factor} for the {name} stage's UNet."
                )
        if "sr1" in stages:
            factor = downsampling_factor(self.sr1.unet)
            sr1_height, sr1_width = settings["sr1"].get("height", 4 * height), settings["sr1"].get("width", 4 * width)
            if sr1_height % factor or sr1_width % factor:
                raise ValueError(
                    f"SR1 output {sr1_height} x {sr1_width} must be a multiple of {factor}, the SR1 UNet's "
                    "downsampling factor; change height/width or stage_kwargs['sr1']."
                )
            window_size = settings["sr1"].get("window_size", 8)
            try:
                window_starts(frames, window_size)
            except ValueError as error:
                raise ValueError(
                    f"num_frames={num_frames} keyframes give {frames} frames before SR1, which SR1 cannot place: "
                    f"{error} Use 8, 15 or 22 keyframes with interpolation."
                ) from None
        if "sr2" in stages and prompt is None:
            raise ValueError(
                "The sr2 stage encodes the text prompt with its own CLIP encoder: pass prompt, not only embeddings."
            )
        if "sr2" in stages:  # SR2's kernel choices: an unknown one, or Triton where it cannot run, fails now
            choices = {name: settings["sr2"].get(name, "auto") for name in SR2_KERNEL_ARGUMENTS}
            SR2Kernels(self.sr2.unet, **choices)._kernels_in_use()

    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompt and negative prompt once with the keyframe stage's T5, for stages 1-3.

        Example:
            >>> embeds, negative = cascade.encode_prompt("a panda surfing")  # doctest: +SKIP
        """
        self.keyframes.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        return self.keyframes.encode_prompt(
            prompt, negative_prompt, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 8,
        height: int = 40,
        width: int = 64,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        stages: Sequence[str] | None = None,
        stage_kwargs: dict[str, dict[str, Any]] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        return_stage_outputs: bool = False,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> Show1CascadeOutput | tuple:
        """Run the chosen stages on one prompt batch.

        Args:
            prompt: Prompt or prompts; or None with `prompt_embeds` (not with SR2, which needs text).
            num_frames: Keyframes (8 in Show-1); with SR1 they must interpolate to k * 7 + 1 frames (8, 15, 22).
            height: Keyframe height (40 in Show-1).
            width: Keyframe width (64 in Show-1).
            negative_prompt: T5 negative prompt(s) of stages 1-3; "" when None.
            generator: Random generator(s), used by the stages in turn.
            latents: (B, 3, num_frames, height, width) initial sample of the keyframe stage, for example
                inverted noise.
            prompt_embeds: Precomputed T5 embeddings instead of `prompt`.
            negative_prompt_embeds: Precomputed negative T5 embeddings.
            stages: Stages to run, in order, starting with `keyframes` (for example `("keyframes",)` or
                `("keyframes", "interpolation", "sr1")`); all loaded stages when None.
            stage_kwargs: Per-stage settings over `DEFAULT_STAGE_KWARGS`, by stage name (`keyframes`,
                `interpolation`, `first_frame`, `sr1`, `sr2`), for example
                `{"keyframes": {"num_inference_steps": 50, "guidance_scale": 7.5}}`.
            output_type: `"pt"`, `"np"` or `"pil"` for the final frames.
            return_dict: Return a `Show1CascadeOutput` rather than a tuple.
            return_stage_outputs: Also return each stage's pixels in `stage_frames`.
            callback_on_step_end: Given to stages 1-3 (`callback(stage_pipeline, step, timestep, tensors)`).
            callback_on_step_end_tensor_inputs: Tensor names the callback gets (`["latents"]`).

        Returns:
            `Show1CascadeOutput`, or `(frames, stage_frames)`.

        Example:
            >>> fast = {"keyframes": {"num_inference_steps": 50}}
            >>> out = cascade("a panda surfing", stages=("keyframes", "interpolation"), stage_kwargs=fast,
            ...               output_type="pt")  # doctest: +SKIP
            >>> out.frames.shape  # doctest: +SKIP
            torch.Size([1, 3, 29, 40, 64])
        """
        # 1. Check inputs
        stages = tuple(stages) if stages is not None else self.stages
        settings = self.stage_settings(stage_kwargs)
        self.check_inputs(prompt, stages, num_frames, height, width, settings)
        callbacks = {
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
        }

        # 2. Encode the prompt once; stages 1-3 share the embeddings
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds
        )
        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}

        # 3. Keyframes
        video = self._run_keyframes(
            **embeds,
            num_frames=num_frames,
            height=height,
            width=width,
            generator=generator,
            latents=latents,
            **callbacks,
            **settings["keyframes"],
        )
        stage_frames = {"keyframes": video}

        # 4. Interpolation
        if "interpolation" in stages:
            video = self._run_interpolation(
                video, **embeds, generator=generator, **callbacks, **settings["interpolation"]
            )
            stage_frames["interpolation"] = video

        # 5. Super-resolution 1, with the first frame from IF-II when loaded
        if "sr1" in stages:
            video = self._run_sr1(
                video,
                **embeds,
                generator=generator,
                first_frame_kwargs=settings["first_frame"],
                **callbacks,
                **settings["sr1"],
            )
            stage_frames["sr1"] = video

        # 6. Super-resolution 2 (latent, its own CLIP prompt)
        if "sr2" in stages:
            video = self._run_sr2(video, prompt, generator=generator, **settings["sr2"])
            stage_frames["sr2"] = video

        # 7. Post-process
        frames = postprocess_video(video, output_type)
        stage_frames = stage_frames if return_stage_outputs else None
        if not return_dict:
            return frames, stage_frames
        return Show1CascadeOutput(frames=frames, stage_frames=stage_frames)

    def _run_keyframes(self, **kwargs: Any) -> torch.Tensor:
        """Run stage 1 and return (B, 3, F, H, W) pixels; `kwargs` are `Show1KeyframesPipeline` arguments."""
        return self.keyframes(**kwargs, output_type="pt").frames

    def _run_interpolation(self, video: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run stage 2 on keyframes and return (B, 3, 4(F - 1) + 1, H, W) pixels."""
        return self.interpolation(video=video, **kwargs, output_type="pt").frames

    def _run_sr1(self, video: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run stage 3 (with IF-II for the first frame when loaded) and return (B, 3, F, 4H, 4W) pixels."""
        return self.sr1(video=video, first_frame_pipeline=self.first_frame_pipeline, **kwargs, output_type="pt").frames

    def _run_sr2(self, video: torch.Tensor, prompt: str | list[str], **kwargs: Any) -> torch.Tensor:
        """Run stage 4 (`super_resolve_video_latent`) and return (B, 3, F, 320, 576) pixels."""
        return super_resolve_video_latent(self.sr2, video, prompt, **kwargs)


def _check_stage_names(stages: tuple[str, ...], argument: str) -> None:
    if not stages or stages[0] != "keyframes" or any(name not in STAGES for name in stages):
        raise ValueError(f"{argument}={stages} must start with 'keyframes' and name stages of {STAGES}.")
    order = [STAGES.index(name) for name in stages]
    if order != sorted(set(order)):
        raise ValueError(f"{argument}={stages} must list each stage once, in the order {STAGES}.")
