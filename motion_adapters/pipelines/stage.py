"""The base class of the Show-1 stage pipelines: components, T5 prompts, denoising loop, loading."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, schedulers
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download
from transformers import T5EncoderModel, T5Tokenizer

from motion_adapters.models import Show1UNet3DConditionModel
from motion_adapters.pipelines._kernels import SamplingKernels
from motion_adapters.pipelines._utils import (
    HUB_KWARGS,
    OUTPUT_TYPES,
    T5_MAX_LENGTH,
    combine_guidance,
    downsampling_factor,
    embedding_width,
    eval_mode,
    scheduler_step_per_frame,
)

logger = logging.get_logger(__name__)

__all__ = ["Show1StagePipeline"]


class Show1StagePipeline(DiffusionPipeline, SamplingKernels):
    """Base of the Show-1 pixel stage pipelines: T5 prompts, noise, callbacks, checks and loading.

    Subclasses register `tokenizer`, `text_encoder` (both optional: stages 2 and 3 of a cascade reuse the
    embeddings of stage 1), `unet` and `scheduler`, and write `__call__`.

    Example:
        >>> from motion_adapters.pipelines import Show1KeyframesPipeline
        >>> issubclass(Show1KeyframesPipeline, Show1StagePipeline)
        True
    """

    model_cpu_offload_seq = "text_encoder->unet"
    _optional_components = ["tokenizer", "text_encoder"]
    _callback_tensor_inputs = ["latents"]
    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        do_classifier_free_guidance: bool = True,
        device: torch.device | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode prompts with T5 (max length 77, padded, truncated, lower-cased and stripped as Show-1 does).

        The attention mask goes to T5, not to the UNet. Precomputed embeddings are passed through, moved to the
        UNet's device and dtype. The negative prompt defaults to "".

        Args:
            prompt: Prompt or prompts; or None with `prompt_embeds`.
            negative_prompt: Negative prompt(s); "" when None.
            do_classifier_free_guidance: Whether to return negative embeddings too.
            device: Where the embeddings go; the execution device when None.
            prompt_embeds: Precomputed (B, L, D) T5 embeddings.
            negative_prompt_embeds: Precomputed negative embeddings, same shape.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`; the second is None without guidance.

        Example:
            >>> embeds, negative = pipe.encode_prompt("a cat runs")  # doctest: +SKIP
            >>> embeds.shape  # (1, 77, 4096) with the T5 XXL of show-1-base  # doctest: +SKIP
        """
        device = device or self._execution_device
        dtype = self.unet.dtype
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch_size = prompt_embeds.shape[0] if prompt_embeds is not None else len(_as_list(prompt))
            if negative_prompt is None:
                negative_prompt = [""] * batch_size
            elif isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * batch_size
            if prompt_embeds is None:  # one T5 pass for both (one stream of its weights when it is offloaded)
                both = self._t5(_as_list(prompt) + _as_list(negative_prompt), device)
                prompt_embeds, negative_prompt_embeds = both[:batch_size], both[batch_size:]
            else:
                negative_prompt_embeds = self._t5(negative_prompt, device)
        if prompt_embeds is None:
            prompt_embeds = self._t5(prompt, device)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        return prompt_embeds, negative_prompt_embeds.to(device=device, dtype=dtype)

    def _t5(self, prompt: str | list[str], device: torch.device) -> torch.Tensor:
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                f"{type(self).__name__} has no tokenizer or text_encoder, so it cannot encode prompt={prompt!r}; "
                "pass prompt_embeds and negative_prompt_embeds (a cascade passes the keyframe stage's)."
            )
        prompt = [text.lower().strip() for text in _as_list(prompt)]
        tokens = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=T5_MAX_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        with eval_mode(self.text_encoder):
            return self.text_encoder(
                tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
            ).last_hidden_state

    def check_prompt_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> int:
        """Validate the prompt arguments and return the batch size.

        Example:
            >>> pipe.check_prompt_inputs("a cat", None, None, None)  # doctest: +SKIP
            1
        """
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError(
                f"Pass exactly one of prompt={prompt!r} and prompt_embeds "
                f"(shape {None if prompt_embeds is None else tuple(prompt_embeds.shape)})."
            )
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of negative_prompt and negative_prompt_embeds, not both.")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but the batch has {batch_size} prompts; "
                "pass one negative prompt per prompt, or a single string."
            )
        width = embedding_width(self.unet)
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is None:
                continue
            if embeds.ndim != 3 or embeds.shape[-1] != width:
                raise ValueError(
                    f"{name} has shape {tuple(embeds.shape)}, but the UNet takes (batch, length, {width}) "
                    f"text embeddings (encoder_hid_dim); encode the prompt with this pipeline's T5."
                )
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds has "
                    f"{tuple(prompt_embeds.shape)}; they must match."
                )
        return batch_size

    def check_common_inputs(
        self, height: int, width: int, output_type: str, callback_on_step_end_tensor_inputs: list[str]
    ) -> None:
        """Validate frame size, output type and callback tensor names.

        Example:
            >>> pipe.check_common_inputs(40, 64, "pt", ["latents"])  # doctest: +SKIP
        """
        factor = downsampling_factor(self.unet)
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(
                f"height={height} and width={width} must be positive multiples of {factor}, the downsampling "
                f"factor of this UNet ({len(self.unet.config.block_out_channels)} blocks); round them to a multiple."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; use one of {OUTPUT_TYPES}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {unknown}; this pipeline offers "
                f"{self._callback_tensor_inputs}."
            )

    def prepare_latents(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
        init_noise_sigma: float = 1.0,
    ) -> torch.Tensor:
        """Return the initial sample: standard normal noise (or the given `latents`) times `init_noise_sigma`.

        Args:
            shape: Expected (B, C, F, H, W).
            dtype: Sample dtype.
            device: Sample device.
            generator: Random generator(s) for the noise.
            latents: A sample to start from instead of fresh noise (for example inverted noise); must have `shape`.
            init_noise_sigma: The scheduler's `init_noise_sigma` (1.0 for DPMSolver).

        Example:
            >>> shape = (1, 3, 8, 40, 64)
            >>> pipe.prepare_latents(shape, torch.float32, torch.device("cpu"), None).shape  # doctest: +SKIP
            torch.Size([1, 3, 8, 40, 64])
        """
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != tuple(shape):
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}, expected {tuple(shape)}; pass noise of that shape."
            )
        return latents.to(device=device, dtype=dtype) * init_noise_sigma

    def denoise_step(
        self,
        scheduler,
        latents: torch.Tensor,
        t: torch.Tensor,
        i: int,
        *,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: float,
        do_classifier_free_guidance: bool,
        learned_variance: bool,
        extra: dict,
        callback_on_step_end,
        tensor_inputs: list[str],
        condition: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """One sampling step shared by every stage: condition, guidance batch, UNet, guidance, per-frame step.

        `condition` is concatenated to the sample along channels (interpolation, SR); `class_labels` is the SR
        noise level. Returns the next `latents`, after the step-end callback.
        """
        model_input = latents if condition is None else torch.cat([latents, condition], dim=1)
        model_input = torch.cat([model_input] * 2) if do_classifier_free_guidance else model_input
        model_input = scheduler.scale_model_input(model_input, t)
        model_output = self._call_unet(model_input, t, encoder_hidden_states, class_labels, cross_attention_kwargs)
        noise_pred = combine_guidance(
            model_output,
            guidance_scale=guidance_scale,
            sample_channels=latents.shape[1],
            do_classifier_free_guidance=do_classifier_free_guidance,
            learned_variance=learned_variance,
        )
        latents = scheduler_step_per_frame(scheduler, noise_pred, t, latents, **extra)
        return self.run_step_end_callback(callback_on_step_end, tensor_inputs, i, t, {"latents": latents})["latents"]

    def run_step_end_callback(
        self,
        callback: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        tensor_inputs: list[str],
        step: int,
        timestep: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Call `callback(self, step, timestep, {name: tensor})` and return the tensors with its replacements.

        Example:
            >>> tensors = pipe.run_step_end_callback(None, ["latents"], 0, t, {"latents": x})  # doctest: +SKIP
        """
        if callback is None:
            return tensors
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        outputs = callback(self, step, timestep, {name: tensors[name] for name in tensor_inputs}) or {}
        return {name: outputs.get(name, tensor) for name, tensor in tensors.items()}

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None, **kwargs
    ) -> Show1StagePipeline:
        """Load a stage from a Show-1 Hub repository or a local folder, mapping its UNet entry to our class.

        `model_index.json` names the UNet as `showone.models.unet_3d_condition.UNet3DConditionModel`; no code
        named by a file is imported: the UNet loads as `Show1UNet3DConditionModel`, T5 as `T5EncoderModel`,
        the tokenizer as `T5Tokenizer`, schedulers as the diffusers scheduler class the file names. Components
        the pipeline does not use (`feature_extractor`, `safety_checker`, `watermarker`) are skipped.

        Args:
            pretrained_model_name_or_path: Hub id (`showlab/show-1-base`) or local folder.
            torch_dtype: dtype of the UNet and T5.
            **kwargs: Components to use instead of loading them (`text_encoder=None` skips T5), `variant`, and
                the Hub arguments `cache_dir`, `revision`, `token`, `local_files_only`, `force_download`,
                `proxies`.

        Example:
            >>> pipe = Show1KeyframesPipeline.from_pretrained("showlab/show-1-base", torch_dtype=torch.float16,
            ...                                               variant="fp16")  # doctest: +SKIP
        """
        path = os.fspath(pretrained_model_name_or_path)
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
        variant = kwargs.pop("variant", None)
        expected = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(kwargs) - set(expected))
        if unknown:
            raise ValueError(
                f"{cls.__name__}.from_pretrained got unknown arguments {unknown}; components are {expected}."
            )
        if os.path.isdir(path):
            index_file = os.path.join(path, "model_index.json")
        else:
            index_file = hf_hub_download(path, "model_index.json", **hub_kwargs)
        with open(index_file, encoding="utf-8") as handle:
            index = json.load(handle)
        components = {}
        for name in expected:
            if name in kwargs:
                components[name] = kwargs[name]
                continue
            library, class_name = (index.get(name) or [None, None])[:2]
            if class_name is None:
                components[name] = cls._default_component(name, path)
                continue
            components[name] = _load_component(name, class_name, path, torch_dtype, variant, hub_kwargs)
        skipped = sorted(set(index) - set(expected) - {key for key in index if key.startswith("_")})
        if skipped:
            logger.info(f"{cls.__name__}: not loading unused components {skipped} of {path}.")
        return cls(**components)

    @classmethod
    def _default_component(cls, name: str, path: str) -> object:
        if name in cls._optional_components:
            return None
        raise ValueError(f"{path}/model_index.json has no {name!r} entry, which {cls.__name__} needs.")


def _as_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _load_component(
    name: str, class_name: str, path: str, torch_dtype: torch.dtype | None, variant: str | None, hub_kwargs: dict
) -> object:
    """Load one component of a Show-1 folder with a class this package chooses, never one a file names."""
    if name == "unet":
        return Show1UNet3DConditionModel.from_pretrained(
            path, subfolder="unet", torch_dtype=torch_dtype, variant=variant, **hub_kwargs
        )
    if name == "text_encoder":
        return T5EncoderModel.from_pretrained(
            path, subfolder="text_encoder", dtype=torch_dtype, variant=variant, **hub_kwargs
        )
    if name == "tokenizer":
        return T5Tokenizer.from_pretrained(path, subfolder="tokenizer", **hub_kwargs)
    if name.endswith("scheduler"):
        scheduler_class = getattr(schedulers, class_name, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
            raise ValueError(f"{path}: {name} names {class_name!r}, which is not a diffusers scheduler class.")
        return scheduler_class.from_pretrained(path, subfolder=name, **hub_kwargs)
    raise ValueError(f"{path}: no loader for component {name!r} ({class_name}).")
