"""MotionDistillationConfig: every knob of VMC motion distillation, validated in one place, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSSES = ("cos", "l2", "eps_mse")
COS_VARIANTS = ("paper", "official")
MODES = ("full", "lora")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
FROZEN_DTYPES = ("auto", "compute", "keep")
NORM_DTYPES = ("auto", "float32", "compute")
FROZEN_CONVS = ("auto", "autograd", "input_grad_only")
FROZEN_ACTIVATIONS = ("auto", "autograd", "recompute")
NORM_KERNELS = ("auto", "torch", "triton")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
COMPILE_MODES = ("no", "default", "max-autotune-no-cudagraphs", "regional")
CUDA_GRAPHS = ("auto", "yes", "no")
TEMPORAL_KERNELS = (
    "auto", "library", "fast", "conv2d", "math_attention", "triton_attention", "triton_fast", "triton_conv", "triton"
)  # fmt: skip
#: Each Triton temporal-kernel choice's twin without Triton: what "auto" runs where Triton cannot.
TRITON_TEMPORAL_FALLBACK = {"triton_attention": "math_attention", "triton_fast": "fast", "triton_conv": "conv2d",
                            "triton": "fast"}  # fmt: skip

CONFIG_NAME = "motion_adapter_config.json"


@dataclass
class MotionDistillationConfig:
    """Hyperparameters of one-shot motion distillation (VMC, Jeong et al. 2023).

    Defaults follow the paper's appendix and the released training configs: full fine-tuning of the
    temporal attention's q/k/v, AdamW at 1e-4, 400 steps, gradient clipping at 1.0, timesteps uniform in
    [0, 1000), 8 frames at 40x64 (the Show-1 keyframe size).

    Attributes:
        loss: "cos" (the paper's objective, eq. 17), "l2" (motion-vector alignment, eq. 16: epsilon
            residual l2 weighted by (1 - abar_t) / abar_t) or "eps_mse" (plain epsilon matching of the same
            parameters, the ablation baseline).
        cos_variant: "official" (the released code: absolute residuals, cosine along the frame axis) or
            "paper" (eq. 17: cosine per frame pair over (C, H, W)). Used when `loss="cos"`.
        frame_stride: the residual stride c of delta x^n = x^(n+c) - x^n (1 in every paper experiment).
        epsilon_loss_weight: weight of a plain epsilon-matching term added to the motion loss (0, the paper's
            setting, adds none). The motion losses constrain only frame-to-frame residuals, so nothing keeps the
            tuned UNet a good denoiser of what the frames share. On the shapes-world demo clip a weight of 1 kept
            the inverted-noise transfer that the motion loss alone broke; over the 9 clips of the ablation it
            made no significant difference (docs/default_model.md).
        target: which Linear layers to adapt; see `inject_temporal_adapter`.
        mode: "full" trains the matched weights themselves; "lora" trains LoRA factors beside them.
        r: LoRA rank (mode "lora").
        lora_alpha: LoRA scaling numerator; the effective scale is `lora_alpha / r`.
        lora_dropout: dropout on the LoRA branch input.
        max_train_steps: optimisation steps.
        learning_rate: AdamW learning rate (constant schedule).
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_weight_decay: AdamW decoupled weight decay.
        adam_epsilon: AdamW epsilon.
        max_grad_norm: gradient-norm clipping threshold; 0 disables clipping.
        mixed_precision: "auto" (on CUDA: the half dtype the UNet's weights are already stored in, else bf16 where
            supported, else fp16; none on CPU), "no", "fp16" or "bf16". Trainable weights train as float32 master
            copies and go back to their own dtype after training.
        frozen_dtype: how the frozen weights are stored while training. "compute" stores float32 frozen weights in
            the mixed-precision dtype for the run, so no step re-casts them (the float32 originals wait on the CPU
            and are put back exactly afterwards); "keep" leaves them; "auto" is "compute" on CUDA with mixed
            precision, else "keep".
        norm_dtype: how group and layer norms run under mixed precision. "float32" is autocast's rule: each norm
            casts its input to float32 and returns float32, which the next layer casts back (two copies of every
            normalised activation, and float32 activations kept for the backward pass); "compute" runs them in the
            mixed-precision dtype (PyTorch's kernels still accumulate the statistics in float32) and stores their
            weights in it for the run (on an H200: 1.13 times faster steps, 2.2 GiB less memory, the loss within
            the reference loop's run-to-run noise; docs/performance.md); "auto" is "compute" on CUDA, else
            "float32". Without mixed precision both are the same.
        frozen_convs: what frozen convolutions keep for the backward pass. "autograd" is PyTorch's own convolution,
            which keeps its input for a weight gradient that a frozen weight never needs; "input_grad_only" keeps
            the weight alone and computes the same input gradient with the same kernel, so the activations entering
            the ResNet and temporal convolutions are not held (on an H200: 1.1 GiB less peak memory at the same step
            time); "auto" is "input_grad_only".
        frozen_activations: what frozen norm -> activation pairs and GEGLU feed-forwards keep for the backward pass.
            "autograd" keeps what PyTorch keeps (the norm's input and output, the feed-forward's projection and
            GELU); "recompute" keeps only their inputs and recomputes the rest in the backward pass (the same
            kernels, plus one normalisation a pair and one matrix product a feed-forward), and dropout masks as
            bits; same outputs and dropout masks, gradients equal to rounding. "auto" is "recompute" on CUDA without
            `compile`, else "autograd". See docs/performance.md for what it saves and costs.
        norm_kernels: the kernels the recomputed norm -> activation pairs of `frozen_activations="recompute"` run
            on. "torch" is PyTorch's group norm, scale and shift and activation, one kernel each; "triton" fuses
            each pass into Triton kernels split over channels and chunks of frames and pixels
            (`motion_adapters.fused_norm`; float32 arithmetic, one rounding at the output); "auto" is "triton"
            on CUDA where Triton is installed, else "torch".
        memory_format: the layout of the UNet's activations while training. "contiguous" is PyTorch's NCHW, which
            cuDNN converts to NHWC and back around every convolution; "channels_last" keeps them NHWC through the
            UNet (`motion_adapters.layout.channels_last_training`: frozen convolution weights stored channels-last
            for the run, the group norms on the channels-last Triton kernels, so it needs
            `norm_kernels="triton"` to pay: 1.16 times faster steps on an H200); "auto" is "channels_last" where
            the norm -> activation pairs run on the Triton kernels, else "contiguous". With dropout on, the
            masks are drawn in memory order, so a seed gives other masks than in the contiguous layout.
        compile: "no", or a `torch.compile` mode for the UNet ("default" or "max-autotune-no-cudagraphs"), or
            "regional": each ResNet and temporal-convolution layer compiled on its own, attention left eager (the
            layers are restored after training).
            Compilation happens during the first step and costs tens of seconds to minutes for a full-size UNet
            (less when the inductor cache is warm); it pays over long runs or many motions in one process.
        cuda_graph: capture the whole training step (forward, loss, backward, clipping, AdamW) in one CUDA graph
            after three warm-up steps and replay it: removes the per-kernel launch cost. "auto" captures on CUDA
            when no fp16 gradient scaler is needed; "yes" insists (and raises where it cannot); "no" never.
            The learning rate and other optimizer settings are frozen into the graph.
        cudnn_benchmark: on CUDA, let cuDNN pick each convolution's algorithm by timing the candidates at its
            first call (`torch.backends.cudnn.benchmark`, set for the run and restored after it; False leaves
            PyTorch's setting as the caller has it) instead of by its heuristics. On an H200 steps ran 1.04 times
            faster, but timing every shape, forward and backward, cost about 12 s once a process
            (docs/performance.md): it pays past about 4,000 steps in one process (long runs, or many motions
            trained in one process), not for one 400-step run. With it, the chosen algorithms (and so the
            rounding) may differ between runs unless `torch.backends.cudnn.deterministic` is set.
        temporal_kernels: how the temporal layers run while training (same function, same weights): "conv2d"
            runs the temporal convolutions' (3, 1, 1) Conv3d as Conv2d, "math_attention" runs temporal attention
            (sequences of a few frames) with the math SDPA kernel instead of flash kernels built for long
            sequences, "fast" does both, "library" neither; "triton_attention" runs temporal attention on the
            Triton kernels of `motion_adapters.frame_attention` and "triton_fast" is that with "conv2d";
            "triton_conv" runs the (3, 1, 1) convolutions on the Triton kernel of `motion_adapters.temporal_conv`
            and "triton" is that with "triton_attention"; "auto" is "triton_fast" on CUDA where Triton is
            installed, "fast" on CUDA without it, else "library".
        activation_memory_budget: with `compile`, the fraction in (0, 1] of the activations the compiler may keep
            for the backward pass; lower values recompute more and use less memory
            (`torch._functorch.config.activation_memory_budget`). `None` keeps torch's default (1.0).
        seed: seed for the timesteps and noise of every step; the same seed gives the same run.
        min_timestep: smallest training timestep (inclusive).
        max_timestep: largest training timestep (exclusive); `None` means the scheduler's
            `num_train_timesteps`.
        num_frames: frames sampled from the clip.
        height: frame height the clip is resized to; `None` means the backbone's default.
        width: frame width the clip is resized to; `None` means the backbone's default.
        prompt: the appearance-invariant training prompt ("a seagull is walking").
        gradient_checkpointing: trade compute for memory in the UNet: True checkpoints every block that supports
            it; a list of module names (e.g. ["up_blocks.3", "up_blocks.2"]) checkpoints only those blocks (and
            the checkpointable modules inside them). The UNet's own setting is restored after training.
        checkpointing_steps: save a resumable checkpoint every this many steps when an output folder is
            given; 0 disables checkpoints.

    Example:
        >>> from motion_adapters import MotionDistillationConfig
        >>> config = MotionDistillationConfig(prompt="a seagull is walking", max_train_steps=200)
        >>> MotionDistillationConfig.from_json(config.to_json()) == config
        True
    """

    loss: str = "cos"
    cos_variant: str = "official"
    frame_stride: int = 1
    epsilon_loss_weight: float = 0.0
    target: str | list[str] = "temporal_attn.to_[qkv]"
    mode: str = "full"
    r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    max_train_steps: int = 400
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    frozen_dtype: str = "auto"
    norm_dtype: str = "auto"
    frozen_convs: str = "auto"
    frozen_activations: str = "auto"
    norm_kernels: str = "auto"
    memory_format: str = "auto"
    compile: str = "no"
    cuda_graph: str = "auto"
    cudnn_benchmark: bool = False
    temporal_kernels: str = "auto"
    activation_memory_budget: float | None = None
    seed: int = 0
    min_timestep: int = 0
    max_timestep: int | None = None
    num_frames: int = 8
    height: int | None = None
    width: int | None = None
    prompt: str = ""
    gradient_checkpointing: bool | list[str] = False
    checkpointing_steps: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise `ValueError` naming the field, its value and the fix.

        Raises:
            ValueError: on the first invalid field.
        """
        _choice("loss", self.loss, LOSSES)
        _choice("cos_variant", self.cos_variant, COS_VARIANTS)
        _choice("mode", self.mode, MODES)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _choice("frozen_dtype", self.frozen_dtype, FROZEN_DTYPES)
        _choice("norm_dtype", self.norm_dtype, NORM_DTYPES)
        _choice("frozen_convs", self.frozen_convs, FROZEN_CONVS)
        _choice("frozen_activations", self.frozen_activations, FROZEN_ACTIVATIONS)
        _choice("norm_kernels", self.norm_kernels, NORM_KERNELS)
        _choice("memory_format", self.memory_format, MEMORY_FORMATS)
        _choice("compile", self.compile, COMPILE_MODES)
        _choice("cuda_graph", self.cuda_graph, CUDA_GRAPHS)
        if not isinstance(self.cudnn_benchmark, bool):
            raise ValueError(f"cudnn_benchmark={self.cudnn_benchmark!r} must be True or False.")
        _choice("temporal_kernels", self.temporal_kernels, TEMPORAL_KERNELS)
        if self.activation_memory_budget is not None:
            budget = self.activation_memory_budget
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"activation_memory_budget={budget!r} must be a number in (0, 1], or None.")
            if self.compile == "no":
                raise ValueError(
                    f"activation_memory_budget={budget!r} only acts on a compiled UNet: set compile='default', or "
                    f"use gradient_checkpointing to save memory without compiling."
                )
        checkpointing = self.gradient_checkpointing
        if not isinstance(checkpointing, bool) and not (
            isinstance(checkpointing, list) and checkpointing and all(isinstance(n, str) and n for n in checkpointing)
        ):
            raise ValueError(
                f"gradient_checkpointing={checkpointing!r} must be True, False or a non-empty list of module names "
                f"such as ['up_blocks.3']."
            )
        _positive_int("frame_stride", self.frame_stride)
        _positive_int("r", self.r)
        _positive_int("max_train_steps", self.max_train_steps)
        _positive_int("num_frames", self.num_frames)
        if self.num_frames <= self.frame_stride:
            raise ValueError(
                f"num_frames={self.num_frames} leaves no frame pair at frame_stride={self.frame_stride}: "
                f"use num_frames > frame_stride."
            )
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if not isinstance(self.target, (str, list)) or not self.target:
            raise ValueError(
                f"target={self.target!r} must be a non-empty pattern string or list of module names, "
                f"e.g. 'temporal_attn.to_[qkv]'."
            )
        for name in ("learning_rate", "lora_alpha", "adam_epsilon"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0.")
        for name in ("adam_weight_decay", "max_grad_norm", "epsilon_loss_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0 (0 disables it).")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie in [0, 1).")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must lie in [0, 1).")
        if not isinstance(self.min_timestep, int) or self.min_timestep < 0:
            raise ValueError(f"min_timestep={self.min_timestep!r} must be an int >= 0.")
        if self.max_timestep is not None and (
            not isinstance(self.max_timestep, int) or self.max_timestep <= self.min_timestep
        ):
            raise ValueError(
                f"max_timestep={self.max_timestep!r} must be an int > min_timestep={self.min_timestep}, "
                f"or None for the scheduler's num_train_timesteps."
            )
        if not isinstance(self.checkpointing_steps, int) or self.checkpointing_steps < 0:
            raise ValueError(f"checkpointing_steps={self.checkpointing_steps!r} must be an int >= 0 (0 disables).")
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={self.prompt!r} must be a string.")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Return the config as an indented JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MotionDistillationConfig:
        """Build a config from a dict, rejecting unknown keys by name.

        Raises:
            ValueError: for a key that is not a field (with the closest field names) or an invalid value.
        """
        if not isinstance(data, dict):
            raise ValueError(f"config must be a dict, got {type(data).__name__}.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            hints = {key: difflib.get_close_matches(key, names, n=1) for key in unknown}
            detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown MotionDistillationConfig key(s): {detail}. Valid keys: {', '.join(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MotionDistillationConfig:
        """Parse a config from a JSON string."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON, atomically; a folder gets `motion_adapter_config.json`."""
        from motion_adapters.serialization import atomic_write_text

        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MotionDistillationConfig:
        """Read a config written by `save` (a file, or a folder holding `motion_adapter_config.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no MotionDistillationConfig at {path}.")
        data = json.loads(path.read_text())
        return cls.from_dict(data.get("distillation", data))


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported: use one of {', '.join(map(repr, choices))}.")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int.")
