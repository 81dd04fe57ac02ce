"""One `train_motion` step and what makes it fast: weight dtypes, temporal kernels, checkpointing, compile, graphs.

`train_motion` owns the loop (timesteps, noise, checkpoints, callbacks); this module owns what happens inside a
step and how the UNet is prepared for it:

- `WeightPrecision` stores the frozen weights in the compute dtype for the run (no per-step casts of the whole
  UNet), trains float32 master copies of the adapter's parameters under autocast, and puts every parameter back
  in its own dtype afterwards.
- `motion_adapters.lean_backward` holds the layer swaps that keep less for the backward pass (norms in the compute
  dtype, frozen convolutions without their input, frozen activations recomputed).
- `checkpointing` switches gradient checkpointing on for all blocks or for named blocks only, and restores it.
- `temporal_kernels` swaps in kernels suited to sequences of a few frames (math SDPA or Triton kernels for
  temporal attention, `Conv2d` or a Triton kernel for the (3, 1, 1) temporal convolutions) for the run, and
  restores the originals.
- `StepRunner` runs forward, loss, backward, clipping and AdamW, eagerly or (after warm-up steps) as the replay of
  one CUDA graph that holds the whole step, optionally through a `torch.compile`d UNet.

The backward pass never reaches layers that come before the first adapted layer: their outputs do not require
gradients, so autograd records nothing for them (see `tests/test_training_speed.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.deferred_updates import DeferredUpdates, step_dividing_grads
from motion_adapters.frame_attention import FrameAttnProcessor
from motion_adapters.frozen_memo import kept
from motion_adapters.frozen_prefix import FrozenPrefix
from motion_adapters.fused_norm import fused_norm_available
from motion_adapters.losses import epsilon_from_output, motion_distillation_loss, split_epsilon
from motion_adapters.temporal_conv import temporal_conv, temporal_conv_supported

#: Normalisation layers keep float32 weights: autocast computes them in float32 anyway.
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
#: Eager steps before the CUDA graph is captured. One suffices here: the first step compiles and loads the kernels,
#: builds cuDNN's plans, allocates AdamW's state and every buffer; each further one cost about 0.56 s of eager
#: launches on an H200 (PyTorch's examples use 3, for modules that initialise lazily over several calls).
GRAPH_WARMUP_STEPS = 1
#: Whether a graphed step runs the next step's frozen prefix (the layers before the first trainable one:
#: `motion_adapters.frozen_prefix`) on a side stream beside its own backward pass, the next step reading it back.
OVERLAP_FROZEN_PREFIX = True
#: Whether a graphed step applies AdamW's update for the previous step's gradients at its own start, on a side
#: stream beside its forward pass, each attention layer waiting for its own weights where the forward pass reaches
#: it (`DeferredUpdates`), instead of after its own backward pass: the optimizer's pass over the weights, their
#: moments and gradients (bound by memory: 1.24 ms a step in the H200 profile of commit 21c8b98) overlaps the
#: forward pass's matrix products. The same updates in the same order: each forward pass reads the
#: weights after the previous step's update, as before; the last update is applied when `train_motion` checkpoints
#: or ends (`StepRunner.flush`; a run with callbacks, which may read the weights after any step, does not defer).
#: Off until timed on a GPU (bench_training's `full_overlap_optimizer`).
OVERLAP_OPTIMIZER = False


def autocast_dtype(mixed_precision: str, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of a run, or None for none.

    "auto" on CUDA keeps the half dtype the weights are already stored in (no per-step cast of the frozen
    weights), else picks bf16 where supported, else fp16; off CUDA it means no autocast.

    Raises:
        ValueError: for "fp16" off CUDA.

    Example:
        >>> autocast_dtype("auto", torch.device("cpu"), torch.float32) is None
        True
    """
    if mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        if device.type != "cuda":
            return None
        if weights_dtype in (torch.float16, torch.bfloat16):
            return weights_dtype
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"mixed_precision='fp16' needs a CUDA device; the UNet is on {device}. Use 'bf16', 'no' or 'auto'."
        )
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def use_cuda_graph(choice: str, device: torch.device, scaled: bool, checkpointing: bool | list[str]) -> bool:
    """Whether `StepRunner` captures the step in a CUDA graph, for `MotionDistillationConfig.cuda_graph`.

    Raises:
        ValueError: for "yes" where capture cannot work (off CUDA, with fp16 gradient scaling, or with gradient
            checkpointing, whose recomputation reads the generator state while capturing).

    Example:
        >>> use_cuda_graph("auto", torch.device("cpu"), scaled=False, checkpointing=False)
        False
    """
    blockers = []
    if device.type != "cuda":
        blockers.append(f"the UNet is on {device}, not CUDA")
    if scaled:
        blockers.append("fp16 gradient scaling checks for overflow on the host every step (use bf16)")
    if checkpointing:
        blockers.append("gradient checkpointing reads the random generator state while recomputing")
    if choice == "yes" and blockers:
        raise ValueError(f"cuda_graph='yes' cannot capture this run: {'; '.join(blockers)}. Use cuda_graph='auto'.")
    return choice != "no" and not blockers


class WeightPrecision:
    """Put a UNet's weights in their training dtypes, and back.

    The adapter's parameters become float32 master weights (autocast computes with half copies of them). With
    `cast_frozen`, every other float32 parameter is stored in `compute_dtype` for the run (normalisation layers
    excepted: autocast runs them in float32, and they are tiny); its float32 original is kept on the CPU and
    copied back by `restore`, so the UNet ends exactly as it came.

    Example:
        >>> precision = WeightPrecision(unet, adapter_parameters(unet), torch.bfloat16, cast_frozen=True)
        ... # doctest: +SKIP
        >>> precision.restore()  # doctest: +SKIP
    """

    def __init__(
        self,
        unet: nn.Module,
        trainable: dict[str, nn.Parameter],
        compute_dtype: torch.dtype | None,
        cast_frozen: bool,
        cast_norms: bool = False,
    ):
        self._trainable_dtypes = [(p, p.dtype) for p in trainable.values()]
        for p in trainable.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()
        self._frozen: list[tuple[nn.Parameter, torch.Tensor]] = []
        if cast_frozen and compute_dtype is not None:
            ids = {id(p) for p in trainable.values()}
            if not cast_norms:
                ids |= {id(p) for m in unet.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
            for p in unet.parameters():
                if id(p) not in ids and p.dtype == torch.float32:
                    original = p.data
                    p.data = original.to(compute_dtype)
                    self._frozen.append((p, original.to("cpu", copy=original.device.type == "cpu")))
                    del original

    @property
    def num_cast(self) -> int:
        """How many frozen parameters are stored in the compute dtype."""
        return len(self._frozen)

    def restore(self) -> None:
        """Give every parameter its own dtype back (frozen ones their exact float32 values)."""
        for p, dtype in self._trainable_dtypes:
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
        for p, original in self._frozen:
            p.data = original.to(p.device)
        self._frozen.clear()


class FrameConv(nn.Module):
    """A `Conv3d` with kernel (k, 1, 1) run as the equal `Conv2d` with kernel (k, 1) over (frames, pixels).

    Shares the wrapped layer's parameters (same names, so state dicts are unchanged); cuDNN has fast 2D kernels
    for this shape where its 3D ones are slow. With `kernel="triton"` a frozen (3, 1, 1) convolution runs on the
    Triton kernel of `motion_adapters.temporal_conv` instead (no layout conversion, the bias added in the kernel,
    only the weight kept for the backward pass) wherever Triton can run on the input's device; elsewhere, and for
    a weight that trains (requires grad, with gradients on), it runs on cuDNN as with `kernel="cudnn"`.

    Example:
        >>> conv = torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        >>> x = torch.randn(1, 4, 5, 2, 3)
        >>> torch.allclose(FrameConv(conv)(x), conv(x), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv3d, kernel: str = "cudnn"):
        super().__init__()
        if kernel not in ("cudnn", "triton"):
            raise ValueError(f"kernel must be 'cudnn' or 'triton', got {kernel!r}.")
        self.weight = conv.weight  # the same Parameter objects, under the same names
        self.bias = conv.bias
        self.frame_padding = conv.padding[0]
        self.kernel = kernel

    def runs_triton(self, x: torch.Tensor) -> bool:
        """Whether a call on `x` runs the Triton kernel: asked, no weight grad, `x` contiguous, supported, Triton."""
        return (
            self.kernel == "triton"
            and not (self.weight.requires_grad and torch.is_grad_enabled())
            and x.ndim == 5
            and x.is_contiguous()  # the kernel reads (B, C, F, H, W) rows; cuDNN takes channels-last input as is
            and temporal_conv_supported(self.weight, self.frame_padding)
            and fused_norm_available(x)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve (B, C, F, H, W) along frames."""
        if self.runs_triton(x):
            return temporal_conv(x, self.weight, self.bias)
        return self.cudnn(x, self.bias)

    def cudnn(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Convolve (B, C, F, H, W) along frames as cuDNN's (k, 1) `conv2d`, adding `bias` (None: no bias)."""
        b, _, f, h, w = x.shape
        y = torch.nn.functional.conv2d(
            x.reshape(b, x.shape[1], f, h * w), self.weight.squeeze(-1), bias, padding=(self.frame_padding, 0)
        )
        return y.reshape(b, y.shape[1], f, h, w)



def _sdpa_backend(name: str | None):
    """A context that restricts `scaled_dot_product_attention` to backend `name`, or changes nothing for None."""
    if name is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    return sdpa_kernel([backends[name]])

class ShortSequenceAttnProcessor(AttnProcessor2_0):
    """`AttnProcessor2_0` with PyTorch's math SDPA kernel: two batched matmuls and a softmax.

    Temporal attention attends over the frames (8) at every pixel with 64 heads of 5-20 channels; fused
    flash kernels tile 128 queries and pad heads to 32 channels, so most of their work is padding there.

    Example:
        >>> attn.set_processor(ShortSequenceAttnProcessor())  # doctest: +SKIP
    """

    def __call__(self, *args, **kwargs):
        """Run `AttnProcessor2_0` with only the math kernel allowed."""
        with _sdpa_backend("math"):
            return super().__call__(*args, **kwargs)


class JointAttnProcessor:
    """`AttnAddedKVProcessor2_0`'s function, the text's keys and values kept, optionally the pixel q/k/v stacked.

    Show-1's spatial attention projects the (group-normed) pixels three times and concatenates the text's keys and
    values in front of the pixels'. With `text_memo` (a dict the layers and the UNet share, owned by
    `joint_attention_processors`), the text's keys and values, a function of the prompt's embedding and frozen
    weights only, are computed once and reused while the embedding and those weights stay the same
    (`frozen_memo.kept`). With `stack_pixels`, the three frozen pixel weights (and biases) are
    stacked for each call, so the forward pass runs one GEMM where it ran three and the backward pass one
    input-gradient GEMM where autograd ran three and added their results. Masks, cross-attention only, extra
    arguments, and stacking over trainable or non-`nn.Linear` (LoRA) projections go to `AttnAddedKVProcessor2_0`.

    Example:
        >>> attn.set_processor(JointAttnProcessor(text_memo={}))  # doctest: +SKIP
    """

    def __init__(self, stack_pixels: bool = True, text_memo: dict | None = None):
        self._fallback = AttnAddedKVProcessor2_0()
        self.stack_pixels = stack_pixels
        self.text_memo = text_memo

    @staticmethod
    def _stackable(attn: Attention) -> bool:
        projections = (attn.to_q, attn.to_k, attn.to_v)
        return (
            all(type(p) is nn.Linear and (p.bias is None) == (attn.to_q.bias is None) for p in projections)
            and not any(t.requires_grad for p in projections for t in p.parameters())
        )  # fmt: skip

    def _text_keys_values(self, attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def compute():
            normed = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
            if JOINT_KV_TOKEN_ROWS:  # (B, T, heads * d): split into heads after the concatenation
                return attn.add_k_proj(normed), attn.add_v_proj(normed)
            return (attn.head_to_batch_dim(attn.add_k_proj(normed), out_dim=4),
                    attn.head_to_batch_dim(attn.add_v_proj(normed), out_dim=4))  # fmt: skip

        modules = [attn.add_k_proj, attn.add_v_proj] + ([attn.norm_cross] if attn.norm_cross else [])
        return kept(self.text_memo, id(attn), [text], modules, compute)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, *args, **kwargs) -> torch.Tensor:  # fmt: skip
        """The layer's output, as `AttnAddedKVProcessor2_0` computes it."""
        if (args or kwargs or attention_mask is not None or encoder_hidden_states is None or attn.only_cross_attention
                or attn.spatial_norm is not None or (self.stack_pixels and not self._stackable(attn))):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        residual = hidden_states
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch = hidden_states.shape[0]
        text_k, text_v = self._text_keys_values(attn, encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if self.stack_pixels:
            projections = (attn.to_q, attn.to_k, attn.to_v)
            weight = torch.cat([p.weight for p in projections])
            bias = None if attn.to_q.bias is None else torch.cat([p.bias for p in projections])
            q, k, v = torch.nn.functional.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # (B, N, heads * d) -> (B, heads, N, d) as a view: `head_to_batch_dim`'s reshape copies q, k and v when the
        # projection comes transposed, and the concatenation copies k and v anyway
        if JOINT_KV_TOKEN_ROWS:  # text and pixel tokens joined as rows: q, k and v then share one head layout
            k, v = torch.cat([text_k, k], dim=1), torch.cat([text_v, v], dim=1)
        if JOINT_HEAD_VIEWS:
            q, k, v = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = (attn.head_to_batch_dim(t, out_dim=4) for t in (q, k, v))
        if not JOINT_KV_TOKEN_ROWS:
            k, v = torch.cat([text_k, k], dim=2), torch.cat([text_v, v], dim=2)
        with _sdpa_backend(JOINT_SDPA_BACKEND if q.is_cuda else None):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, -1, residual.shape[1])))
        return out.transpose(-1, -2).reshape(residual.shape) + residual


#: Whether training on CUDA stacks the spatial (joint) attention's frozen pixel q/k/v into one GEMM
#: (`JointAttnProcessor(stack_pixels=True)`). Off: on an H200 steps were 1.011 times faster with it, but the peak
#: rose from 7.70 to 7.91 GiB (the attention keeps q as a view of the stacked projection, so k and v stay alive with
#: it), and the loss was not compared with the reference loop in that run
#: (benchmarks/results/training_joint_qkv_h200.json).
STACKED_JOINT_QKV = False
#: Whether `JointAttnProcessor` splits q, k and v into heads as views (diffusers' `head_to_batch_dim` copies them
#: where the projections come transposed).
JOINT_HEAD_VIEWS = True
#: Whether `JointAttnProcessor` joins the text's and the pixels' keys and values as token rows, (B, T + N, heads * d),
#: and splits them into heads after, as q is split: q, k and v then reach the attention in one layout. Off: joined
#: per head, (B, heads, T + N, d) contiguous, while q is a view of its projection's rows.
JOINT_KV_TOKEN_ROWS = True
#: The SDPA backend of the spatial (joint) attention on CUDA ("flash", "efficient", "cudnn" or "math"), or None for
#: PyTorch's own choice (cuDNN's kernels on an H200 at show-1-base's shapes).
JOINT_SDPA_BACKEND: str | None = None


#: Whether training keeps the spatial attention's text keys and values across steps (`JointAttnProcessor`'s
#: `text_memo`): the prompt's embedding and the frozen text projections do not change during a run.
MEMO_TEXT_KV = True


@contextmanager
def joint_attention_processors(unet: nn.Module, stack_pixels: bool, memo_text: bool) -> Iterator[int]:
    """Give every attention on `AttnAddedKVProcessor2_0` a `JointAttnProcessor` for the run, then restore.

    Yields the number of layers changed (0 where neither option is on). With `memo_text` the UNet keeps its own
    text projection and pooled-text embedding too (its `text_memo`), so the attention layers see the same text
    tensor at every step; everything kept is dropped on exit.

    Example:
        >>> with joint_attention_processors(unet, stack_pixels=False, memo_text=True) as count:  # doctest: +SKIP
        ...     loss = step(unet)
    """
    changed, memo = [], {} if memo_text else None
    if stack_pixels or memo_text:
        for module in unet.modules():
            if isinstance(module, Attention) and type(module.processor) is AttnAddedKVProcessor2_0:
                changed.append((module, module.processor))
                module.set_processor(JointAttnProcessor(stack_pixels, memo))
    unet_memo = memo_text and hasattr(unet, "text_memo")
    if unet_memo:
        unet.text_memo = memo
    try:
        yield len(changed)
    finally:
        for module, processor in changed:
            module.set_processor(processor)
        if unet_memo:
            unet.text_memo = None
        if memo is not None:
            memo.clear()


@contextmanager
def temporal_kernels(unet: nn.Module, choice: str) -> Iterator[None]:
    """Swap in faster temporal layers for the run, then restore them.

    "conv2d" runs every (k, 1, 1) `Conv3d` of the temporal convolutions as a `Conv2d` (`FrameConv`), "triton_conv"
    as the Triton kernel of `motion_adapters.temporal_conv` (`FrameConv(kernel="triton")`); "math_attention" gives
    every temporal attention (`*temp_attentions*` and `transformer_in`, the layers whose sequences are frames) a
    `ShortSequenceAttnProcessor`, "triton_attention" a `FrameAttnProcessor` (the Triton kernels of
    `motion_adapters.frame_attention`). "fast" is "conv2d" with "math_attention", "triton_fast" "conv2d" with
    "triton_attention", "triton" "triton_conv" with "triton_attention". Same function, same parameters; "library"
    changes nothing.

    Example:
        >>> with temporal_kernels(unet, "fast"):  # doctest: +SKIP
        ...     loss = step(unet)
    """
    undo: list[Callable[[], None]] = []
    conv_kernel = {"conv2d": "cudnn", "fast": "cudnn", "triton_fast": "cudnn", "triton_conv": "triton",
                   "triton": "triton"}.get(choice)  # fmt: skip
    if conv_kernel is not None:
        for parent in list(unet.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv3d) and tuple(child.kernel_size[1:]) == (1, 1) and child.groups == 1:
                    setattr(parent, name, FrameConv(child, conv_kernel))
                    undo.append(functools.partial(setattr, parent, name, child))
    processor = {"math_attention": ShortSequenceAttnProcessor, "fast": ShortSequenceAttnProcessor,
                 "triton_attention": FrameAttnProcessor, "triton_fast": FrameAttnProcessor,
                 "triton": FrameAttnProcessor}.get(choice)  # fmt: skip
    if processor is not None:
        for name, module in unet.named_modules():
            temporal = ".temp_attentions." in f".{name}" or name.startswith("transformer_in")
            if temporal and isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
                undo.append(functools.partial(module.set_processor, module.processor))
                module.set_processor(processor())
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Set `torch.backends.cudnn.benchmark` for the block where `enabled`, then put the caller's setting back.

    Where not enabled the caller's setting stays as it is.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


#: Layers that `compile="regional"` compiles one by one: group norms, SiLU, casts, dropout and convolutions.
REGIONAL_COMPILE_TYPES = ("ResnetBlock2D", "TemporalConvLayer")


@contextmanager
def regional_compile(unet: nn.Module, enabled: bool) -> Iterator[int]:
    """Compile every ResNet and temporal-convolution layer of `unet` on its own for the run, then restore them.

    These layers are mostly memory-bound group norms, activations and casts around convolutions (the profile in
    docs/performance.md); fusing them needs no graph break handling in the attention processors, which stay eager.
    One compilation serves every layer of the same shapes, so the recompilation limit is raised for the run.
    Yields the number of compiled layers.

    Example:
        >>> with regional_compile(unet, True) as count:  # doctest: +SKIP
        ...     loss = step(unet)
    """
    if not enabled:
        yield 0
        return
    modules = [m for m in unet.modules() if type(m).__name__ in REGIONAL_COMPILE_TYPES]
    config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = getattr(config, limit_name)
    setattr(config, limit_name, max(limit, 8 * len(modules)))
    for module in modules:
        module.compile(dynamic=False)
    try:
        yield len(modules)
    finally:
        for module in modules:
            module._compiled_call_impl = None
        setattr(config, limit_name, limit)


@contextmanager
def checkpointing(unet: nn.Module, blocks: bool | list[str]) -> Iterator[None]:
    """Switch gradient checkpointing on for every block (`True`) or for the named blocks, then restore it.

    Modules that support it carry a `gradient_checkpointing` attribute (diffusers' convention); for a list of names,
    those modules and the checkpointable modules inside them are switched on.

    Raises:
        ValueError: for a name that is not a module of `unet`, or a model without checkpointing support.

    Example:
        >>> with checkpointing(unet, ["up_blocks.3"]):  # doctest: +SKIP
        ...     loss = train(unet)
    """
    if not blocks:
        yield
        return
    if not hasattr(unet, "enable_gradient_checkpointing"):
        raise ValueError(
            f"{type(unet).__name__} has no enable_gradient_checkpointing; set gradient_checkpointing=False."
        )
    modules = dict(unet.named_modules())
    names = list(modules) if blocks is True else list(blocks)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"gradient_checkpointing names {missing}, which are not modules of {type(unet).__name__}; "
            f"top-level blocks are e.g. {[n for n in modules if n.count('.') == 1][:6]}."
        )
    chosen = {id(m) for n in names for m in modules[n].modules()}
    saved = {m: (m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
             for m in unet.modules() if hasattr(m, "gradient_checkpointing")}
    unet.enable_gradient_checkpointing()
    for m in saved:
        if id(m) not in chosen:
            m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, (flag, func) in saved.items():
            m.gradient_checkpointing = flag
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


class StepRunner:
    """Forward, loss, backward, gradient clipping and optimizer step for one (timestep, noise) draw.

    Eager mode runs the step as written (through `torch.compile` when asked). Graph mode runs
    `GRAPH_WARMUP_STEPS` genuine steps eagerly on a side stream (they compile and allocate), then captures the next
    step into one CUDA graph and from then on copies each step's timestep and noise into the graph's input buffers
    and replays it. Both modes compute the same step; the random dropout masks differ.

    Args:
        model: the UNet (or its compiled wrapper) called as `model(noisy, t, encoder_hidden_states=...)`.
        x0: the clean clip or its latents, (1, C, F, H, W), on the UNet's device.
        embeds: the prompt embeddings as the UNet takes them.
        alphas_cumprod: the noise schedule on the UNet's device, float32.
        params: the trainable parameters.
        optimizer: their optimizer (`capturable=True` for graph mode).
        config: the run's hyperparameters (loss, clipping, compile memory budget).
        compute_dtype: the autocast dtype, or None.
        scaler: an fp16 `GradScaler`, or None.
        graph: capture the step in a CUDA graph.
        prediction_type: what the UNet predicts ("epsilon" or "v_prediction"); the loss always compares epsilons.
        defer_updates: whether a graphed run may defer each update to the next step (`OVERLAP_OPTIMIZER`); a caller
            that reads the weights after every step (a callback) passes False, as each read needs a `flush`.

    Example:
        >>> runner = StepRunner(unet, x0, embeds, abar, params, optimizer, config, torch.bfloat16)  # doctest: +SKIP
        >>> loss = runner(torch.tensor([500]), torch.randn_like(x0))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable[..., object],
        x0: torch.Tensor,
        embeds: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        params: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        config: MotionDistillationConfig,
        compute_dtype: torch.dtype | None,
        scaler: torch.amp.GradScaler | None = None,
        graph: bool = False,
        prediction_type: str = "epsilon",
        defer_updates: bool = True,
    ):
        self.model = model
        self.prediction_type = prediction_type
        self.x0 = x0
        self.embeds = embeds
        self.alphas_cumprod = alphas_cumprod
        self.params = params
        self.optimizer = optimizer
        self.config = config
        self.compute_dtype = compute_dtype
        self.scaler = scaler
        self.use_graph = graph
        self.in_channels = x0.shape[1]
        self.steps_run = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, torch.Tensor] = {}
        # the frozen layers before the first trainable one, run a step ahead inside the graph (FrozenPrefix)
        overlap = graph and OVERLAP_FROZEN_PREFIX and config.compile == "no" and isinstance(model, nn.Module)
        self.prefix = FrozenPrefix(model) if overlap else None
        self._staged: tuple[torch.Tensor, torch.Tensor] | None = None  # the (t, noise) the prefix buffers hold
        # each step's update applied at the next step's start, beside its forward pass (OVERLAP_OPTIMIZER)
        defer = OVERLAP_OPTIMIZER and defer_updates and graph and scaler is None and config.compile == "no" and \
            isinstance(model, nn.Module) and (config.max_grad_norm == 0 or clips_in_optimizer(optimizer))  # fmt: skip
        self.deferred = DeferredUpdates.find(model, params, optimizer, compute_dtype, x0.shape[2]) if defer else None
        self._pending = False  # gradients whose update has not been applied yet
        self._clip_factor: torch.Tensor | None = None  # their clipping factor (memory outside the graph's pool)

    def __call__(self, t: torch.Tensor, noise: torch.Tensor,
                 next_step: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Run one optimisation step; return its loss as a 0-d tensor on the device (not yet synchronised).

        `next_step`, the next call's (t, noise) (the same objects), lets a graphed step run the next step's frozen
        prefix on a side stream while its own backward pass runs (`OVERLAP_FROZEN_PREFIX`); without it, or when
        the next call brings other objects, that call computes its prefix first.
        """
        device = self.x0.device
        host = (t, noise)
        t = t.to(device, non_blocking=True)
        noise = noise.to(device, non_blocking=True)
        with self._compile_settings():
            if not self.use_graph:
                loss = self._eager_step(t, noise)
            elif self.steps_run < GRAPH_WARMUP_STEPS:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                last = self.steps_run == GRAPH_WARMUP_STEPS - 1
                tracing = self.prefix is not None and last
                # the prefix's buffers are made as the tracing ends, after the side stream's block: on this stream
                with self.prefix.tracing() if tracing else nullcontext(), torch.cuda.stream(side):
                    loss = self._eager_step(t, noise) if self.deferred is None else self._deferred_step(t, noise, last)
                torch.cuda.current_stream(device).wait_stream(side)
            elif self.deferred is not None and not self._pending:  # after a flush: the graph would apply it again
                loss = self._deferred_step(t, noise)
                self._staged = None
            else:
                prefix = self.prefix is not None and bool(self.prefix.modules)
                if prefix and not (self._staged is not None and all(a is b for a, b in zip(host, self._staged))):
                    self._record_prefix(t, noise)  # this step's prefix was not computed during the last one
                inputs = {"t": t, "noise": noise}
                if prefix:  # the draw whose prefix the graph's side stream runs: the next step's, else this one's
                    ahead = (t, noise) if next_step is None else next_step
                    inputs["next_t"], inputs["next_noise"] = (x.to(device, non_blocking=True) for x in ahead)
                if self.graph is None:
                    self._capture(inputs)
                for key, value in inputs.items():
                    self._static[key].copy_(value)
                self.graph.replay()
                self._staged = next_step if prefix and next_step is not None else None
                loss = self._static["loss"]
        self.steps_run += 1
        return loss

    def _model_input(self, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha-bar of `t`, the clip noised at `t` with `noise`): the UNet's input."""
        abar = self.alphas_cumprod[t]
        a = abar.view(-1, 1, 1, 1, 1)
        return abar, a.sqrt() * self.x0 + (1 - a).sqrt() * noise

    def _autocast(self):
        if self.compute_dtype is None:
            return nullcontext()
        # a graph must not keep autocast's cast cache alive between replays
        return torch.autocast(self.x0.device.type, dtype=self.compute_dtype, cache_enabled=not self.use_graph)

    def loss(self, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The motion distillation loss of the UNet on the clip noised at timesteps `t` with `noise`."""
        abar, noisy = self._model_input(t, noise)
        with self._autocast():
            out = self.model(noisy, t, encoder_hidden_states=self.embeds).sample
        eps_pred = epsilon_from_output(split_epsilon(out.float(), self.in_channels), noisy, abar, self.prediction_type)
        c = self.config
        loss = motion_distillation_loss(
            noise, eps_pred, loss=c.loss, cos_variant=c.cos_variant, stride=c.frame_stride, abar=abar
        )
        if c.epsilon_loss_weight:
            loss = loss + c.epsilon_loss_weight * (eps_pred - noise).pow(2).mean()
        return loss

    def _record_prefix(self, t: torch.Tensor, noise: torch.Tensor) -> None:
        """Run the UNet's frozen prefix for (t, noise) into `self.prefix`'s buffers."""
        _, noisy = self._model_input(t, noise)
        with self._autocast():
            self.prefix.record(lambda: self.model(noisy, t, encoder_hidden_states=self.embeds))

    def _update(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.config.max_grad_norm > 0 and self.scaler is None and clips_in_optimizer(self.optimizer):
            # clip_grad_norm_'s factor, applied by the fused AdamW kernel as it reads the gradients (GradScaler's
            # `grad_scale` divisor; the kernel writes the clipped gradients back): no pass of its own over them
            step_dividing_grads(self.optimizer, self._clip_factor_of_grads().reciprocal())
            return
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _eager_step(self, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(t, noise)
        self._update(loss)
        return loss.detach()

    def _deferred_step(self, t: torch.Tensor, noise: torch.Tensor, last_warmup: bool = False) -> torch.Tensor:
        """An eager step whose update waits for the next step (`OVERLAP_OPTIMIZER`); the previous one's applied first.

        `last_warmup`: the step before the capture, which orders the layers as the forward pass reaches them, checks
        that every gradient landed in its buffer (else the run goes on updating each step as usual) and creates the
        optimizer's state outside the graph.
        """
        self._apply_pending()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(t, noise)
        with self.deferred.in_forward_order() if last_warmup else nullcontext():
            loss.backward()
        self._keep_clip_factor()
        self._pending = True
        if last_warmup:
            if not self.deferred.grads_in_buffers():
                self._apply_pending()
                self.deferred.close()
                self.deferred = None
            else:
                self.deferred.initialize_state()
        return loss.detach()

    def _keep_clip_factor(self) -> None:
        """The clipping factor of the gradients just computed, kept for their deferred update."""
        if self.config.max_grad_norm <= 0:
            return
        factor = self._clip_factor_of_grads()
        if self._clip_factor is None:
            self._clip_factor = torch.empty_like(factor)
        self._clip_factor.copy_(factor)

    def _clip_factor_of_grads(self) -> torch.Tensor:
        """`clip_grad_norm_`'s factor for the gradients in `.grad` (at most 1), as a 0-d tensor on the device."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        return (self.config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)

    def _grad_scale(self) -> torch.Tensor | None:
        """The divisor of the pending gradients (the reciprocal of their clipping factor), or None: no clipping."""
        return None if self.config.max_grad_norm <= 0 else self._clip_factor.reciprocal()

    def _apply_pending(self) -> None:
        """The update of the pending gradients (in `.grad`), now, on the current stream."""
        if not self._pending:
            return
        step_dividing_grads(self.optimizer, self._grad_scale())
        self._pending = False

    def flush(self) -> None:
        """Apply a deferred update now (`OVERLAP_OPTIMIZER`): before anything reads the weights or the optimizer.

        A no-op when nothing is deferred. The next step then runs eagerly (the captured graph would apply the update
        a second time) and defers its own update again.
        """
        self._apply_pending()

    def close(self) -> None:
        """Release what the run added to the UNet (the deferred updates' gradient buffers)."""
        if self.deferred is not None:
            self.deferred.close()

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        """Capture the step into `self.graph`, reading copies of `inputs` that each replay refills.

        `inputs`: t and noise, and with a frozen prefix the next step's next_t and next_noise.
        """
        self._static = {key: value.clone() for key, value in inputs.items()}
        prefix = self.prefix if self.prefix is not None and self.prefix.modules else None
        deferred = self.deferred
        if deferred is None:
            # gradients are allocated inside the capture, so every replay writes this step's gradients afresh
            self.optimizer.zero_grad(set_to_none=True)
        device = self.x0.device
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            if deferred is not None:  # the previous step's update, layer by layer, beside this forward pass
                updates = torch.cuda.Stream(device)
                updates.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(updates):
                    deferred.step_layers(self._grad_scale())
                # the backward pass writes each layer's gradient into its buffer, autograd taking it as `.grad`
                self.optimizer.zero_grad(set_to_none=True)
            with prefix.replaying() if prefix is not None else nullcontext(), \
                    deferred.waiting() if deferred is not None else nullcontext():  # fmt: skip
                loss = self.loss(self._static["t"], self._static["noise"])
            if prefix is not None:  # the next step's prefix beside this step's backward pass and optimizer
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self._record_prefix(self._static["next_t"], self._static["next_noise"])
            if deferred is None:
                self._update(loss)
            else:
                loss.backward()
                torch.cuda.current_stream(device).wait_stream(updates)  # done reading the factor it replaces
                self._keep_clip_factor()
            if prefix is not None:
                torch.cuda.current_stream(device).wait_stream(side)
        self._static["loss"] = loss.detach()
        self.graph = graph

    def _compile_settings(self):
        budget = self.config.activation_memory_budget
        if budget is None:
            return nullcontext()
        import torch._functorch.config as functorch_config

        return functorch_config.patch(activation_memory_budget=float(budget))


def compiled(unet: nn.Module, mode: str) -> Callable[..., object]:
    """`unet` itself for mode "no" or "regional", else a `torch.compile` wrapper of it (the module is left unchanged).

    Example:
        >>> compiled(unet, "no") is unet  # doctest: +SKIP
        True
    """
    if mode in ("no", "regional"):  # "regional" compiles layers in place: see `regional_compile`
        return unet
    return torch.compile(unet, mode=None if mode == "default" else mode, dynamic=False)


#: Whether a fused AdamW applies the gradient clipping factor as it reads the gradients (`StepRunner`), instead of
#: `clip_grad_norm_` scaling them in a pass of its own first. Same factor, same clipped gradients left in `.grad`.
CLIP_IN_OPTIMIZER = True


def clips_in_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `StepRunner` hands the clipping factor to `optimizer`: a fused `torch.optim.AdamW` / `Adam`."""
    return (
        CLIP_IN_OPTIMIZER
        and type(optimizer) in (torch.optim.AdamW, torch.optim.Adam)
        and all(group.get("fused") for group in optimizer.param_groups)
        and not hasattr(optimizer, "grad_scale")
    )


def optimizer_for(params: list[nn.Parameter], config: MotionDistillationConfig, device: torch.device, graph: bool):
    """AdamW as the config asks: fused on CUDA, capturable for a CUDA graph.

    Example:
        >>> opt = optimizer_for([torch.nn.Parameter(torch.zeros(2))], MotionDistillationConfig(), "cpu", False)
    """
    kwargs = {"fused": True} if torch.device(device).type == "cuda" else {}
    if graph:
        kwargs["capturable"] = True
    return torch.optim.AdamW(
        params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, **kwargs,
    )


#: Optimizer flags that describe how a step runs, not what it computes: a resumed run keeps its own.
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def keep_implementation_flags(saved_groups: list[dict], optimizer: torch.optim.Optimizer) -> list[dict]:
    """Saved param groups with this optimizer's implementation flags (a checkpoint may come from another device)."""
    return [
        {**saved, **{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group}}
        for saved, group in zip(saved_groups, optimizer.param_groups)
    ]


__all__ = [
    "GRAPH_WARMUP_STEPS",
    "FrameConv",
    "ShortSequenceAttnProcessor",
    "JointAttnProcessor",
    "StepRunner",
    "WeightPrecision",
    "autocast_dtype",
    "checkpointing",
    "compiled",
    "temporal_kernels",
    "keep_implementation_flags",
    "optimizer_for",
    "regional_compile",
    "joint_attention_processors",
    "use_cuda_graph",
]
