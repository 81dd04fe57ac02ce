"""Frozen 3 x 3 convolutions as one Triton implicit-GEMM kernel each way, for training's upper levels (an option).

A 3 x 3 convolution (stride 1, padding 1) of channels-last activations is a GEMM of (pixels, 9 * in) by
(9 * in, out) whose first matrix is never formed: a program takes a (BLOCK_M pixels, BLOCK_N output channels)
tile and, for each tap and block of BLOCK_K input channels, loads the block's pixels shifted by the tap (the rows
one tap away in the channels-last memory; zero past the image's edges) and the tap's (BLOCK_K, BLOCK_N) block of
the channels-last weight, which stores each output channel's (3, 3, in) values contiguously. The input gradient of
a frozen convolution is the same kernel on the output's gradient with the taps flipped and the weight read as its
(out, in) transpose. Accumulates in float32, rounds once. `IMPLICIT_CONVS` is off: cuDNN's heuristic picks ran
show-1-base's 3 x 3 convolutions at about 330 TFLOP/s (docs/performance.md, "Against the targets"), but this kernel
has not been timed on a GPU yet (bench_training's `full_implicit_convs`, bench_conv_shapes' `implicit` column).
`TRITON_INTERPRET=1` runs it on CPU tensors (the tests do; float32 tiles there, Triton's interpreter multiplying
bf16 tiles wrongly).
"""

from __future__ import annotations

import torch

from motion_adapters.fused_norm import (
    _on_device,
    channels_last_rows,
    fused_norm_available,  # noqa: F401 - the example below and the tests use it from here
    interpreting,
    pdl_launch,
    triton,
)
from motion_adapters.im2col_conv import channels_last_3x3

if triton is not None:
    import triton.language as tl

    from motion_adapters.fused_norm import _await_previous_kernel

#: Whether `lean_backward.conv_keeping_no_input` runs frozen 3 x 3 convolutions of at least `MIN_ROWS` output pixels
#: here instead of on cuDNN. Off until timed on a GPU.
IMPLICIT_CONVS = False
MIN_ROWS = 4096
#: The tile: output pixels, output channels and reduced channels a step (which must divide the channels reduced:
#: every Show-1 width, 320 and its multiples, and their concatenations). Output widths that 128 does not divide take
#: tiles of 64 channels.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
GROUP_M = 8
NUM_WARPS, NUM_STAGES = 8, 3


def implicit_conv_applies(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether `ImplicitConv` runs this convolution: 3 x 3, stride 1, padding 1, channels-last, widths of 64s.

    Example:
        >>> x = torch.zeros(8, 64, 40, 64).to(memory_format=torch.channels_last)
        >>> w = torch.zeros(64, 64, 3, 3).to(memory_format=torch.channels_last)
        >>> implicit_conv_applies(x, w, [1, 1], [1, 1], [1, 1], 1) == (IMPLICIT_CONVS and fused_norm_available(x))
        True
    """
    return IMPLICIT_CONVS and x.ndim == 4 and x.shape[1] % BLOCK_K == 0 and weight.shape[0] % BLOCK_K == 0 and \
        x.shape[0] * x.shape[2] * x.shape[3] >= MIN_ROWS and \
        channels_last_3x3(x, weight, stride, padding, dilation, groups)  # fmt: skip


if triton is not None:

    @triton.jit
    def _conv3x3(x_ptr, w_ptr, b_ptr, out_ptr, H, W, ROWS, C_RED, N_OUT, S_RED, S_N, TAP_STRIDE,
                 FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HALF_DOTS: tl.constexpr, WIDE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 PDL: tl.constexpr = False):  # fmt: skip
        """out[p, n] = sum over taps t and channels c of x[p shifted by t, c] * w(t, c, n) (+ bias[n]).

        x: (ROWS, C_RED) channels-last pixels of H x W images; the weight of tap t (flipped, 8 - t, with FLIP) and
        reduced channel c for output channel n at `w_ptr + tap * TAP_STRIDE + c * S_RED + n * S_N`. Programs in
        groups of GROUP_M pixel tiles a column of output-channel tiles (the weight's blocks shared in L2). WIDE:
        64-bit offsets (some offset into x, the weight or out does not fit 32 bits); else 32-bit ones, which take
        fewer registers (ptxas, sm_90a: 128 against 190 for the default tile; ptxas_registers_sm90.json).
        """
        if PDL:
            _await_previous_kernel()
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(ROWS, BLOCK_M)
        tiles_n = tl.cdiv(N_OUT, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
        pid_n = (pid % (GROUP_M * tiles_n)) // size_m
        p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        if WIDE:  # every offset below then in 64 bits
            p, n, k = p.to(tl.int64), n.to(tl.int64), k.to(tl.int64)
        w_ = p % W
        h_ = (p // W) % H
        img = p // (W * H)
        n_mask = n < N_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, 9 * C_RED, BLOCK_K):
            tap = step // C_RED
            c0 = step - tap * C_RED
            hs = h_ + tap // 3 - 1
            ws = w_ + tap % 3 - 1
            inside = (p < ROWS) & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            src = ((img * H + hs) * W + ws) * C_RED + c0
            a = tl.load(x_ptr + src[:, None] + k[None, :], mask=inside[:, None], other=0.0)
            w_tap = 8 - tap if FLIP else tap
            at = w_tap * TAP_STRIDE + (c0 + k)[:, None] * S_RED + n[None, :] * S_N
            b = tl.load(w_ptr + at, mask=n_mask[None, :], other=0.0)
            if not HALF_DOTS:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        dst = p[:, None] * N_OUT + n[None, :]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=(p < ROWS)[:, None] & n_mask[None, :])


def _wide(rows: torch.Tensor, weight: torch.Tensor, n_out: int) -> bool:
    """Whether offsets into the (pixels, channels) `rows`, the weight or the (pixels, n_out) output need 64 bits.

    With a margin of 2**24 elements for the masked rows past the end of the last pixel tile.
    """
    return max(rows.numel(), weight.numel(), rows.shape[0] * n_out) >= 2**31 - 2**24


def _launch(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int, int],
            flip: bool, out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The kernel over channels-last `rows` (N * H * W, C_RED) of images of `shape` (N, H, W): (rows, N_OUT)."""
    n_img, h, w = shape
    out_ch, in_ch = weight.shape[:2]
    c_red, n_out = (out_ch, in_ch) if flip else (in_ch, out_ch)
    # channels-last weight: output channel o, tap t, input channel i at o * 9 * in + t * in + i
    s_red, s_n = (9 * in_ch, 1) if flip else (1, 9 * in_ch)
    out = torch.empty(rows.shape[0], n_out, dtype=out_dtype, device=rows.device)
    block_n = BLOCK_N if n_out % BLOCK_N == 0 else 64
    grid = (triton.cdiv(rows.shape[0], BLOCK_M) * triton.cdiv(n_out, block_n),)
    with _on_device(rows):
        _conv3x3[grid](rows, weight, bias if bias is not None else weight, out, h, w, rows.shape[0], c_red, n_out,
                       s_red, s_n, in_ch, FLIP=flip, HAS_BIAS=bias is not None,
                       HALF_DOTS=rows.dtype != torch.float32 and not interpreting(),
                       WIDE=_wide(rows, weight, n_out), BLOCK_M=BLOCK_M,
                       BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, num_warps=NUM_WARPS,
                       num_stages=NUM_STAGES, **pdl_launch(rows))  # fmt: skip
    return out


def implicit_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`conv2d(x, weight, bias, padding=1)` of channels-last `x` (N, C, H, W) by a channels-last 3 x 3 `weight`.

    Returns a channels-last tensor of x's dtype. No autograd (`ImplicitConv` adds the input gradient).

    Example:
        >>> x = torch.randn(2, 64, 16, 16).to(memory_format=torch.channels_last)  # doctest: +SKIP
        >>> w = torch.randn(64, 64, 3, 3).to(memory_format=torch.channels_last)  # doctest: +SKIP
        >>> implicit_conv3x3(x, w).shape  # doctest: +SKIP
        torch.Size([2, 64, 16, 16])
    """
    n, _, h, w = x.shape
    y = _launch(channels_last_rows(x).reshape(-1, x.shape[1]), weight, bias, (n, h, w), False, x.dtype)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def implicit_conv3x3_input_grad(grad: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The input gradient of `implicit_conv3x3` for the output's gradient `grad` (N, out, H, W): channels-last."""
    n, out_ch, h, w = grad.shape
    rows = grad.to(weight.dtype).permute(0, 2, 3, 1).reshape(-1, out_ch)  # a view when channels-last
    dx = _launch(rows.contiguous(), weight, None, (n, h, w), True, dtype)
    return dx.view(n, h, w, -1).permute(0, 3, 1, 2)


class ImplicitConv(torch.autograd.Function):
    """A frozen 3 x 3 convolution (stride 1, padding 1) on the implicit-GEMM kernel each way, keeping the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        """`implicit_conv3x3(x, weight, bias)`, keeping the weight alone for the backward pass."""
        ctx.save_for_backward(weight)
        ctx.dtype = x.dtype
        return implicit_conv3x3(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        """The input's gradient alone (the weight is frozen), channels-last, in the input's dtype."""
        (weight,) = ctx.saved_tensors
        return implicit_conv3x3_input_grad(grad, weight, ctx.dtype), None, None
