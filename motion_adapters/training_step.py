"""One `train_motion` step and what makes it fast: weight dtypes, temporal kernels, checkpointing, compile, graphs.

`train_motion` owns the loop (timesteps, noise, checkpoints, callbacks); this module owns what happens inside a
step and how the UNet is prepared for it:

- `WeightPrecision` stores the frozen weights in the compute dtype for the run (no per-step casts of the whole
  UNet), trains float32 master copies of the adapter's parameters under autocast, and puts every parameter back
  in its own dtype afterwards.
- `norms_in_compute_dtype` runs group and layer norms in the mixed-precision dtype instead of autocast's float32.
- `frozen_convs_keep_no_input` makes frozen convolutions keep only their weight for the backward pass.
- `frozen_activations_recomputed` makes frozen norm -> activation pairs and GEGLU feed-forwards keep only their
  input and recompute the rest in the backward pass.
- `checkpointing` switches gradient checkpointing on for all blocks or for named blocks only, and restores it.
- `temporal_kernels` swaps in kernels suited to sequences of a few frames (math SDPA for temporal attention,
  `Conv2d` for the (3, 1, 1) temporal convolutions) for the run, and restores the originals.
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
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.losses import epsilon_from_output, motion_distillation_loss, split_epsilon

#: Normalisation layers keep float32 weights: autocast computes them in float32 anyway.
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
#: Eager steps before the CUDA graph is captured (PyTorch's guidance for whole-network capture: at least 3).
GRAPH_WARMUP_STEPS = 3


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
    for this shape where its 3D ones are slow.

    Example:
        >>> conv = torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
        >>> x = torch.randn(1, 4, 5, 2, 3)
        >>> torch.allclose(FrameConv(conv)(x), conv(x), atol=1e-6)
        True
    """

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.weight = conv.weight  # the same Parameter objects, under the same names
        self.bias = conv.bias
        self.frame_padding = conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve (B, C, F, H, W) along frames."""
        b, _, f, h, w = x.shape
        y = torch.nn.functional.conv2d(
            x.reshape(b, x.shape[1], f, h * w), self.weight.squeeze(-1), self.bias, padding=(self.frame_padding, 0)
        )
        return y.reshape(b, y.shape[1], f, h, w)


class ShortSequenceAttnProcessor(AttnProcessor2_0):
    """`AttnProcessor2_0` with PyTorch's math SDPA kernel: two batched matmuls and a softmax.

    Temporal attention attends over the frames (8) at every pixel with 64 heads of 5-20 channels; fused
    flash kernels tile 128 queries and pad heads to 32 channels, so most of their work is padding there.

    Example:
        >>> attn.set_processor(ShortSequenceAttnProcessor())  # doctest: +SKIP
    """

    def __call__(self, *args, **kwargs):
        """Run `AttnProcessor2_0` with only the math kernel allowed."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return super().__call__(*args, **kwargs)


@contextmanager
def temporal_kernels(unet: nn.Module, choice: str) -> Iterator[None]:
    """Swap in faster temporal layers for the run ("conv2d", "math_attention", "fast" = both), then restore.

    "conv2d" runs every (k, 1, 1) `Conv3d` of the temporal convolutions as a `Conv2d` (`FrameConv`);
    "math_attention" gives every temporal attention (`*temp_attentions*` and `transformer_in`, the layers whose
    sequences are frames) a `ShortSequenceAttnProcessor`. Same function, same parameters; "library" changes
    nothing.

    Example:
        >>> with temporal_kernels(unet, "fast"):  # doctest: +SKIP
        ...     loss = step(unet)
    """
    undo: list[Callable[[], None]] = []
    if choice in ("conv2d", "fast"):
        for parent in list(unet.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv3d) and tuple(child.kernel_size[1:]) == (1, 1) and child.groups == 1:
                    setattr(parent, name, FrameConv(child))
                    undo.append(functools.partial(setattr, parent, name, child))
    if choice in ("math_attention", "fast"):
        for name, module in unet.named_modules():
            temporal = ".temp_attentions." in f".{name}" or name.startswith("transformer_in")
            if temporal and isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
                undo.append(functools.partial(module.set_processor, module.processor))
                module.set_processor(ShortSequenceAttnProcessor())
    try:
        yield
    finally:
        for step in reversed(undo):
            step()


@contextmanager
def _forwards_replaced(modules: list[nn.Module], forward_for: Callable[[nn.Module], Callable]) -> Iterator[int]:
    """Give each module the instance `forward` `forward_for(module)` for the block, then its class's again.

    Modules that already carry an instance `forward` (an accelerate offload hook, say) are left as they are.
    Yields how many modules were changed.
    """
    changed = [m for m in modules if "forward" not in vars(m)]
    for module in changed:
        module.forward = forward_for(module)
    try:
        yield len(changed)
    finally:
        for module in changed:
            del module.forward


def _norm_in_compute_dtype(norm: nn.GroupNorm | nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in autocast's dtype (or `x`'s outside autocast), not autocast's float32."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    weight = None if norm.weight is None else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if isinstance(norm, nn.GroupNorm):
            return torch.nn.functional.group_norm(x.to(dtype), norm.num_groups, weight, bias, norm.eps)
        return torch.nn.functional.layer_norm(x.to(dtype), norm.normalized_shape, weight, bias, norm.eps)


@contextmanager
def norms_in_compute_dtype(unet: nn.Module, enabled: bool) -> Iterator[int]:
    """Run every `GroupNorm` and `LayerNorm` of `unet` in the autocast dtype for the run, then restore them.

    Autocast computes norms in float32: a norm casts its half input up and returns float32, which the next
    convolution or linear layer casts back down, so every normalised activation is copied twice and kept in
    float32 for the backward pass. Here the norm reads and writes the half dtype; PyTorch's CUDA kernels accumulate
    mean and variance in float32 either way. The modules keep their class (diffusers checks `isinstance` on
    `norm_cross`): only their `forward` is replaced, on the instance. Yields the number of norms changed.

    Example:
        >>> with norms_in_compute_dtype(unet, True) as count:  # doctest: +SKIP
        ...     loss = step(unet)
    """
    norms = [m for m in unet.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))] if enabled else []
    with _forwards_replaced(norms, lambda norm: functools.partial(_norm_in_compute_dtype, norm)) as count:
        yield count


class _InputGradOnlyConv(torch.autograd.Function):
    """A convolution whose backward pass computes the input's gradient only, so it keeps the weight, not the input.

    Autograd's own convolution keeps its input for the weight gradient even when the weight is frozen; this one
    computes the same output and the same input gradient (the same `convolution_backward` call, asked for the input
    gradient alone) without holding the activation.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        dims = weight.ndim - 2
        ctx.save_for_backward(weight)
        ctx.conv = (x.shape, x.dtype, stride, padding, dilation, groups, dims)
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * dims, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups, dims = ctx.conv
        placeholder = grad.new_empty(1).expand(shape)  # read for its shape only: the weight gradient is not asked
        grad_input = torch.ops.aten.convolution_backward(
            grad.to(weight.dtype), placeholder, weight, None, stride, padding, dilation, False, [0] * dims, groups,
            (True, False, False),
        )[0]  # fmt: skip
        return grad_input.to(dtype), None, None, None, None, None, None


def conv_keeping_no_input(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation, groups: int
) -> torch.Tensor:
    """`conv2d` / `conv3d` (by the weight's rank) for a frozen weight, keeping no activation for the backward pass.

    Under autocast the input, weight and bias are cast to its dtype first, as autocast's own convolution does.

    Example:
        >>> w = torch.randn(4, 2, 3, 3)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> torch.allclose(conv_keeping_no_input(x, w, None, [1, 1], [1, 1], [1, 1], 1),
        ...                torch.nn.functional.conv2d(x, w, padding=1), atol=1e-6)
        True
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return _InputGradOnlyConv.apply(x, weight, bias, list(stride), list(padding), list(dilation), groups)


def _frozen_conv_forward(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    return conv_keeping_no_input(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _frozen_frame_conv_forward(conv: FrameConv, x: torch.Tensor) -> torch.Tensor:
    b, _, f, h, w = x.shape
    y = conv_keeping_no_input(x.reshape(b, x.shape[1], f, h * w), conv.weight.squeeze(-1), conv.bias, [1, 1],
                              [conv.frame_padding, 0], [1, 1], 1)  # fmt: skip
    return y.reshape(b, y.shape[1], f, h, w)


@contextmanager
def frozen_convs_keep_no_input(unet: nn.Module, enabled: bool) -> Iterator[int]:
    """Make every frozen convolution of `unet` keep only its weight for the backward pass, then restore them.

    A frozen convolution passes gradients back through its weight alone, yet autograd keeps its input for a weight
    gradient nobody asks for: in a UNet that is one activation for each of the two convolutions of a ResNet block
    and the four of a temporal convolution layer. Only `nn.Conv2d`, `nn.Conv3d` (and `FrameConv`) with zero padding
    given as numbers and no parameter that requires gradients are changed, by replacing their `forward` on the
    instance. Same outputs, same input gradients. Yields the number of convolutions changed.

    Example:
        >>> with frozen_convs_keep_no_input(unet, True) as count:  # doctest: +SKIP
        ...     loss = step(unet)
    """
    convs = []
    if enabled:
        for m in unet.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            if isinstance(m, FrameConv) or (
                isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            ):
                convs.append(m)

    def forward_for(conv: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        forward = _frozen_frame_conv_forward if isinstance(conv, FrameConv) else _frozen_conv_forward
        return functools.partial(forward, conv)

    with _forwards_replaced(convs, forward_for) as count:
        yield count


def _compute_dtype(x: torch.Tensor, float32_under_autocast: bool) -> torch.dtype:
    """The dtype autocast would run a layer in: its half dtype, float32 for norms under autocast's own rule, or x's."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x.dtype
    return torch.float32 if float32_under_autocast else torch.get_autocast_dtype(device_type)


def _activation_of(module: nn.Module) -> str | None:
    """"silu" or "gelu" for an exact `nn.SiLU` or an exact `nn.GELU` without approximation, else None."""
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is nn.GELU and module.approximate == "none":
        return "gelu"
    return None


def _activate(y: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.nn.functional.silu(y) if activation == "silu" else torch.nn.functional.gelu(y)


class _GroupNormAct(torch.autograd.Function):
    """`act(group_norm(x) * factor + shift)` for a frozen norm, keeping `x` and two statistics for the backward.

    Autograd keeps the norm's input and, for the activation, the normalised (and scaled) activation: two tensors of
    the same size. Here the backward pass recomputes the second from the first (one more normalisation, a
    memory-bound kernel) and calls the same `silu_backward` / `gelu_backward` and `native_group_norm_backward`
    that autograd calls. `scale` (the factor, 1 + the time scale) and `shift` ((N, C, 1, 1), or None) must not
    require gradients; they keep their dtype, so type promotion is that of diffusers' own expression.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, activation):
        n, c = x.shape[:2]
        hw = x.numel() // (n * c)
        y, mean, rstd = torch.ops.aten.native_group_norm(x.contiguous(), weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.norm = (n, c, hw, groups, eps, activation)
        y = y.view(x.shape)
        if scale is not None:
            y = y * scale + shift
        return _activate(y, activation)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        n, c, hw, groups, eps, activation = ctx.norm
        shape, x = x.shape, x.contiguous()
        y = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, eps)[0].view(shape)
        pre = y if scale is None else y * scale + shift
        grad = grad.to(y.dtype)
        if activation == "silu":
            grad_pre = torch.ops.aten.silu_backward(grad, pre)
        else:
            grad_pre = torch.ops.aten.gelu_backward(grad, pre)
        grad_y = grad_pre if scale is None else grad_pre * scale
        grad_x = torch.ops.aten.native_group_norm_backward(
            grad_y.contiguous(), x, mean, rstd, weight, n, c, hw, groups, [True, False, False]
        )[0]  # fmt: skip
        return grad_x.view(shape), None, None, None, None, None, None, None


def group_norm_act_keeping_input(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    activation: str = "silu",
    float32_norms: bool = True,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """`act(norm(x) * (1 + scale) + shift)` for a frozen `norm`, keeping only `x` for the backward pass.

    `activation` is "silu" or "gelu"; `scale` and `shift` are optional and must not require gradients. Runs in the
    dtype the norm would run in: float32 under autocast when `float32_norms` (autocast's rule), else autocast's
    dtype (as `norm_dtype="compute"`); outside autocast in `x`'s dtype.

    Example:
        >>> norm = torch.nn.GroupNorm(2, 4)
        >>> x = torch.randn(1, 4, 3, 5)
        >>> torch.allclose(group_norm_act_keeping_input(norm, x), torch.nn.functional.silu(norm(x)), atol=1e-6)
        True
    """
    dtype = _compute_dtype(x, float32_norms)
    weight = None if norm.weight is None else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        factor = None if scale is None else 1 + scale  # in scale's dtype, as diffusers computes it
        return _GroupNormAct.apply(x.to(dtype), weight, bias, factor, shift, norm.num_groups, norm.eps, activation)


#: Multiplying eight 0/1 bytes read as one int64 by this gathers them into its top byte; multiplying a byte by it
#: and masking spreads the byte's bits back into eight bytes (the constant as a signed int64).
_SPREAD = 0x8040201008040201 - (1 << 64)
_LOW_BITS = 0x0101010101010101


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, eight to a byte, the first in the highest bit (see `_unpack_bits`)."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return ((flat.view(torch.uint8).view(torch.int64) * _SPREAD) >> 56).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor of `shape` that `_pack_bits` packed."""
    spread = ((packed.to(torch.int64) * _SPREAD) >> 7) & _LOW_BITS
    return spread.view(torch.uint8).view(torch.bool)[: shape.numel()].view(shape)


class _BitMaskDropout(torch.autograd.Function):
    """Dropout that keeps its mask as bits (one byte for eight values) instead of one byte a value.

    Draws the mask exactly as `nn.Dropout` does on the input's device (CUDA's fused `native_dropout`, the CPU's
    `bernoulli_`), so the same seed gives the same mask and output.
    """

    @staticmethod
    def forward(ctx, x, p):
        if x.is_cuda:
            out, mask = torch.ops.aten.native_dropout(x, p, True)
        else:
            noise = torch.empty_like(x).bernoulli_(1 - p)
            mask = noise.bool()
            out = x * noise.div_(1 - p)
        ctx.save_for_backward(_pack_bits(mask))
        ctx.dropout = (x.shape, p)
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        shape, p = ctx.dropout
        return torch.ops.aten.native_dropout_backward(grad, _unpack_bits(packed, shape), 1.0 / (1 - p)), None


def _norm_act_sequential(seq: nn.Sequential, float32_norms: bool, x: torch.Tensor) -> torch.Tensor:
    x = group_norm_act_keeping_input(seq[0], x, _activation_of(seq[1]), float32_norms)
    for module in list(seq)[2:]:
        if type(module) is nn.Dropout and module.training and 0 < module.p < 1 and torch.is_grad_enabled():
            x = _BitMaskDropout.apply(x, module.p)
        else:
            x = module(x)
    return x


def _resnet_keeping_inputs(block: nn.Module, float32_norms: bool, input_tensor, temb, *args, **kwargs):
    """The forward of diffusers' `ResnetBlock2D` with its two norm -> activation pairs through `_GroupNormAct`."""
    activation = _activation_of(block.nonlinearity)
    if (args or kwargs) or (temb is not None and temb.requires_grad) or not torch.is_grad_enabled():
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    hidden_states = group_norm_act_keeping_input(block.norm1, input_tensor, activation, float32_norms)
    if block.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor, hidden_states = input_tensor.contiguous(), hidden_states.contiguous()
        input_tensor, hidden_states = block.upsample(input_tensor), block.upsample(hidden_states)
    elif block.downsample is not None:
        input_tensor, hidden_states = block.downsample(input_tensor), block.downsample(hidden_states)
    hidden_states = block.conv1(hidden_states)
    if block.time_emb_proj is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        temb = block.time_emb_proj(temb)[:, :, None, None]
    if block.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {block.time_embedding_norm}")
        scale, shift = torch.chunk(temb, 2, dim=1)
        hidden_states = group_norm_act_keeping_input(block.norm2, hidden_states, activation, float32_norms,
                                                     scale, shift)  # fmt: skip
    else:
        if block.time_embedding_norm == "default" and temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = group_norm_act_keeping_input(block.norm2, hidden_states, activation, float32_norms)
    hidden_states = block.dropout(hidden_states)
    hidden_states = block.conv2(hidden_states)
    if block.conv_shortcut is not None:
        input_tensor = block.conv_shortcut(input_tensor.contiguous() if block.training else input_tensor)
    return (input_tensor + hidden_states) / block.output_scale_factor


def _resnet_qualifies(block: nn.Module) -> bool:
    """A diffusers `ResnetBlock2D` with frozen group norms, an exact SiLU/GELU and the time norms mirrored above."""
    from diffusers.models.resnet import ResnetBlock2D

    return (
        type(block) is ResnetBlock2D
        and type(block).forward is ResnetBlock2D.forward
        and type(block.norm1) is nn.GroupNorm
        and type(block.norm2) is nn.GroupNorm
        and _activation_of(block.nonlinearity) is not None
        and block.time_embedding_norm in ("default", "scale_shift")
        and not any(p.requires_grad for p in (*block.norm1.parameters(), *block.norm2.parameters()))
        and not any(hasattr(m, "_hf_hook") for m in block.modules())
    )


class _GEGLUFeedForward(torch.autograd.Function):
    """A frozen GEGLU feed-forward, `w2(h * gelu(g))` with `(h, g) = w1(x)`, that keeps only `x` for the backward.

    Autograd keeps the projection's output (both halves) and the GELU's output, twelve values for each channel of
    the input; this keeps the input and recomputes the projection in the backward pass (one more matrix product
    of the two).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        hidden, gate = torch.nn.functional.linear(x, w1, b1).chunk(2, dim=-1)
        ctx.save_for_backward(x, w1, b1, w2)
        return torch.nn.functional.linear(hidden * torch.nn.functional.gelu(gate), w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2 = ctx.saved_tensors
        hidden, gate = torch.nn.functional.linear(x, w1, b1).chunk(2, dim=-1)
        grad_act = grad.to(w2.dtype).matmul(w2)
        grad_hidden = grad_act * torch.nn.functional.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad_act * hidden, gate)
        grad_x = torch.cat([grad_hidden, grad_gate], dim=-1).matmul(w1)
        return grad_x.to(x.dtype), None, None, None, None


def _frozen_geglu_parts(ff: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """(projection, output) of a diffusers `FeedForward` that is exactly GEGLU -> no-op dropouts -> Linear, frozen."""
    from diffusers.models.activations import GEGLU

    net = list(getattr(ff, "net", []))
    if not net or type(net[0]) is not GEGLU or any(hasattr(m, "_hf_hook") for m in ff.modules()):
        return None
    rest = [m for m in net[1:] if not (isinstance(m, nn.Dropout) and (m.p == 0 or not m.training))]
    if len(rest) != 1 or type(rest[0]) is not nn.Linear:
        return None
    proj, out = net[0].proj, rest[0]
    if any(p.requires_grad for p in (*proj.parameters(), *out.parameters())):
        return None
    return proj, out


def _geglu_feed_forward(ff: nn.Module, parts: tuple[nn.Linear, nn.Linear], x: torch.Tensor, *args, **kwargs):
    proj, out = parts
    dropouts = [m for m in ff.net if isinstance(m, nn.Dropout)]
    if any(m.training and m.p > 0 for m in dropouts):  # switched on after the check: run the module as written
        return type(ff).forward(ff, x, *args, **kwargs)
    dtype = _compute_dtype(x, False)
    w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (proj.weight, proj.bias, out.weight, out.bias))
    with torch.autocast(x.device.type, enabled=False):
        return _GEGLUFeedForward.apply(x.to(dtype), w1, b1, w2, b2)


@contextmanager
def frozen_activations_recomputed(unet: nn.Module, enabled: bool, float32_norms: bool = True) -> Iterator[int]:
    """Make frozen norm -> activation pairs and GEGLU feed-forwards keep only their input, then restore them.

    Changed, by replacing `forward` on the instance:

    - every `nn.Sequential` that starts with a frozen `GroupNorm` and an exact `nn.SiLU` or `nn.GELU` (the four of
      each temporal convolution layer): the activation's input is recomputed in the backward pass instead of kept,
      and a dropout inside keeps its mask as bits;
    - every diffusers `ResnetBlock2D` with frozen group norms: the same for its two norm -> activation pairs (the
      second with the time embedding's scale and shift between them), the rest of its forward unchanged;
    - every diffusers `FeedForward` that is a frozen GEGLU -> Linear (the feed-forward of each temporal
      transformer): its projection is recomputed instead of keeping three activations four to eight times the
      input's size.

    Same outputs, same dropout masks, same input gradients; a little more compute in the backward pass.
    `float32_norms` says whether the norms run in float32 under autocast (`norm_dtype="float32"`). Yields the
    number of modules changed.

    Example:
        >>> with frozen_activations_recomputed(unet, True) as count:  # doctest: +SKIP
        ...     loss = step(unet)
    """
    chosen: dict[nn.Module, Callable] = {}
    if enabled:
        for m in unet.modules():
            if isinstance(m, nn.Sequential) and len(m) >= 2 and type(m[0]) is nn.GroupNorm and _activation_of(m[1]):
                if not any(p.requires_grad for p in m[0].parameters()) and not hasattr(m[0], "_hf_hook"):
                    chosen[m] = functools.partial(_norm_act_sequential, m, float32_norms)
            elif type(m).__name__ == "FeedForward" and (parts := _frozen_geglu_parts(m)) is not None:
                chosen[m] = functools.partial(_geglu_feed_forward, m, parts)
            elif _resnet_qualifies(m):
                chosen[m] = functools.partial(_resnet_keeping_inputs, m, float32_norms)
    with _forwards_replaced(list(chosen), chosen.__getitem__) as count:
        yield count


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

    def __call__(self, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Run one optimisation step; return its loss as a 0-d tensor on the device (not yet synchronised)."""
        device = self.x0.device
        t = t.to(device, non_blocking=True)
        noise = noise.to(device, non_blocking=True)
        with self._compile_settings():
            if not self.use_graph:
                loss = self._eager_step(t, noise)
            elif self.steps_run < GRAPH_WARMUP_STEPS:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    loss = self._eager_step(t, noise)
                torch.cuda.current_stream(device).wait_stream(side)
            else:
                if self.graph is None:
                    self._capture(t, noise)
                self._static["t"].copy_(t)
                self._static["noise"].copy_(noise)
                self.graph.replay()
                loss = self._static["loss"]
        self.steps_run += 1
        return loss

    def loss(self, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The motion distillation loss of the UNet on the clip noised at timesteps `t` with `noise`."""
        abar = self.alphas_cumprod[t]
        a = abar.view(-1, 1, 1, 1, 1)
        noisy = a.sqrt() * self.x0 + (1 - a).sqrt() * noise
        if self.compute_dtype is None:
            ctx = nullcontext()
        else:  # a graph must not keep autocast's cast cache alive between replays
            ctx = torch.autocast(self.x0.device.type, dtype=self.compute_dtype, cache_enabled=not self.use_graph)
        with ctx:
            out = self.model(noisy, t, encoder_hidden_states=self.embeds).sample
        eps_pred = epsilon_from_output(split_epsilon(out.float(), self.in_channels), noisy, abar, self.prediction_type)
        c = self.config
        loss = motion_distillation_loss(
            noise, eps_pred, loss=c.loss, cos_variant=c.cos_variant, stride=c.frame_stride, abar=abar
        )
        if c.epsilon_loss_weight:
            loss = loss + c.epsilon_loss_weight * (eps_pred - noise).pow(2).mean()
        return loss

    def _update(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
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

    def _capture(self, t: torch.Tensor, noise: torch.Tensor) -> None:
        self._static = {"t": t.clone(), "noise": noise.clone()}
        # gradients are allocated inside the capture, so every replay writes this step's gradients afresh
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.loss(self._static["t"], self._static["noise"])
            self._update(loss)
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
    "StepRunner",
    "WeightPrecision",
    "autocast_dtype",
    "checkpointing",
    "compiled",
    "conv_keeping_no_input",
    "frozen_convs_keep_no_input",
    "temporal_kernels",
    "keep_implementation_flags",
    "norms_in_compute_dtype",
    "optimizer_for",
    "use_cuda_graph",
]
