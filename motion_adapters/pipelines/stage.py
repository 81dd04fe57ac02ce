"""The base class of the Show-1 stage pipelines: components, T5 prompts, denoising loop, loading."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import DiffusionPipeline, schedulers
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download
from transformers import T5EncoderModel, T5Tokenizer

from motion_adapters.config import (
    CUDA_GRAPHS,
    MEMORY_FORMATS,
    NORM_KERNELS,
    TEMPORAL_KERNELS,
    TRITON_TEMPORAL_FALLBACK,
)
from motion_adapters.fused_norm import fused_norm_available
from motion_adapters.layout import channels_last_sampling
from motion_adapters.lean_backward import fused_norm_activations
from motion_adapters.models import Show1UNet3DConditionModel
from motion_adapters.pipelines._graph import GraphedCall
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
from motion_adapters.training_step import temporal_kernels

logger = logging.get_logger(__name__)

__all__ = ["Show1StagePipeline"]


class Show1StagePipeline(DiffusionPipeline):
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
    # What temporal_kernels="auto" runs on a GPU, chosen per stage by benchmarks/bench_stage_kernels.py at real
    # sizes; each stage class sets its own. A Triton choice falls back to its SDPA twin where Triton is missing.
    _gpu_temporal_kernels = "library"
    # What norm_kernels="auto" runs on a GPU, chosen the same way (H200): PyTorch's kernels for the keyframe stage,
    # whose small activations make the fused kernels' launches from Python cost more than they save (0.157 against
    # 0.120 s a call, stage_kernels_fused_h200.json); the fused kernels where they measured faster.
    _gpu_norm_kernels = "torch"
    # What memory_format="auto" runs on a GPU, chosen the same way; each stage class sets its own.
    _gpu_memory_format = "contiguous"
    # (norm kernels, memory format) that "auto" runs instead where the UNet calls run eagerly (no CUDA graph): a
    # stage whose choice pays only once Python's launches are gone sets them; None keeps the choices above.
    _gpu_eager_choices: tuple[str, str] | None = None
    temporal_kernels = "auto"
    norm_kernels = "auto"
    memory_format = "auto"
    cuda_graph = "auto"
    _graphed = None

    def set_temporal_kernels(self, choice: str) -> None:
        """Choose how the UNet's temporal layers run while this pipeline denoises (same weights, same function).

        "library" runs them as built; "math_attention", "conv2d", "fast", "triton_attention", "triton_fast",
        "triton_conv" and "triton" are the kernels of `motion_adapters.training_step.temporal_kernels`, swapped in
        for each call and restored after it (the Triton ones need a CUDA device with Triton installed); "auto" (the
        default) picks the measured fastest for the stage on a GPU (Triton frame attention for every stage, its
        twin without Triton, math-kernel SDPA, where Triton is missing) and "library" elsewhere.

        Example:
            >>> pipe.set_temporal_kernels("math_attention")  # doctest: +SKIP
        """
        if choice not in TEMPORAL_KERNELS:
            raise ValueError(f"temporal kernels must be one of {TEMPORAL_KERNELS}, got {choice!r}.")
        self.temporal_kernels = choice

    def set_norm_kernels(self, choice: str) -> None:
        """Choose the kernels of the UNet's group norm -> activation pairs while this pipeline denoises.

        "torch" runs them as built; "triton" runs each pair as the fused kernels of `motion_adapters.fused_norm`
        (`lean_backward.fused_norm_activations`: float32 statistics, one rounding at the output, so samples differ
        from "torch" by bf16 rounding); "auto" (the default) is, on a GPU where Triton is installed, what measured
        faster for the stage (the fused kernels; for the keyframes only where its UNet calls replay from CUDA graphs,
        PyTorch's where they run eagerly), else "torch". The measurements are in docs/performance.md.

        Example:
            >>> pipe.set_norm_kernels("torch")  # doctest: +SKIP
        """
        if choice not in NORM_KERNELS:
            raise ValueError(f"norm kernels must be one of {NORM_KERNELS}, got {choice!r}.")
        self.norm_kernels = choice

    def set_memory_format(self, choice: str) -> None:
        """Choose the layout of the UNet's activations while this pipeline denoises (same weights, same function).

        "contiguous" runs the UNet as built (NCHW activations); "channels_last" keeps its activations channels-last
        from `conv_in` on (`motion_adapters.layout.channels_last_sampling`: convolution weights stored
        channels-last for the call, group norms on the channels-last kernels of `motion_adapters.fused_norm`
        where Triton runs, so that cuDNN converts no layout); "auto" (the default) is what measured faster for the
        stage on a GPU where Triton runs (channels-last; for the keyframes only where its UNet calls replay from CUDA
        graphs, contiguous where they run eagerly), else "contiguous". Samples differ by bf16 rounding.

        Example:
            >>> pipe.set_memory_format("channels_last")  # doctest: +SKIP
        """
        if choice not in MEMORY_FORMATS:
            raise ValueError(f"memory format must be one of {MEMORY_FORMATS}, got {choice!r}.")
        self.memory_format = choice

    def set_cuda_graph(self, choice: str) -> None:
        """Choose whether the UNet's calls replay from a CUDA graph while this pipeline denoises.

        "auto" (the default) and "yes" run the first UNet call of a pipeline call eagerly, capture the second in a
        CUDA graph and replay it for every later step (the inputs copied into the graph's buffers, the graph
        dropped when the call returns); "auto" falls back to eager calls with a warning where capture fails,
        "yes" raises. "no" never captures. Only on CUDA, and not for a UNet with an offload hook
        (`enable_model_cpu_offload`); forward hooks on the UNet run during the eager call and the capture only.

        Example:
            >>> pipe.set_cuda_graph("no")  # doctest: +SKIP
        """
        if choice not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graph must be one of {CUDA_GRAPHS}, got {choice!r}.")
        self.cuda_graph = choice

    def _memory_format_in_use(self) -> str:
        """The memory format a call runs now: "auto" resolved for the UNet's device."""
        if self.memory_format != "auto":
            return self.memory_format
        usable = self.unet.device.type == "cuda" and fused_norm_available()  # the layout needs the Triton norms
        return self._gpu_auto_choices()[1] if usable else "contiguous"

    def _gpu_auto_choices(self) -> tuple[str, str]:
        """(norm kernels, memory format) that "auto" asks for on a GPU: the eager ones where no graph runs."""
        if self._gpu_eager_choices and not self._graphs_run():
            return self._gpu_eager_choices
        return self._gpu_norm_kernels, self._gpu_memory_format

    def _graphs_run(self) -> bool:
        """Whether a call captures and replays its UNet calls.

        That is: `cuda_graph` allows it, on CUDA, without an offload hook (which moves weights in its forward, which
        a graph cannot replay).
        """
        return self.cuda_graph != "no" and self.unet.device.type == "cuda" and not hasattr(self.unet, "_hf_hook")

    def _kernels_in_use(self) -> tuple[str, str]:
        """(temporal kernels, norm kernels) that a call runs now: "auto" resolved for the UNet's device.

        Raises:
            ValueError: Triton temporal or norm kernels asked for where Triton cannot run.
        """
        on_gpu = self.unet.device.type == "cuda"
        usable = on_gpu and fused_norm_available()
        temporal = self.temporal_kernels
        if temporal == "auto":
            temporal = self._gpu_temporal_kernels if on_gpu else "library"
            if temporal.startswith("triton") and not usable:  # a GPU without Triton: the measured next best
                temporal = TRITON_TEMPORAL_FALLBACK[temporal]
        elif temporal.startswith("triton") and not usable:
            raise ValueError(
                f"temporal_kernels={temporal!r} needs the UNet on a CUDA device with Triton installed (it is on "
                f"{self.unet.device}): call pipe.set_temporal_kernels('auto') or pipe.set_temporal_kernels('library')."
            )
        if self.norm_kernels == "triton" and not usable:
            raise ValueError(
                f"norm_kernels='triton' needs the UNet on a CUDA device with Triton installed (it is on "
                f"{self.unet.device}): call pipe.set_norm_kernels('auto') or pipe.set_norm_kernels('torch')."
            )
        wanted = self._gpu_auto_choices()[0] if self.norm_kernels == "auto" else self.norm_kernels
        return temporal, "triton" if usable and wanted == "triton" else "torch"

    @contextmanager
    def _temporal_kernels(self) -> Iterator[None]:
        """The context that runs this pipeline's UNet with the chosen kernels, memory format and CUDA graph."""
        temporal, norms = self._kernels_in_use()
        graphed = self._graphs_run()
        with temporal_kernels(self.unet, temporal), fused_norm_activations(self.unet, norms == "triton"), \
                channels_last_sampling(self.unet, self._memory_format_in_use() == "channels_last"):
            if graphed:
                self._graphed = GraphedCall(self._unet_output, strict=self.cuda_graph == "yes")
            try:
                yield
            finally:
                if self._graphed is not None:
                    self._graphed.close()
                self._graphed = None

    def _unet_output(self, sample, timestep, encoder_hidden_states, class_labels, cross_attention_kwargs=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                         cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]  # fmt: skip

    def _call_unet(self, sample, timestep, encoder_hidden_states, class_labels, cross_attention_kwargs):
        """One UNet call of the sampling loop: replayed from the CUDA graph where one is in use."""
        if self._graphed is None or cross_attention_kwargs or sample.device.type != "cuda":
            return self._unet_output(sample, timestep, encoder_hidden_states, class_labels, cross_attention_kwargs)
        timestep = torch.as_tensor(timestep, device=sample.device)  # inputs the graph copies must live on the GPU
        class_labels = None if class_labels is None else torch.as_tensor(class_labels, device=sample.device)
        return self._graphed(sample, timestep, encoder_hidden_states, class_labels)

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
