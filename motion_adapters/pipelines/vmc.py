"""VMCPipeline: the Show-1 cascade with motions — learn one from a clip, load and combine them, share them.

The keyframe stage's UNet carries the motion adapters; interpolation and super-resolution stay untouched, as
in the paper. A call starts the keyframe stage from the active motion's noise prior (the DDIM inversion of the
training clip) unless told otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.injection import adapter_infos, set_adapter_scales, unload_adapter
from motion_adapters.inversion import ddim_invert
from motion_adapters.pipelines.cascade import Show1CascadePipeline
from motion_adapters.prompts import warn_if_scene_prompt
from motion_adapters.serialization import (
    MotionAdapter,
    apply_motion_adapter,
    load_motion_adapter,
    motion_from_unet,
    save_motion_adapter,
)
from motion_adapters.training import Callback, TrainingResult, train_motion

logger = logging.getLogger(__name__)

INVERT_WITH = ("base", "tuned")
"""Which keyframe UNet `VMCPipeline.train_motion` inverts the clip with: the pretrained one or the tuned one."""


class VMCPipeline(Show1CascadePipeline):
    """The Show-1 cascade with motion adapters on its keyframe UNet.

    Build it like the cascade (`VMCPipeline.from_pretrained(...)`, or from components), then `train_motion` on a
    clip or `load_motion` a shared one, and call it with new prompts.

    Example:
        >>> pipe = VMCPipeline.from_pretrained()  # doctest: +SKIP
        >>> pipe.load_motion("user/seagull-walk")  # doctest: +SKIP
        >>> video = pipe("a penguin is walking", output_type="pil").frames[0]  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._noise_priors: dict[str, torch.Tensor] = {}
        self._motions: dict[str, MotionAdapter] = {}
        self._default_size: tuple[int, int] = (40, 64)
        self._default_stage_kwargs: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_default(
        cls, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> VMCPipeline:
        """The embedded default model: a small Show-1 cascade pretrained on the shapes world.

        Keyframes are 8 x 32 x 32 and the cascade ends at 29 x 96 x 96; the pipeline carries the model's own
        default sizes and per-stage step counts.

        Example:
            >>> pipe = VMCPipeline.from_default()
            >>> pipe.default_height, pipe.default_width
            (32, 32)
        """
        from motion_adapters.world.default_model import DEFAULT_CALL_KWARGS, load_default_cascade

        cascade = load_default_cascade(device=device, dtype=dtype)
        pipe = cls(cascade.keyframes, cascade.interpolation, cascade.sr1, cascade.sr2, cascade.first_frame_pipeline)
        pipe._default_size = (DEFAULT_CALL_KWARGS["height"], DEFAULT_CALL_KWARGS["width"])
        pipe._default_stage_kwargs = {k: dict(v) for k, v in DEFAULT_CALL_KWARGS["stage_kwargs"].items()}
        return pipe

    # ------------------------------------------------------------------ motions
    @property
    def unet(self) -> torch.nn.Module:
        """The keyframe UNet, which carries the motions."""
        return self.keyframes.unet

    @property
    def motions(self) -> dict[str, float]:
        """Loaded motions and their current weights."""
        from motion_adapters.injection import _state

        return {name: _state(self.unet).scales.get(name, 1.0) for name in adapter_infos(self.unet)}

    def load_motion(
        self,
        path_or_repo_id: str | os.PathLike,
        adapter_name: str | None = None,
        scale: float = 1.0,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | None = None,
    ) -> str:
        """Load a motion from a folder or a Hub id onto the keyframe UNet; other loaded motions stay active.

        Args:
            path_or_repo_id: a motion folder or a Hub id like "user/seagull-walk".
            adapter_name: the name to load it under (default: the folder or repo name).
            scale: the motion's weight.
            revision: Hub branch, tag or commit.
            cache_dir: Hub cache folder.
            local_files_only: use only the local cache.
            token: Hub token for private repositories.

        Returns:
            The adapter name it was loaded under.

        Example:
            >>> pipe.load_motion("user/seagull-walk", scale=0.8)  # doctest: +SKIP
            'seagull-walk'
        """
        from motion_adapters.hub import resolve_motion_path

        folder = resolve_motion_path(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        motion = load_motion_adapter(folder)
        name = adapter_name or _default_name(path_or_repo_id)
        apply_motion_adapter(self.unet, motion, adapter_name=name, scale=scale)
        self._motions[name] = motion
        if motion.noise_prior is not None:
            self._noise_priors[name] = motion.noise_prior
        return name

    def set_motions(self, adapter_names: Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Activate the named motions with weights (1.0 each by default); the rest are switched off.

        Example:
            >>> pipe.set_motions(["walk", "wave"], [1.0, 0.5])  # doctest: +SKIP
        """
        set_adapter_scales(self.unet, list(adapter_names), None if weights is None else list(weights))

    def unload_motion(self, adapter_name: str | None = None) -> None:
        """Remove one motion (or all) and restore the keyframe UNet's base weights.

        Example:
            >>> pipe.unload_motion()  # doctest: +SKIP
        """
        unload_adapter(self.unet, adapter_name)
        for name in [adapter_name] if adapter_name else list(self._noise_priors):
            self._noise_priors.pop(name, None)
            self._motions.pop(name, None)

    def save_motion(
        self, save_directory: str | os.PathLike, adapter_name: str | None = None, compress_rank: int | None = None
    ) -> Path:
        """Write a motion of this pipeline to a folder (tensors, config, noise prior).

        Example:
            >>> pipe.save_motion("motions/seagull-walk")  # doctest: +SKIP
        """
        name = adapter_name or _only(adapter_infos(self.unet), "adapter_name")
        motion = self._motions.get(name)
        if motion is not None and compress_rank is None and motion.info.mode == "lora":
            return save_motion_adapter(motion, save_directory)
        trained = motion_from_unet(
            self.unet,
            name,
            distillation=motion.distillation if motion else None,
            training=motion.training if motion else None,
            noise_prior=self._noise_priors.get(name),
            compress_rank=compress_rank,
        )
        return save_motion_adapter(trained, save_directory)

    def push_motion_to_hub(self, repo_id: str, adapter_name: str | None = None, **kwargs: Any) -> str:
        """Save a motion to a temporary folder and upload it with a model card; returns the commit URL.

        Example:
            >>> pipe.push_motion_to_hub("user/seagull-walk")  # doctest: +SKIP
        """
        import tempfile

        from motion_adapters.hub import push_motion_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_motion(tmp, adapter_name)
            return push_motion_to_hub(tmp, repo_id, **kwargs)

    # ------------------------------------------------------------------ learning
    def invert(
        self, video: torch.Tensor, num_inference_steps: int = 75, schedule: str = "model", progress: bool = True
    ) -> torch.Tensor:
        """DDIM-invert a clip (1, 3, F, H, W) in [-1, 1] with the keyframe UNet and the empty prompt.

        Example:
            >>> noise = pipe.invert(clip[None])  # doctest: +SKIP
        """
        empty, _ = self.encode_prompt("", None, None, None)
        return ddim_invert(
            self.unet,
            video,
            empty[:1],
            self.keyframes.scheduler,
            num_inference_steps=num_inference_steps,
            schedule=schedule,
            progress=progress,
        )

    def train_motion(
        self,
        video: torch.Tensor | str | os.PathLike,
        prompt: str,
        config: MotionDistillationConfig | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        adapter_name: str = "default",
        invert: bool = True,
        num_inversion_steps: int = 75,
        inversion_schedule: str = "model",
        invert_with: str = "base",
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        video_kwargs: dict[str, Any] | None = None,
    ) -> TrainingResult:
        """Learn the motion of one clip into the keyframe UNet (VMC) and invert the clip for its noise prior.

        The prompt is encoded once by T5; during training the text encoder is moved off the accelerator and
        put back afterwards. Only the keyframe UNet's temporal attention trains.

        Args:
            video: a clip file/folder (read with `motion_adapters.video.load_video` at the keyframe size) or a
                (3, F, H, W) / (1, 3, F, H, W) tensor in [-1, 1].
            prompt: the appearance-invariant prompt ("a seagull is walking"); a scene description triggers a
                warning with a suggestion.
            config: hyperparameters (`MotionDistillationConfig`); its `prompt` is set to `prompt`.
            output_dir: where to save checkpoints and the motion.
            adapter_name: the adapter's name on the UNet.
            invert: compute and store the noise prior.
            num_inversion_steps: DDIM inversion steps.
            inversion_schedule: "model" or "scaled_linear".
            invert_with: which UNet inverts the clip. "base" (default): the keyframe UNet before this motion
                is learned, with every loaded motion switched off, so the prior is the clip's inversion by the
                pretrained model; "tuned": the UNet after training, as the paper describes. On the embedded
                default model "base" keeps the clip's motion in the prior and "tuned" loses it
                (docs/ablation.md measures both).
            callbacks: training callbacks.
            progress: show progress bars.
            video_kwargs: extra `load_video` arguments (stride, start, resize_mode, reverse).

        Example:
            >>> result = pipe.train_motion("seagull.mp4", "a seagull is walking", output_dir="seagull-walk")
            ... # doctest: +SKIP
        """
        if invert_with not in INVERT_WITH:
            raise ValueError(
                f"invert_with={invert_with!r} must be one of {INVERT_WITH}: 'base' inverts with the pretrained UNet "
                "before training, 'tuned' with the UNet after it (the paper)."
            )
        base = (config or MotionDistillationConfig()).to_dict()
        base["prompt"] = prompt
        config = MotionDistillationConfig.from_dict(base)
        # train_motion saves checkpoints (and a motion without prior) into output_dir as it goes; the final
        # motion with its noise prior replaces that folder's files at the end
        warn_if_scene_prompt(prompt)
        clip = self._prepare_clip(video, config, video_kwargs or {})
        noise = None
        if invert and invert_with == "base":
            noise = self._invert_without_motions(clip, num_inversion_steps, inversion_schedule, progress)
        embeds, _ = self.encode_prompt(prompt, None, None, None)
        embeds = embeds[:1].detach()
        encoder = self.keyframes.text_encoder
        encoder_device = next(encoder.parameters()).device
        if encoder_device.type != "cpu":
            encoder.to("cpu")
            torch.cuda.empty_cache()
        try:
            noise_scheduler = DDPMScheduler.from_config(self.keyframes.scheduler.config)
            facts = {"prompt": prompt, "num_frames": clip.shape[2], "height": clip.shape[3], "width": clip.shape[4]}
            if isinstance(video, (str, os.PathLike)):
                facts["clip"] = Path(video).name
            base = getattr(self.unet.config, "_name_or_path", None)
            if base:
                facts["base_model"] = str(base)
            result = train_motion(
                self.unet,
                clip,
                embeds,
                noise_scheduler,
                config,
                adapter_name=adapter_name,
                output_dir=output_dir,
                callbacks=callbacks,
                progress=progress,
                training_info=facts,
            )
        finally:  # the encoder goes back before the inversion, which encodes the empty prompt with it
            encoder.to(encoder_device)
        try:
            if invert and invert_with == "tuned":
                noise = self.invert(clip, num_inversion_steps, inversion_schedule, progress=progress).cpu()
            if noise is not None:
                self._noise_priors[adapter_name] = noise
                facts["noise_prior_inverted_with"] = invert_with
            losses = result.losses
            facts.update(
                steps=len(losses),
                loss_first=losses[0],
                loss_last=losses[-1],
                losses=[round(v, 6) for v in losses],
                seconds=round(result.seconds, 3),
            )
            self._motions[adapter_name] = motion_from_unet(
                self.unet, adapter_name, distillation=config.to_dict(), training=facts, noise_prior=noise
            )
            if output_dir is not None:
                result.output_dir = save_motion_adapter(self._motions[adapter_name], output_dir)
        finally:
            self.unet.requires_grad_(False)
        return result

    def _invert_without_motions(self, clip: torch.Tensor, steps: int, schedule: str, progress: bool) -> torch.Tensor:
        """`invert` with every loaded motion switched off for the inversion, then their weights restored."""
        weights = self.motions
        if weights:
            self.set_motions([])
        try:
            return self.invert(clip, steps, schedule, progress=progress).cpu()
        finally:
            if weights:
                self.set_motions(list(weights), list(weights.values()))

    def _prepare_clip(self, video, config: MotionDistillationConfig, video_kwargs: dict) -> torch.Tensor:
        if isinstance(video, (str, os.PathLike)):
            from motion_adapters.video import load_video

            size = (config.height or self.default_height, config.width or self.default_width)
            video = load_video(video, num_frames=config.num_frames, size=size, **video_kwargs)
        if not isinstance(video, torch.Tensor):
            raise ValueError(f"video must be a path or a tensor; got {type(video).__name__}.")
        video = video.unsqueeze(0) if video.ndim == 4 else video
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(
                f"video must be (3, F, H, W) or (1, 3, F, H, W) pixels in [-1, 1]; got {tuple(video.shape)}."
            )
        return video.to(self.device, torch.float32)

    @property
    def default_height(self) -> int:
        """Keyframe height used when neither the call nor the noise prior fixes one."""
        return int(self._default_size[0])

    @property
    def default_width(self) -> int:
        """Keyframe width used when neither the call nor the noise prior fixes one."""
        return int(self._default_size[1])

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        *args: Any,
        latents: torch.Tensor | None = None,
        noise_prior: str | bool | None = True,
        stage_kwargs: dict[str, dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        """Generate with the loaded motions; see `Show1CascadePipeline.__call__` for the other arguments.

        Args:
            prompt: the new prompt (new subject, scene or style for the motion).
            num_frames: keyframes; default: the noise prior's, else 8.
            height: keyframe height; default: the noise prior's, else the pipeline default.
            width: keyframe width; default: the noise prior's, else the pipeline default.
            latents: an explicit initial sample (overrides the noise prior).
            noise_prior: True (default) starts from the active motion's inverted noise when one is loaded; an
                adapter name picks that motion's prior; False/None starts from random noise.
            stage_kwargs: per-stage settings, merged over this pipeline's defaults (the embedded model's step
                counts and sizes, or Show-1's).

        Example:
            >>> pipe("a penguin is walking", output_type="pil").frames[0]  # doctest: +SKIP
        """
        if latents is None and noise_prior:
            latents = self._pick_noise_prior(noise_prior)
        if latents is not None:
            num_frames = num_frames or latents.shape[2]
            height = height or latents.shape[3]
            width = width or latents.shape[4]
            if (num_frames, height, width) != tuple(latents.shape[2:]):
                raise ValueError(
                    f"the initial sample is {tuple(latents.shape[2:])} (frames, height, width) but the call asks for "
                    f"{(num_frames, height, width)}: drop the size arguments, or pass noise_prior=False."
                )
            batch = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
            latents = latents.expand(batch, *latents.shape[1:]).to(self.device)
        merged = {name: dict(values) for name, values in self._default_stage_kwargs.items()}
        for name, values in (stage_kwargs or {}).items():
            merged[name] = {**merged.get(name, {}), **(values or {})}
        return super().__call__(
            prompt,
            num_frames or 8,
            height or self.default_height,
            width or self.default_width,
            *args,
            latents=latents,
            stage_kwargs=merged,
            **kwargs,
        )

    def _pick_noise_prior(self, choice: str | bool) -> torch.Tensor | None:
        active = [n for n, w in self.motions.items() if w != 0 and n in self._noise_priors]
        if isinstance(choice, str):
            if choice not in self._noise_priors:
                raise ValueError(
                    f"noise_prior={choice!r}: no loaded motion of that name has a noise prior; "
                    f"motions with one: {sorted(self._noise_priors)}."
                )
            return self._noise_priors[choice]
        if not active:
            return None
        if len(active) > 1:
            logger.info("several active motions have noise priors; starting from %r's", active[0])
        return self._noise_priors[active[0]]


def _default_name(path_or_repo_id: str | os.PathLike) -> str:
    name = Path(str(path_or_repo_id).rstrip("/")).name or "motion"
    return name.replace(".", "-")


def _only(infos: dict, argument: str) -> str:
    if len(infos) != 1:
        raise ValueError(f"{len(infos)} motions are loaded ({sorted(infos)}): pass {argument}= to pick one.")
    return next(iter(infos))
