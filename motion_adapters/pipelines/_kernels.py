"""How a pipeline's UNet runs while it samples: temporal kernels, norm kernels, memory format, CUDA graph.

`SamplingKernels` holds the four choices, resolves "auto" for the UNet's device from what each pipeline measured
fastest on a GPU (its `_gpu_*` class attributes), and runs the UNet with them for one pipeline call. The Show-1
stage pipelines inherit it; SR2, a diffusers `VideoToVideoSDPipeline`, runs through `graphed_unet_calls` with an
instance of its own (`show1_superres.super_resolve_video_latent`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.unets.unet_3d_condition import UNet3DConditionOutput
from torch import nn

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
from motion_adapters.pipelines._graph import GraphedCall
from motion_adapters.training_step import temporal_kernels

__all__ = ["SamplingKernels", "graphed_unet_calls"]


class SamplingKernels:
    """The kernels, memory format and CUDA graph a pipeline's `unet` samples with (a mixin; see the module).

    A subclass sets `unet` and may override `_unet_output` (the call a graph captures) and `_fix` (how a user
    changes a choice, for error messages).
    """

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
                f"{self.unet.device}): {self._fix('temporal_kernels', 'auto', 'library')}."
            )
        if self.norm_kernels == "triton" and not usable:
            raise ValueError(
                f"norm_kernels='triton' needs the UNet on a CUDA device with Triton installed (it is on "
                f"{self.unet.device}): {self._fix('norm_kernels', 'auto', 'torch')}."
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

    def _fix(self, name: str, *choices: str) -> str:
        """How to change choice `name` to one of `choices` (the end of an error message)."""
        setter = {"temporal_kernels": "set_temporal_kernels", "norm_kernels": "set_norm_kernels",
                  "memory_format": "set_memory_format", "cuda_graph": "set_cuda_graph"}[name]  # fmt: skip
        return "call " + " or ".join(f"pipe.{setter}({choice!r})" for choice in choices)


@contextmanager
def graphed_unet_calls(unet: nn.Module, kernels: SamplingKernels) -> Iterator[None]:
    """Route `unet(sample, timestep, encoder_hidden_states=..., return_dict=...)` through `kernels`' CUDA graph.

    For a pipeline that calls its UNet itself (diffusers' `VideoToVideoSDPipeline`); enter it inside
    `kernels._temporal_kernels()`. `kernels._unet_output` must call the class's `forward` (`unet.forward` is this
    router while the context is open). Calls with other arguments (class labels, cross-attention kwargs, added
    conditions) run eagerly. Nothing changes where no graph runs, or where something else already replaced the
    UNet's `forward` (an offload hook). The UNet's own `forward` is back on exit.
    """
    if kernels._graphed is None or "forward" in vars(unet):
        yield
        return
    forward = unet.forward

    def routed(sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        if args or any(value is not None for value in kwargs.values()) or encoder_hidden_states is None:
            return forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        output = kernels._call_unet(sample, timestep, encoder_hidden_states, None, None)
        return UNet3DConditionOutput(sample=output) if return_dict else (output,)

    unet.forward = routed
    try:
        yield
    finally:
        del unet.forward  # the class's forward again
