"""Layer swaps for a training run that keep less for the backward pass, each a context manager that restores them.

- `norms_in_compute_dtype` runs group and layer norms in the mixed-precision dtype instead of autocast's float32.
- `frozen_convs_keep_no_input` makes frozen convolutions keep only their weight for the backward pass.
- `frozen_activations_recomputed` makes frozen norm -> activation pairs keep only their input and recompute the
  rest in the backward pass, GEGLU feed-forwards keep at most their projection, and keeps dropout masks as bits;
  with `fused_norms` the pairs run on the Triton kernels of `motion_adapters.fused_norm`.
- `fused_norm_activations` runs the same pairs on those kernels while sampling (gradients off), with the bias of
  the convolution before each norm added inside the norm's kernels instead of in a pass of its own.

Each replaces `forward` on module instances (never a module's class, which diffusers checks with `isinstance`),
computes the same outputs and input gradients, and leaves modules that already carry an instance `forward` (an
offload hook) alone. `train_motion` enters them from `MotionDistillationConfig`'s `norm_dtype`, `frozen_convs` and
`frozen_activations`; `benchmarks/activation_memory.py` counts what each saves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from motion_adapters.fused_norm import (
    _dense,
    add_layer_norm_forward,
    bit_masked_scale,
    channels_last_rows,
    fused_norm_available,
    geglu,
    geglu_backward,
    group_norm_act_backward,
    group_norm_act_forward,
    layer_norm_input_grad,
    pack_bits,
    residual_sum,
)
from motion_adapters.im2col_conv import Im2colConv, fold_frame_taps, im2col_conv_applies, wide_product
from motion_adapters.resample import plain_upsampler, resample
from motion_adapters.temporal_conv import temporal_conv
from motion_adapters.training_step import FrameConv, cudnn_benchmark


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


def _compute_dtype(x: torch.Tensor, float32_under_autocast: bool) -> torch.dtype:
    """The dtype autocast would run a layer in: its half dtype, float32 for norms under autocast's own rule, or x's."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x.dtype
    return torch.float32 if float32_under_autocast else torch.get_autocast_dtype(device_type)


def _norm_in_compute_dtype(norm: nn.GroupNorm | nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in autocast's dtype (or `x`'s outside autocast), not autocast's float32."""
    dtype = _compute_dtype(x, float32_under_autocast=False)
    weight = None if norm.weight is None else norm.weight.to(dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
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


class _FrozenAddLayerNorm(torch.autograd.Function):
    """`(a + x, layer_norm(a + x))` (only `layer_norm(x)` where `a` is None) for a frozen affine `LayerNorm`.

    One Triton pass each way (`fused_norm.add_layer_norm_forward`, `layer_norm_input_grad`): the residual sum and
    the norm over it forward; backward, the norm's input gradient with the sum's other gradient added, which
    reaches `a` and `x` alike. Keeps the sum and two float32 statistics a row, as PyTorch's norm keeps its input.
    """

    @staticmethod
    def forward(ctx, a, x, weight, bias, eps):
        s, y, mean, rstd = add_layer_norm_forward(a, x, weight, bias, eps)
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.add = a is not None
        return (s, y) if ctx.add else y

    @staticmethod
    def backward(ctx, *grads):
        s, weight, mean, rstd = ctx.saved_tensors
        grad_s, grad_y = grads if ctx.add else (None, grads[0])
        if grad_y is None:
            grad = grad_s
        else:
            grad = layer_norm_input_grad(grad_y, s, weight, mean, rstd, grad_s)
        return (grad if ctx.add else None), grad, None, None, None


def frozen_layer_norm_applies(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether `frozen_add_layer_norm` runs `norm` on (M, C) rows `x`.

    That is: a frozen affine `nn.LayerNorm` over C, gradients on, the kernels available on x's device, and
    `FUSED_LAYER_NORMS` on.
    """
    return (
        FUSED_LAYER_NORMS and torch.is_grad_enabled() and type(norm) is nn.LayerNorm and x.dim() == 2
        and tuple(norm.normalized_shape) == (x.shape[1],) and norm.weight is not None and norm.bias is not None
        and not norm.weight.requires_grad and not norm.bias.requires_grad and fused_norm_available(x)
    )  # fmt: skip


def frozen_add_layer_norm(norm: nn.LayerNorm, a: torch.Tensor | None, x: torch.Tensor):
    """`(a + x, norm(a + x))`, or `norm(x)` where `a` is None, for a frozen `norm` (`frozen_layer_norm_applies`).

    In autocast's dtype (as `norm_dtype="compute"` runs norms; the sum in it as PyTorch adds two such tensors),
    else in x's; one Triton pass each way instead of the addition, the norm, and autograd's sum of the residual's
    two gradients.

    Example:
        >>> x, h = frozen_add_layer_norm(block.norm2, attention_output, x)  # doctest: +SKIP
    """
    dtype = _compute_dtype(x, float32_under_autocast=False)
    weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        a = None if a is None else a.to(dtype).contiguous()
        return _FrozenAddLayerNorm.apply(a, x.to(dtype).contiguous(), weight, bias, norm.eps)


#: Whether the temporal transformers' layer norms (on token rows, in training) run as `frozen_add_layer_norm`, each
#: with the residual addition before it, instead of PyTorch's addition and norm.
FUSED_LAYER_NORMS = True


#: Whether `_InputGradOnlyConv`'s backward passes `convolution_backward` an uninitialised stand-in for the input in
#: the weight's dtype and the input's layout (True) or, as before, an expanded one-element tensor that the backend
#: materialised (`bench_training.py`'s `full_expanded_placeholder`).
TYPED_CONV_PLACEHOLDER = True


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """`torch.channels_last` (or `_3d`) when `x`'s channels are innermost in memory, else `torch.contiguous_format`."""
    if x.dim() in (4, 5) and channels_last_rows(x) is not None:
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


#: Convolutions whose algorithm cuDNN chooses by timing its candidates (`torch.backends.cudnn.benchmark` set around
#: the call), as `(kind, input shape, weight shape)` with kind "fwd" (the convolution) or "dgrad" (its input
#: gradient); the others keep PyTorch's heuristic choice. PyTorch caches a shape's choice for the process at its
#: first call, so the timing is paid once a process and shape. Timing every shape (`cudnn_benchmark=True`) made
#: steps 1.04 times faster on an H200 but cost about 12 s once (docs/performance.md); this set is for the shapes
#: whose saving over a run exceeds their timing's cost (`benchmarks/bench_conv_shapes.py --compare-timed`). Empty:
#: no shape is timed.
TIMED_CONV_SHAPES: frozenset[tuple[str, tuple[int, ...], tuple[int, ...]]] = frozenset()


def _timed(kind: str, x_shape, w_shape) -> bool:
    """Whether `(kind, x_shape, w_shape)` is in TIMED_CONV_SHAPES."""
    return bool(TIMED_CONV_SHAPES) and (kind, tuple(x_shape), tuple(w_shape)) in TIMED_CONV_SHAPES


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
        ctx.conv = (x.shape, x.dtype, _memory_format(x), stride, padding, dilation, groups, dims)
        with cudnn_benchmark(_timed("fwd", x.shape, weight.shape)):
            return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * dims, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, memory_format, stride, padding, dilation, groups, dims = ctx.conv
        # Read for its shape only (the weight gradient is not asked), but `convolution_backward` converts its input
        # to the weight's dtype and the backend's memory format first: an expanded one-element tensor was
        # materialised twice, two copies of an activation a layer (profiled on an H200). An uninitialised tensor of
        # the input's layout and the weight's dtype is taken as it is, and costs an allocation only.
        if TYPED_CONV_PLACEHOLDER:
            placeholder = torch.empty(shape, dtype=weight.dtype, device=grad.device, memory_format=memory_format)
        else:
            placeholder = grad.new_empty(1).expand(shape)
        with cudnn_benchmark(_timed("dgrad", shape, weight.shape)):
            grad_input = torch.ops.aten.convolution_backward(
                grad.to(weight.dtype), placeholder, weight, None, stride, padding, dilation, False, [0] * dims,
                groups, (True, False, False),
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
        if POINTWISE_CONV_GEMMS and _pointwise(x, weight, stride, padding, groups):
            return _PointwiseConv.apply(x, weight, bias)
        if im2col_conv_applies(x, weight, stride, padding, dilation, groups):
            return Im2colConv.apply(x, weight, bias)
        return _InputGradOnlyConv.apply(x, weight, bias, list(stride), list(padding), list(dilation), groups)


class _PointwiseConv(torch.autograd.Function):
    """A frozen 1 x 1 convolution of channels-last activations as one GEMM over their rows, keeping the weight only.

    PyTorch picks the convolution backend's memory format from the input and the weight; `_InputGradOnlyConv`
    passes a shape-only placeholder input, and a 1 x 1 weight is both contiguous and channels-last, so the input
    gradient came back NCHW (a channels-last gradient copied first), and NCHW gradients then reached every layer
    before it (benchmarks/trace_layouts.py). Here the rows stay channels-last both ways, the gradient rows a view
    wherever the gradient comes channels-last.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = channels_last_rows(x)  # (N, H, W, in), or (N, F, H, W, in)
        matrix = weight.flatten(1)  # (out, in)
        flat = rows.reshape(-1, rows.shape[-1])
        y = torch.mm(flat, matrix.t()) if bias is None else torch.addmm(bias, flat, matrix.t())
        ctx.save_for_backward(weight)
        ctx.shape = x.shape
        return y.view(*rows.shape[:-1], -1).movedim(-1, 1)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = grad.to(weight.dtype).movedim(1, -1).reshape(-1, grad.shape[1])  # a view when grad is channels-last
        grad_input = torch.mm(rows, weight.flatten(1))
        shape = ctx.shape
        return grad_input.view(shape[0], *shape[2:], shape[1]).movedim(-1, 1), None, None


def _pointwise(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> bool:
    """Whether `_PointwiseConv` runs a convolution: a 1 x 1 kernel, stride 1, no padding, channels-last input."""
    return (
        weight.ndim == x.ndim
        and all(k == 1 for k in weight.shape[2:])
        and all(s == 1 for s in stride)
        and all(p == 0 for p in padding)
        and groups == 1
        and x.dtype == weight.dtype
        and channels_last_rows(x) is not None
    )


#: Whether frozen 1 x 1 convolutions of channels-last activations run as GEMMs over their rows (`_PointwiseConv`)
#: in training: 1.04 times faster steps on an H200 (training_pointwise_h200.json); `bench_training.py`'s
#: `full_cudnn_pointwise_convs` switches it off.
POINTWISE_CONV_GEMMS = True


class _FrameTapsConv(torch.autograd.Function):
    """A frozen (k, 1, 1) convolution of one clip's channels-last frames as k matrix products, keeping the weight only.

    With the activations stored (frames, pixels, channels), frame `i + s` of every pixel is the block of rows `s`
    frames further on, so each tap of the kernel is one GEMM over a row-shifted view, added into the rows of the
    output it reaches (frames past either end are the zero padding: their rows are left out). A channels-last weight
    stores each tap as a (out, in) matrix of unit inner stride, which cuBLAS reads in place. The backward pass is the
    same with the taps transposed and the shifts reversed. The taps accumulate in the output's dtype (cuDNN's
    convolution accumulates all of them in float32 before rounding once).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        _, channels, frames, height, width = x.shape
        pixels = height * width
        rows = x.permute(0, 2, 3, 4, 1).reshape(frames * pixels, channels)  # a view: channels-last_3d, batch 1
        if _taps_folded(rows):  # (rows, out * k): row-by-tap products, channel-major; then one fold
            z = wide_product(rows, _tap_rows(weight).t())
            y = fold_frame_taps(z, pixels, weight.shape[2], True, bias, rows.dtype)
        else:
            taps = weight[..., 0, 0].unbind(2)  # k x (out, in), unit inner stride
            y = _taps_accumulated(rows, [tap.t() for tap in taps], bias, pixels, reverse=False)
        ctx.save_for_backward(weight)
        ctx.shape = x.shape
        return y.view(1, frames, height, width, -1).permute(0, 4, 1, 2, 3)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        _, channels, frames, height, width = ctx.shape
        pixels = height * width
        rows = grad.to(weight.dtype).permute(0, 2, 3, 4, 1).reshape(frames * pixels, -1)
        if _taps_folded(rows):  # (rows, k * in): the gradient rows by every tap, tap-major; then one fold
            z = wide_product(rows, weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1))
            grad_x = fold_frame_taps(z, pixels, weight.shape[2], False, None, weight.dtype, reverse=True)
        else:
            grad_x = _taps_accumulated(rows, list(weight[..., 0, 0].unbind(2)), None, pixels, reverse=True)
        return grad_x.view(1, frames, height, width, channels).permute(0, 4, 1, 2, 3), None, None


#: Frozen temporal convolutions of at most this many rows (frames times pixels; show-1-base: 320 at the 5 x 8
#: level, 1,280 at 10 x 16) run as one GEMM of the rows by all k taps and one fold (`im2col_conv.fold_frame_taps`)
#: instead of k GEMMs accumulated in turn: where few rows leave most of the GPU idle in each narrow GEMM (a 1,280
#: channel tap at 5 x 8: 15 output tiles of 128 x 256, the tile the profile's larger GEMMs ran with, for 132
#: multiprocessors), one GEMM k times as wide has k times the tiles at once, and the taps are summed in float32
#: and rounded once (as cuDNN's convolution does) instead of in the output's dtype. On an H100 (commit 6707c1e,
#: training_untimed_a_h100.json) 320 rows (the 5 x 8 level) made steps 1.010 times faster, the loss within the
#: reference loop's noise; 1,280 (training_untimed_b_h100.json) 1.003 times. 0 switches it off.
FRAME_TAPS_FOLDED_MAX_ROWS = 320


def _taps_folded(rows: torch.Tensor) -> bool:
    """Whether `_FrameTapsConv` runs on these (frames * pixels, channels) rows as one GEMM and a fold."""
    return rows.shape[0] <= FRAME_TAPS_FOLDED_MAX_ROWS and fused_norm_available(rows)


def _tap_rows(weight: torch.Tensor) -> torch.Tensor:
    """A channels-last (out, in, k, 1, 1) weight as its (out * k, in) matrix, row `o * k + t` tap t of output o."""
    return weight.permute(0, 2, 3, 4, 1).reshape(-1, weight.shape[1])


def _taps_accumulated(rows: torch.Tensor, taps: list[torch.Tensor], bias, pixels: int, reverse: bool) -> torch.Tensor:
    """`sum_t shift(rows, t - c) @ taps[t]` over the frames (blocks of `pixels` rows), c the centre tap.

    `reverse` shifts the other way (the backward pass). Frames out of range contribute nothing (zero padding).
    """
    centre = len(taps) // 2
    out = torch.mm(rows, taps[centre]) if bias is None else torch.addmm(bias, rows, taps[centre])
    n = rows.shape[0]
    for t, tap in enumerate(taps):
        shift = (t - centre) * pixels * (-1 if reverse else 1)  # output row r reads input row r + shift
        if t == centre or abs(shift) >= n:
            continue
        if shift > 0:
            out[: n - shift].addmm_(rows[shift:], tap)
        else:
            out[-shift:].addmm_(rows[: n + shift], tap)
    return out


def _frame_taps_apply(conv: FrameConv, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `_FrameTapsConv` runs `conv` on `x`: one clip, channels-last activations and weight, "same" padding."""
    k = weight.shape[2]
    return (
        FRAME_CONV_GEMMS
        and x.ndim == 5
        and x.shape[0] == 1
        and x.is_contiguous(memory_format=torch.channels_last_3d)
        and weight.shape[3:] == (1, 1)
        and k % 2 == 1
        and conv.frame_padding == k // 2
        and weight.stride(1) == 1  # each tap an (out, in) matrix of unit inner stride
        and x.dtype == weight.dtype
    )


#: Whether frozen temporal convolutions of one channels-last clip run as one GEMM per tap (`_FrameTapsConv`) in
#: training instead of cuDNN's (k, 1) convolution: training steps 1.03 times faster on an H200, the loss within the
#: reference loop's noise (benchmarks/results/training_frame_taps_h200.json; `full_cudnn_frame_convs` switches it
#: off there).
FRAME_CONV_GEMMS = True


def _frozen_conv_forward(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    return conv_keeping_no_input(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _frozen_frame_conv_forward(conv: FrameConv, x: torch.Tensor) -> torch.Tensor:
    if conv.runs_triton(x):  # the Triton kernel keeps only the weight already
        return temporal_conv(x, conv.weight, conv.bias)
    if FRAME_CONV_GEMMS:
        device_type = x.device.type
        cast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if cast else x.dtype
        x_cast, weight = x.to(dtype), conv.weight.to(dtype)  # `to` keeps channels-last strides
        if _frame_taps_apply(conv, x_cast, weight):
            bias = None if conv.bias is None else conv.bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return _FrameTapsConv.apply(x_cast, weight, bias)
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
    require gradients; they keep their dtype, so type promotion is that of diffusers' own expression. With `fused`
    both passes run as the Triton kernels of `motion_adapters.fused_norm` instead (float32 statistics kept).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps, activation, fused=False, input_bias=None,
                skip=False):  # fmt: skip
        n, c = x.shape[:2]
        hw = x.numel() // (n * c)
        ctx.fused = fused
        ctx.norm = (n, c, hw, groups, eps, activation)
        if skip:  # `(y, x)`: x again for a residual connection, whose gradient the backward pass adds in
            if not fused:
                raise ValueError("skip=True adds the skip's gradient inside the fused kernels only")
            ctx.set_materialize_grads(False)
        if fused:
            y, mean, rstd = group_norm_act_forward(x, weight, bias, scale, shift, groups, eps, activation, input_bias)
            ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd, input_bias)
            out_dtype = x.dtype if scale is None else torch.promote_types(torch.promote_types(x.dtype, scale.dtype),
                                                                          shift.dtype)  # fmt: skip
            y = y.view(x.shape).to(out_dtype)
            return (y, x) if skip else y
        if input_bias is not None:
            raise ValueError("input_bias is added inside the fused kernels only: add it to x for PyTorch's kernels.")
        y, mean, rstd = torch.ops.aten.native_group_norm(x.contiguous(), weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd, None)
        y = y.view(x.shape)
        if scale is not None:
            y = y * scale + shift
        return _activate(y, activation)

    @staticmethod
    def backward(ctx, grad, grad_skip=None):
        x, weight, bias, scale, shift, mean, rstd, input_bias = ctx.saved_tensors
        n, c, hw, groups, eps, activation = ctx.norm
        none = (None,) * 10
        if grad is None:  # with skip=True, where y reached nothing that needs a gradient
            return grad_skip, *none
        if ctx.fused:
            grad_x = group_norm_act_backward(grad, x, weight, bias, scale, shift, mean, rstd, groups, activation,
                                             input_bias, grad_skip)  # fmt: skip
            return grad_x.view(x.shape), *none
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
        return grad_x.view(shape), *none


def group_norm_act_keeping_input(
    norm: nn.GroupNorm,
    x: torch.Tensor,
    activation: str = "silu",
    float32_norms: bool = True,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    fused: bool = False,
    input_bias: torch.Tensor | None = None,
    skip: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`act(norm(x) * (1 + scale) + shift)` for a frozen `norm`, keeping only `x` for the backward pass.

    `activation` is "silu" or "gelu"; `scale` and `shift` are optional and must not require gradients. Runs in the
    dtype the norm would run in: float32 under autocast when `float32_norms` (autocast's rule), else autocast's
    dtype (as `norm_dtype="compute"`); outside autocast in `x`'s dtype. `fused` runs it as one Triton kernel a
    pass where `fused_norm_available(x)` (`norm_kernels="triton"`), else as PyTorch's kernels. `input_bias`
    (broadcastable to (N, C, 1, ...)) is added to `x` first: inside the fused kernels (both ways; the gradient
    reaching `x` is the one reaching `x + input_bias`), or as its own addition elsewhere and where it requires
    gradients.

    `skip=True` returns `(output, x)` for a residual connection to take `x` from: on the fused kernels, with
    gradients on and `x` already in the norm's dtype (no `input_bias`), the gradient reaching that `x` is added
    inside the norm's input-gradient kernel instead of by autograd's sum of the two afterwards; elsewhere it is
    `x` itself, and autograd sums them as before.

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
        fused = fused and fused_norm_available(x)
        if skip and not (fused and input_bias is None and x.dtype == dtype and torch.is_grad_enabled()):
            return group_norm_act_keeping_input(norm, x, activation, float32_norms, scale, shift, fused,
                                                input_bias), x  # fmt: skip
        if input_bias is not None and (not fused or (input_bias.requires_grad and torch.is_grad_enabled())):
            x, input_bias = x + _channel_view(input_bias, x), None
        return _GroupNormAct.apply(x.to(dtype), weight, bias, factor, shift, norm.num_groups, norm.eps, activation,
                                   fused, input_bias, skip)  # fmt: skip


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) or (N, C, 1, ...) per-channel tensor shaped to broadcast against (N, C, ...) `x`."""
    return t.reshape(-1, x.shape[1], *[1] * (x.dim() - 2)) if t.dim() == 1 else t


#: Multiplying eight 0/1 bytes read as one int64 by this gathers them into its top byte; multiplying a byte by it
#: and masking spreads the byte's bits back into eight bytes (the constant as a signed int64).
_SPREAD = 0x8040201008040201 - (1 << 64)
_LOW_BITS = 0x0101010101010101


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The permutation that lays `t` out contiguously: channels last for a channels-last `t`, else none."""
    return (0, *range(2, t.dim()), 1) if channels_last_rows(t) is not None else tuple(range(t.dim()))


#: Whether dropout's mask is packed into bits by one Triton kernel (`fused_norm.pack_bits`) where it runs, instead of
#: PyTorch's multiply, shift and cast over an int64 view.
PACK_BITS_KERNEL = True


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bits, eight to a byte, the first in the highest bit, in memory order (see `_unpack_bits`).

    One Triton pass (`fused_norm.pack_bits`) where `PACK_BITS_KERNEL` and the kernels run on a dense mask.
    """
    if PACK_BITS_KERNEL and mask.dtype == torch.bool and _dense(mask) and fused_norm_available(mask):
        return pack_bits(mask)
    flat = mask.permute(_memory_order(mask)).reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return ((flat.view(torch.uint8).view(torch.int64) * _SPREAD) >> 56).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape: torch.Size, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The bool tensor of `shape` that `_pack_bits` packed, laid out as it was (`order`: its `_memory_order`)."""
    spread = ((packed.to(torch.int64) * _SPREAD) >> 7) & _LOW_BITS
    flat = spread.view(torch.uint8).view(torch.bool)[: shape.numel()]
    order = tuple(range(len(shape))) if order is None else order
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.view([shape[d] for d in order]).permute(inverse)


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
        ctx.dropout = (x.shape, p, _memory_order(mask))
        return out

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        shape, p, order = ctx.dropout
        if DROPOUT_BACKWARD_KERNEL and grad.shape == shape and grad.permute(order).is_contiguous() and \
                fused_norm_available(grad):  # fmt: skip
            return bit_masked_scale(grad, packed, 1.0 / (1 - p)), None  # the bits read in place, one pass
        return torch.ops.aten.native_dropout_backward(grad, _unpack_bits(packed, shape, order), 1.0 / (1 - p)), None


#: Whether `_BitMaskDropout`'s backward pass reads its bits in the Triton kernel (`fused_norm.bit_masked_scale`)
#: where the gradient has the mask's memory order; benchmarks/bench_training.py switches it off to measure it.
DROPOUT_BACKWARD_KERNEL = True


def _norm_act_sequential(seq: nn.Sequential, float32_norms: bool, fused: bool, x: torch.Tensor, skip: bool = False):
    """`seq(x)` with its norm -> activation pair recomputed and dropout's mask kept as bits.

    With `skip`, `(seq(x), x)`, `x` as `group_norm_act_keeping_input(skip=True)` hands it on.
    """
    x = group_norm_act_keeping_input(seq[0], x, _activation_of(seq[1]), float32_norms, fused=fused, skip=skip)
    x, kept = x if skip else (x, None)
    for module in list(seq)[2:]:
        if type(module) is nn.Dropout and module.training and 0 < module.p < 1 and torch.is_grad_enabled():
            x = _BitMaskDropout.apply(x, module.p)
        else:
            x = module(x)
    return (x, kept) if skip else x


def _temporal_conv_layer_training(layer: nn.Module, float32_norms: bool, fused: bool, hidden_states: torch.Tensor,
                                  num_frames: int = 1) -> torch.Tensor:  # fmt: skip
    """Diffusers' `TemporalConvLayer` forward with the residual's gradient added inside the first norm's kernel.

    The four sequences run as `frozen_activations_recomputed` runs them; the first one's norm hands `x` on for the
    residual addition (`group_norm_act_keeping_input(skip=True)`), so the backward pass sums the two gradients of
    `x` in the norm's input-gradient kernel, not in a pass of their own.
    """
    x, identity = _norm_act_sequential(layer.conv1, float32_norms, fused, _clips(hidden_states, num_frames),
                                       skip=True)  # fmt: skip
    for seq in (layer.conv2, layer.conv3, layer.conv4):
        x = seq(x)
    return _frames(identity + x)


def _clips(hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B * F, C, H, W) frames as (B, C, F, H, W) clips, as diffusers' `TemporalConvLayer` takes them (a view)."""
    return hidden_states[None, :].reshape((-1, num_frames) + hidden_states.shape[1:]).permute(0, 2, 1, 3, 4)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) clips back to (B * F, C, H, W) frames, as diffusers' `TemporalConvLayer` returns them."""
    return x.permute(0, 2, 1, 3, 4).reshape((x.shape[0] * x.shape[2], -1) + x.shape[3:])


#: Whether training on the fused norms adds each residual connection's gradient inside the input-gradient kernel
#: of the norm that starts its branch (the ResNets' first norm, the temporal convolution layers' first), instead
#: of autograd summing the two gradients in a pass of its own (show-1-base has 30 of each, those after the frozen
#: prefix summed in a backward pass). On an H100 (commit 6707c1e, training_untimed_a_h100.json, `full_skip_grads`)
#: steps 1.005 times faster, the loss within the reference loop's noise.
SKIP_GRADS_IN_NORMS = True


#: Whether sampling on the fused norms adds the convolution biases inside the norms (`fused_norm_activations`);
#: benchmarks/bench_stage_kernels.py switches it off to measure what it saves.
FOLD_CONV_BIASES = True


def _plain_conv(conv: nn.Module) -> bool:
    """An `nn.Conv2d` / `nn.Conv3d` run as its class writes it, with a bias: one whose bias can be taken apart."""
    return (
        type(conv) in (nn.Conv2d, nn.Conv3d)
        and conv.bias is not None
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and "forward" not in vars(conv)
        and not hasattr(conv, "_hf_hook")
    )


def _conv_deferring_bias(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(conv(x) without its bias, the bias)` for the fused norm that follows to add; `(conv(x), None)` where not.

    cuDNN adds a convolution's bias in a pass of its own over the output; the norm reads that output anyway.
    """
    if type(conv) is FrameConv and conv.bias is not None and "forward" not in vars(conv) and not conv.runs_triton(x):
        return conv.cudnn(x, None), conv.bias  # the Triton kernel adds its bias in the kernel already
    if _plain_conv(conv):
        convolve = torch.nn.functional.conv2d if type(conv) is nn.Conv2d else torch.nn.functional.conv3d
        return convolve(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups), conv.bias
    return conv(x), None


def _frozen_conv_deferring_bias(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_conv_deferring_bias` for training: a convolution `frozen_convs_keep_no_input` runs, its frozen bias apart.

    Elsewhere (a convolution that trains, runs another forward, or has no bias) `(conv(x), None)`.
    """
    forward = vars(conv).get("forward")
    if (isinstance(forward, functools.partial) and forward.func is _frozen_conv_forward and conv.bias is not None
            and not conv.bias.requires_grad):  # fmt: skip
        y = conv_keeping_no_input(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return y, conv.bias
    return conv(x), None


#: Whether training on the fused norms moves the ResNets' frozen convolution biases (and a "default" time
#: embedding) out of passes of their own, as sampling does (`FOLD_CONV_BIASES`): `conv1`'s bias and the time
#: embedding into the second norm's kernels (both ways), `conv2`'s and the shortcut's into one residual-addition
#: kernel (`fused_norm.residual_sum`), whose backward pass hands the gradient on as it is at scale factor 1.
FOLD_CONV_BIASES_TRAINING = True


def _resampled(module: nn.Module, sampling: bool, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A ResNet's upsampler or downsampler on each tensor (on `motion_adapters.resample`'s kernels, sampling).

    Sampling on the fused kernels, the channels-last Triton kernels run where they apply, at any batch: diffusers'
    contiguous copy for batches of 64 and more is a workaround for PyTorch's channels-last kernel. With
    `UPSAMPLE_IN_INPUT_DTYPE`, a nearest upsampler runs in its input's dtype under autocast: CUDA's autocast runs
    `upsample_nearest2d` in float32, which makes the block's output, the next skip concatenation and ResNet float32
    (copies and twice the bytes, forward and back) for the same upsampled values.
    """
    if sampling:
        return tuple(resample(module, x) for x in tensors)
    if UPSAMPLE_IN_INPUT_DTYPE and plain_upsampler(module):  # nearest copies: float32 would only spread float32
        with torch.autocast(tensors[0].device.type, enabled=False):
            return tuple(module(x) for x in tensors)
    return tuple(module(x) for x in tensors)


#: Whether the recomputed ResNets' nearest upsampling runs in its input's dtype under autocast (see `_resampled`):
#: with TOKEN_ROWS, training steps 1.005 times faster on an H200 and 1.01 times without
#: (benchmarks/results/training_token_rows_h200.json; `full_fp32_upsampling` switches it off there).
UPSAMPLE_IN_INPUT_DTYPE = True


def _resnet_keeping_inputs(block: nn.Module, float32_norms: bool, fused: bool, input_tensor, temb, *args, **kwargs):
    """The forward of diffusers' `ResnetBlock2D` with its two norm -> activation pairs through `_GroupNormAct`.

    On the fused kernels, sampling (and training, with `FOLD_CONV_BIASES_TRAINING`, for the convolutions
    `frozen_convs_keep_no_input` runs), the convolutions' biases go into the passes that follow instead of passes
    of their own: `conv1`'s (with a "default" time embedding) into the second norm; `conv2`'s and the shortcut
    convolution's into the residual addition, which applies the output scale factor in the same pass
    (`fused_norm.residual_sum`).
    """
    activation = _activation_of(block.nonlinearity)
    if (args or kwargs) or (temb is not None and temb.requires_grad) or (not torch.is_grad_enabled() and not fused):
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    sampling = fused and not torch.is_grad_enabled()  # sampling on the fused kernels
    fold = FOLD_CONV_BIASES and sampling and fused_norm_available(input_tensor)
    train_fold = FOLD_CONV_BIASES_TRAINING and fused and not sampling and fused_norm_available(input_tensor)
    if SKIP_GRADS_IN_NORMS and fused and not sampling:  # the residual's gradient added in norm1's kernel
        hidden_states, input_tensor = group_norm_act_keeping_input(block.norm1, input_tensor, activation,
                                                                   float32_norms, fused=fused, skip=True)
    else:
        hidden_states = group_norm_act_keeping_input(block.norm1, input_tensor, activation, float32_norms,
                                                     fused=fused)  # fmt: skip
    if block.upsample is not None:
        if hidden_states.shape[0] >= 64 and not sampling:
            input_tensor, hidden_states = input_tensor.contiguous(), hidden_states.contiguous()
        input_tensor, hidden_states = _resampled(block.upsample, sampling, input_tensor, hidden_states)
    elif block.downsample is not None:
        input_tensor, hidden_states = _resampled(block.downsample, sampling, input_tensor, hidden_states)
    if fold or train_fold:
        defer = _conv_deferring_bias if fold else _frozen_conv_deferring_bias
        hidden_states, pending = defer(block.conv1, hidden_states)
    else:
        hidden_states, pending = block.conv1(hidden_states), None
    if block.time_emb_proj is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        temb = block.time_emb_proj(temb)[:, :, None, None]
    if block.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {block.time_embedding_norm}")
        scale, shift = torch.chunk(temb, 2, dim=1)
        hidden_states = group_norm_act_keeping_input(block.norm2, hidden_states, activation, float32_norms,
                                                     scale, shift, fused, input_bias=pending)  # fmt: skip
    else:
        if block.time_embedding_norm == "default" and temb is not None:
            if fold or train_fold:
                pending = temb if pending is None else temb + pending[:, None, None]
            else:
                hidden_states = hidden_states + temb
        hidden_states = group_norm_act_keeping_input(block.norm2, hidden_states, activation, float32_norms,
                                                     fused=fused, input_bias=pending)  # fmt: skip
    hidden_states = block.dropout(hidden_states)
    shortcut = block.conv_shortcut
    if train_fold:
        hidden_states, bias = _frozen_conv_deferring_bias(block.conv2, hidden_states)
        if shortcut is not None:
            if channels_last_rows(input_tensor) is None:  # diffusers' contiguous(), layout kept
                input_tensor = input_tensor.contiguous()
            input_tensor, shortcut_bias = _frozen_conv_deferring_bias(shortcut, input_tensor)
            if shortcut_bias is not None:
                bias = shortcut_bias if bias is None else shortcut_bias + bias
        return residual_sum(input_tensor, hidden_states, bias, 1.0 / block.output_scale_factor)
    if fold and _plain_conv(block.conv2) and (shortcut is None or _plain_conv(shortcut)):
        hidden_states, bias = _conv_deferring_bias(block.conv2, hidden_states)
        if shortcut is not None:
            input_tensor = torch.nn.functional.conv2d(input_tensor, shortcut.weight, None, shortcut.stride,
                                                      shortcut.padding, shortcut.dilation, shortcut.groups)
            bias = shortcut.bias + bias
        return residual_sum(input_tensor, hidden_states, bias, 1.0 / block.output_scale_factor)
    hidden_states = block.conv2(hidden_states)
    if shortcut is not None:
        if block.training and channels_last_rows(input_tensor) is None:  # diffusers' contiguous(), layout kept
            input_tensor = input_tensor.contiguous()
        input_tensor = shortcut(input_tensor)
    return (input_tensor + hidden_states) / block.output_scale_factor


def _temporal_conv_layer_sampling(layer: nn.Module, hidden_states: torch.Tensor, num_frames: int = 1):
    """Diffusers' `TemporalConvLayer` forward for sampling on the fused kernels.

    Each of the first three convolutions' biases is added by the next norm instead of a pass of its own, the
    last one's by the residual addition (`fused_norm.residual_sum`).
    """
    seqs = (layer.conv1, layer.conv2, layer.conv3, layer.conv4)
    if any(m.training and m.p > 0 for seq in seqs for m in list(seq)[2:-1]):  # dropout on: as written
        return type(layer).forward(layer, hidden_states, num_frames)
    x = _clips(hidden_states, num_frames)
    identity, pending = x, None
    for seq in seqs:
        x = group_norm_act_keeping_input(seq[0], x, _activation_of(seq[1]), False, fused=True, input_bias=pending)
        x, pending = _conv_deferring_bias(seq[-1], x)
    return _frames(residual_sum(identity, x, pending))


def _temporal_conv_layer_qualifies(layer: nn.Module) -> bool:
    """A diffusers `TemporalConvLayer` of four norm -> activation -> [dropout] -> convolution sequences."""
    from diffusers.models.resnet import TemporalConvLayer

    if type(layer) is not TemporalConvLayer or type(layer).forward is not TemporalConvLayer.forward:
        return False
    seqs = [getattr(layer, f"conv{i}", None) for i in range(1, 5)]
    return all(
        isinstance(seq, nn.Sequential) and len(seq) >= 3 and type(seq[0]) is nn.GroupNorm
        and _activation_of(seq[1]) is not None and all(type(m) is nn.Dropout for m in list(seq)[2:-1])
        and not any(hasattr(m, "_hf_hook") or "forward" in vars(m) for m in seq)
        for seq in seqs
    )  # fmt: skip


def _temporal_conv_layer_sequences_chosen(layer: nn.Module, chosen: dict) -> bool:
    """A diffusers `TemporalConvLayer` run as written, all four of whose sequences are in `chosen`.

    (Their convolutions may run other forwards already: `frozen_convs_keep_no_input`'s.)
    """
    from diffusers.models.resnet import TemporalConvLayer

    return (type(layer) is TemporalConvLayer and type(layer).forward is TemporalConvLayer.forward
            and "forward" not in vars(layer) and not hasattr(layer, "_hf_hook")
            and all(getattr(layer, f"conv{i}", None) in chosen for i in range(1, 5)))  # fmt: skip


def _resnet_qualifies(block: nn.Module, frozen: bool = True) -> bool:
    """A diffusers `ResnetBlock2D` with (if `frozen`, frozen) group norms, an exact SiLU/GELU, known time norms."""
    from diffusers.models.resnet import ResnetBlock2D

    return (
        type(block) is ResnetBlock2D
        and type(block).forward is ResnetBlock2D.forward
        and type(block.norm1) is nn.GroupNorm
        and type(block.norm2) is nn.GroupNorm
        and _activation_of(block.nonlinearity) is not None
        and block.time_embedding_norm in ("default", "scale_shift")
        and not (frozen and any(p.requires_grad for p in (*block.norm1.parameters(), *block.norm2.parameters())))
        and not any(hasattr(m, "_hf_hook") for m in block.modules())
    )


def _norm_act_pairs(unet: nn.Module, frozen: bool) -> Iterator[tuple[str, nn.Module]]:
    """("sequential" | "resnet", module) for each norm -> activation pair holder the swaps below change."""
    for m in unet.modules():
        if isinstance(m, nn.Sequential) and len(m) >= 2 and type(m[0]) is nn.GroupNorm and _activation_of(m[1]):
            if not (frozen and any(p.requires_grad for p in m[0].parameters())) and not hasattr(m[0], "_hf_hook"):
                yield "sequential", m
        elif _resnet_qualifies(m, frozen):
            yield "resnet", m


def _unless_grad(module: nn.Module, fused_forward: Callable, *args, **kwargs):
    """`fused_forward` when gradients are off, else the module's own forward."""
    if torch.is_grad_enabled():
        return type(module).forward(module, *args, **kwargs)
    return fused_forward(*args, **kwargs)


@contextmanager
def fused_norm_activations(unet: nn.Module, enabled: bool = True) -> Iterator[int]:
    """For sampling: run `unet`'s group norm -> activation pairs on the fused Triton kernels, then restore them.

    The pairs of `frozen_activations_recomputed` (the four of each temporal convolution layer, the two of each
    diffusers `ResnetBlock2D`, the second with the time embedding's scale and shift) run as one normalise-and-
    activate kernel after two small statistics kernels (`motion_adapters.fused_norm`) while gradients are off and
    Triton can run on the input's device; with gradients on, or elsewhere, the modules run as written. The
    outputs differ from PyTorch's by bf16 rounding (one rounding instead of one per operation). The biases of the
    convolutions before a fused norm are added inside the norm's kernels instead of in passes of their own, and
    those before a residual addition inside it (`fused_norm.residual_sum`, with the ResNets' output scale factor;
    each temporal convolution layer's forward is replaced too, to arrange that). The ResNets' 2x upsampling and
    pooling run on the channels-last kernels of `motion_adapters.resample`. Yields the number of modules changed.

    Example:
        >>> with torch.no_grad(), fused_norm_activations(unet) as count:  # doctest: +SKIP
        ...     sample = unet(x, t, text).sample
    """
    chosen: dict[nn.Module, Callable] = {}
    if enabled:
        for kind, m in _norm_act_pairs(unet, frozen=False):
            fused = functools.partial(_norm_act_sequential if kind == "sequential" else _resnet_keeping_inputs, m,
                                      False, True)  # fmt: skip
            chosen[m] = functools.partial(_unless_grad, m, fused)
        for m in unet.modules() if FOLD_CONV_BIASES else ():
            if _temporal_conv_layer_qualifies(m):
                chosen[m] = functools.partial(_unless_grad, m, functools.partial(_temporal_conv_layer_sampling, m))
    with _forwards_replaced(list(chosen), chosen.__getitem__) as count:
        yield count


class _GEGLUFeedForward(torch.autograd.Function):
    """A frozen GEGLU feed-forward, `w2(h * gelu(g))` with `(h, g) = w1(x)`, keeping at most the projection.

    Autograd keeps the projection's output (both halves), the GELU's output and their product, sixteen values for
    each channel of the input. This keeps the projection (eight) when it takes at most
    `GEGLU_KEEP_PROJECTION_BYTES`, and otherwise the input alone, recomputing the projection in the backward pass
    (one more matrix product of the two): every level of a UNet costs about the same FLOPs, but the largest level
    most of the memory.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        projection = torch.nn.functional.linear(x, w1, b1)
        ctx.kernels = GEGLU_KERNELS and projection.is_contiguous() and fused_norm_available(projection)
        if ctx.kernels:  # one pass over the projection (PyTorch's operators make two, and round twice)
            act = geglu(projection)
        else:
            hidden, gate = projection.chunk(2, dim=-1)
            act = hidden * torch.nn.functional.gelu(gate)
        ctx.kept_projection = projection.numel() * projection.element_size() <= GEGLU_KEEP_PROJECTION_BYTES
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(projection if ctx.kept_projection else x, w1, b1, w2)
        return torch.nn.functional.linear(act, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        kept, w1, b1, w2 = ctx.saved_tensors
        projection = kept if ctx.kept_projection else torch.nn.functional.linear(kept, w1, b1)
        grad_act = grad.to(w2.dtype).matmul(w2)
        if ctx.kernels:  # both halves of the projection's gradient in one pass, no concatenation
            grad_projection = geglu_backward(grad_act, projection)
        else:
            hidden, gate = projection.chunk(2, dim=-1)
            grad_hidden = grad_act * torch.nn.functional.gelu(gate)
            grad_gate = torch.ops.aten.gelu_backward(grad_act * hidden, gate)
            grad_projection = torch.cat([grad_hidden, grad_gate], dim=-1)
        return grad_projection.matmul(w1).to(ctx.x_dtype), None, None, None, None


#: Whether `_GEGLUFeedForward` runs the GELU-gated product and its gradient as Triton kernels
#: (`fused_norm.geglu`, `fused_norm.geglu_backward`) where they run; `bench_training.py`'s `full_unfused_geglu`
#: switches it off.
GEGLU_KERNELS = True

#: The largest GEGLU projection (bytes) that `_GEGLUFeedForward` keeps for the backward pass instead of recomputing
#: it: 64 MiB keeps all 22 of show-1-base's in training at 40 x 64 (the largest 50 MiB, at 20 x 32; 0.52 GiB in
#: all) and recomputes them at larger sizes; 0 recomputes every one (`bench_training.py`'s
#: `full_recomputed_geglu`).
GEGLU_KEEP_PROJECTION_BYTES = 64 * 2**20


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
def frozen_activations_recomputed(
    unet: nn.Module, enabled: bool, float32_norms: bool = True, fused_norms: bool = False
) -> Iterator[int]:
    """Make frozen norm -> activation pairs and GEGLU feed-forwards keep less for the backward pass, then restore.

    Changed, by replacing `forward` on the instance:

    - every `nn.Sequential` that starts with a frozen `GroupNorm` and an exact `nn.SiLU` or `nn.GELU` (the four of
      each temporal convolution layer): the activation's input is recomputed in the backward pass instead of kept,
      and a dropout inside keeps its mask as bits;
    - every diffusers `ResnetBlock2D` with frozen group norms: the same for its two norm -> activation pairs (the
      second with the time embedding's scale and shift between them), the rest of its forward unchanged;
    - every diffusers `FeedForward` that is a frozen GEGLU -> Linear (the feed-forward of each temporal
      transformer): it keeps its projection (up to `GEGLU_KEEP_PROJECTION_BYTES`, else its input, recomputing the
      projection) instead of three activations four to eight times the input's size, and runs the GELU-gated
      product on Triton kernels where they run (`GEGLU_KERNELS`).

    Same outputs, same dropout masks, same input gradients (up to rounding where the GEGLU kernels run: they round
    once where PyTorch's operators round twice; and, with float32 norms under autocast, where a ResNet upsamples:
    `UPSAMPLE_IN_INPUT_DTYPE` keeps its nearest upsampling, and so its residual sum, in bf16 where autocast makes
    both float32); a little more compute in the backward pass.
    `float32_norms` says whether the norms run in float32 under autocast (`norm_dtype="float32"`); `fused_norms`
    runs the norm -> activation pairs as Triton kernels (`motion_adapters.fused_norm`) where they can run. Yields
    the number of modules changed.

    Example:
        >>> with frozen_activations_recomputed(unet, True) as count:  # doctest: +SKIP
        ...     loss = step(unet)
    """
    chosen: dict[nn.Module, Callable] = {}
    if enabled:
        for kind, m in _norm_act_pairs(unet, frozen=True):
            forward = _norm_act_sequential if kind == "sequential" else _resnet_keeping_inputs
            chosen[m] = functools.partial(forward, m, float32_norms, fused_norms)
        for m in unet.modules():
            if type(m).__name__ == "FeedForward" and (parts := _frozen_geglu_parts(m)) is not None:
                chosen[m] = functools.partial(_geglu_feed_forward, m, parts)
            elif SKIP_GRADS_IN_NORMS and fused_norms and _temporal_conv_layer_sequences_chosen(m, chosen):
                chosen[m] = functools.partial(_temporal_conv_layer_training, m, float32_norms, fused_norms)
    with _forwards_replaced(list(chosen), chosen.__getitem__) as count:
        yield count


__all__ = [
    "conv_keeping_no_input",
    "frozen_activations_recomputed",
    "frozen_add_layer_norm",
    "frozen_convs_keep_no_input",
    "fused_norm_activations",
    "group_norm_act_keeping_input",
    "norms_in_compute_dtype",
]
