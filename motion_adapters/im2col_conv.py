"""Frozen 3 x 3 convolutions of few pixels as one gather and one GEMM each way, for training's deepest levels.

At show-1-base's 5 x 8 level a 3 x 3 convolution has 320 output rows (8 frames of 40 pixels) and 1,280 channels:
cuDNN's heuristic picks ran it at about half the speed of one matrix product of the same size (53 against 27 us
forward, 50 against 20 for the input gradient on an H200, `benchmarks/results/conv_shapes_h200.json`): so few rows
leave most of the GPU idle in its tiles. Here the forward pass gathers each row's 3 x 3 neighbourhood from the
channels-last activation into one (rows, 9 * channels) matrix (Triton, one pass) and multiplies it by the weight,
which a channels-last weight already stores as an (out, 9 * in) matrix; the input gradient is the gradient rows
times that matrix (float32 for half inputs on CUDA), folded back by summing each pixel's nine contributions (one
pass). Only the weight is kept for the backward pass, as `lean_backward`'s other frozen convolutions do.

The temporal (k, 1, 1) convolutions of few rows take the other order (`fold_frame_taps`): one GEMM of the rows by
all k taps' weights at once, (rows, k * out) in float32, then one pass that adds each output row's k products from
the rows k frames apart (and the bias), so that the taps' products run as one wide GEMM instead of k narrow ones in
turn (`lean_backward._FrameTapsConv`, `lean_backward.FRAME_TAPS_FOLDED_MAX_ROWS`).
"""

from __future__ import annotations

import torch

from motion_adapters.fused_norm import _on_device, channels_last_rows, fused_norm_available, pdl_launch, triton

if triton is not None:
    import triton.language as tl

    from motion_adapters.fused_norm import _await_previous_kernel

#: Whether `lean_backward.conv_keeping_no_input` runs frozen 3 x 3 convolutions of at most `MAX_ROWS` output pixels
#: (batch times height times width) here instead of on cuDNN.
IM2COL_CONVS = True
MAX_ROWS = 512
BLOCK_R, BLOCK_C = 32, 64


def im2col_conv_applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether `Im2colConv` runs this convolution: a 3 x 3 kernel, stride 1, padding 1, few channels-last rows.

    Example:
        >>> x = torch.zeros(8, 16, 5, 8).to(memory_format=torch.channels_last)
        >>> w = torch.zeros(16, 16, 3, 3).to(memory_format=torch.channels_last)
        >>> im2col_conv_applies(x, w, [1, 1], [1, 1], [1, 1], 1) == fused_norm_available(x)
        True
    """
    return IM2COL_CONVS and x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] <= MAX_ROWS and \
        channels_last_3x3(x, weight, stride, padding, dilation, groups)  # fmt: skip


def channels_last_3x3(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether this is a 3 x 3 convolution (stride 1, padding 1) the Triton kernels take.

    That is: no dilation or groups, channels-last 4-d `x`, a channels-last weight of x's dtype (its (out, 9 * in)
    matrix a view), and a device the Triton kernels run on.
    """
    return (
        x.ndim == 4
        and tuple(weight.shape[2:]) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
        and x.dtype == weight.dtype
        and channels_last_rows(x) is not None
        and weight.permute(0, 2, 3, 1).is_contiguous()
        and fused_norm_available(x)
    )


if triton is not None:

    @triton.jit
    def _gather(x_ptr, a_ptr, H, W, C, ROWS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """a[r, t * C + c] = x[n, h + i - 1, w + j - 1, c] (0 outside), t = 3 i + j; grid (rows, 9, channels)."""
        if PDL:
            _await_previous_kernel()
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        t = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        w = r % W
        h = (r // W) % H
        n = r // (W * H)
        hs = h + t // 3 - 1
        ws = w + t % 3 - 1
        inside = (r < ROWS) & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        src = ((n * H + hs) * W + ws).to(tl.int64) * C
        values = tl.load(x_ptr + src[:, None] + c[None, :], mask=inside[:, None] & (c < C)[None, :], other=0.0)
        dst = r.to(tl.int64) * (9 * C) + t * C
        tl.store(a_ptr + dst[:, None] + c[None, :], values, mask=(r < ROWS)[:, None] & (c < C)[None, :])

    @triton.jit
    def _fold(d_ptr, out_ptr, H, W, C, ROWS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, F64: tl.constexpr,
              PDL: tl.constexpr = False):
        """out[n, h, w, c] = sum over t of d[(n, h - i + 1, w - j + 1), t * C + c]; grid (rows, channels).

        Summed in float32 (float64 with F64).
        """
        if PDL:
            _await_previous_kernel()
        acc_dtype = tl.float64 if F64 else tl.float32
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        w = r % W
        h = (r // W) % H
        n = r // (W * H)
        acc = tl.zeros([BLOCK_R, BLOCK_C], acc_dtype)
        for t in tl.static_range(9):
            hs = h - t // 3 + 1
            ws = w - t % 3 + 1
            inside = (r < ROWS) & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            src = ((n * H + hs) * W + ws).to(tl.int64) * (9 * C) + t * C
            acc += tl.load(d_ptr + src[:, None] + c[None, :], mask=inside[:, None] & (c < C)[None, :],
                           other=0.0).to(acc_dtype)  # fmt: skip
        dst = r.to(tl.int64) * C
        tl.store(out_ptr + dst[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(r < ROWS)[:, None] & (c < C)[None, :])  # fmt: skip


    @triton.jit
    def _fold_taps(z_ptr, b_ptr, out_ptr, ROWS, C, PIXELS, CHANNEL_STRIDE, TAP_STRIDE, TAPS: tl.constexpr,
                   DIRECTION: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   F64: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """out[r, c] = sum over taps t of z[r + DIRECTION * (t - TAPS // 2) * PIXELS, c, t] (+ b[c]).

        Grid (rows, channels). z is (ROWS, TAPS * C), its entry (c, t) at c * CHANNEL_STRIDE + t * TAP_STRIDE;
        rows past either end (the zero padding of the frames) add nothing. Summed in float32 (float64 with F64).
        """
        if PDL:
            _await_previous_kernel()
        acc_dtype = tl.float64 if F64 else tl.float32
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_R, BLOCK_C], acc_dtype)
        for t in tl.static_range(TAPS):
            source = r + DIRECTION * (t - TAPS // 2) * PIXELS
            inside = (r < ROWS) & (source >= 0) & (source < ROWS)
            at = source.to(tl.int64) * (TAPS * C) + t * TAP_STRIDE
            acc += tl.load(z_ptr + at[:, None] + (c * CHANNEL_STRIDE)[None, :],
                           mask=inside[:, None] & (c < C)[None, :], other=0.0).to(acc_dtype)  # fmt: skip
        if HAS_B:
            acc += tl.load(b_ptr + c, mask=c < C, other=0.0).to(acc_dtype)[None, :]
        dst = r.to(tl.int64) * C
        tl.store(out_ptr + dst[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(r < ROWS)[:, None] & (c < C)[None, :])  # fmt: skip


def fold_frame_taps(z: torch.Tensor, pixels: int, taps: int, channel_major: bool, bias: torch.Tensor | None,
                    dtype: torch.dtype, reverse: bool = False) -> torch.Tensor:  # fmt: skip
    """The (rows, C) sums of each row's `taps` products in `z`, taken from the rows `pixels` apart (one frame).

    `z` is (rows, taps * C): each tap's product of all rows with its weight, its columns channel-major (`c * taps +
    t`, `channel_major`) or tap-major (`t * C + c`). Output row r adds tap t's product of row `r + (t - taps // 2) *
    pixels` (the forward pass of a frame convolution; `reverse`: `r - (t - taps // 2) * pixels`, its input
    gradient), rows past either end adding nothing, and the bias; summed in float32 (float64 for a float64 `z`),
    returned in `dtype`.

    Example:
        >>> z = torch.arange(12.0).view(2, 6)  # 2 rows (frames of one pixel), 3 taps, 2 channels, tap-major
        >>> fold_frame_taps(z, 1, 3, False, None, torch.float32)  # doctest: +SKIP
        tensor([[12., 14.],
                [ 8., 10.]])
    """
    rows, width = z.shape
    channels = width // taps
    out = torch.empty(rows, channels, dtype=dtype, device=z.device)
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(channels, BLOCK_C))
    strides = (taps, 1) if channel_major else (1, channels)
    with _on_device(z):
        _fold_taps[grid](z, bias if bias is not None else z, out, rows, channels, pixels, *strides, TAPS=taps,
                         DIRECTION=-1 if reverse else 1, HAS_B=bias is not None, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
                         F64=z.dtype == torch.float64, **pdl_launch(z))  # fmt: skip
    return out


def gather_neighbourhoods(x: torch.Tensor) -> torch.Tensor:
    """The (N * H * W, 9 * C) matrix of each pixel's zero-padded 3 x 3 neighbourhood of channels-last `x` (N, C, H, W).

    Column `(3 * i + j) * C + c` of row `(n, h, w)` holds `x[n, c, h + i - 1, w + j - 1]`.
    """
    n, c, h, w = x.shape
    out = torch.empty(n * h * w, 9 * c, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n * h * w, BLOCK_R), 9, triton.cdiv(c, BLOCK_C))
    with _on_device(x):
        _gather[grid](x, out, h, w, c, n * h * w, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, **pdl_launch(x))
    return out


def fold_neighbourhoods(d: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The adjoint of `gather_neighbourhoods`: each pixel's sum of the nine entries it was gathered into.

    `d` is (N * H * W, 9 * C); returns a channels-last (N, C, H, W) tensor of `dtype`, summed in float32 (float64
    for a float64 `d`).
    """
    n, c, h, w = shape
    out = torch.empty(n, h, w, c, dtype=dtype, device=d.device)
    grid = (triton.cdiv(n * h * w, BLOCK_R), triton.cdiv(c, BLOCK_C))
    with _on_device(d):
        _fold[grid](d, out, h, w, c, n * h * w, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, F64=d.dtype == torch.float64,
                    **pdl_launch(d))
    return out.permute(0, 3, 1, 2)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in, 3, 3) weight as its (out, 9 * in) matrix, column (3 * i + j) * in + c: a view if channels-last."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

class Im2colConv(torch.autograd.Function):
    """A frozen 3 x 3 convolution (stride 1, padding 1) as a gather and a GEMM, keeping the weight only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        """`conv2d(x, weight, bias, padding=1)` of channels-last `x`, channels-last."""
        matrix = _weight_matrix(weight)
        columns = gather_neighbourhoods(x)
        y = torch.mm(columns, matrix.t()) if bias is None else torch.addmm(bias, columns, matrix.t())
        ctx.save_for_backward(weight)
        ctx.shape = x.shape
        n, _, h, w = x.shape
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        """The input's gradient alone, channels-last."""
        (weight,) = ctx.saved_tensors
        matrix = _weight_matrix(weight)
        rows = grad.to(weight.dtype).permute(0, 2, 3, 1).reshape(-1, grad.shape[1])  # a view when channels-last
        # the nine taps summed in float32 and rounded once, as cuDNN's input gradient is
        return fold_neighbourhoods(wide_product(rows, matrix), ctx.shape, weight.dtype), None, None


def wide_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b`, in float32 for half inputs (on CUDA from the GEMM's float32 accumulator), else in their dtype.

    Example:
        >>> wide_product(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3, 2, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    if a.dtype not in (torch.float16, torch.bfloat16):
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # the same float32 sums of exact products
