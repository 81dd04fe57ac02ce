"""Show-1's (3, 1, 1) temporal convolutions as one Triton kernel a pass, forward and input gradient.

Every temporal convolution layer of Show-1 runs four `Conv3d`s with a (3, 1, 1) kernel over (N, C, F, H, W)
activations: at each pixel, a matrix product over channels of three neighbouring frames. cuDNN runs them after
converting the activation (and the weight) to channels-last and adds the bias in a separate pass afterwards;
converting and adding took about a quarter of an SR1 call's convolution time on an H200
(`benchmarks/results/stage_profile_sr1_h200.json`).

Here a program computes a (output channels, pixels) tile as three matrix products, one per tap, reading the
input where it lies (each channel's pixels of a frame are contiguous; a tile's pixels may span frames and clips,
so the deepest levels' few pixels a frame still fill it), and adds the bias before its one store: no layout
conversion, no bias pass. The input gradient of a frozen convolution is the same kernel with the taps reversed
and the weight transposed. Accumulation is float32. `TRITON_INTERPRET=1` runs the kernels on CPU
tensors (the tests do).

Opt-in (`temporal_kernels="triton_conv"` or `"triton"`), not a default: on an H200 the kernel is 1.7 to 3.3 times
faster than cuDNN's (3, 1) `conv2d` forward and 1.1 to 1.9 times for the input gradient, yet the show-1-base
training step ran 6.5 % slower with it and the stage calls no faster with the fused norms (docs/performance.md).
"""

from __future__ import annotations

import torch

from motion_adapters.fused_norm import _on_device, triton

if triton is not None:
    import triton.language as tl


def temporal_conv_supported(weight: torch.Tensor, frame_padding: int) -> bool:
    """Whether the kernel runs a convolution with this weight: (CO, CI, 3, 1, 1) (or (CO, CI, 3, 1)), padding 1.

    Example:
        >>> temporal_conv_supported(torch.zeros(8, 8, 3, 1, 1), 1)
        True
        >>> temporal_conv_supported(torch.zeros(8, 8, 5, 1, 1), 2)
        False
    """
    taps = weight.shape[2:]
    return weight.ndim in (4, 5) and taps[0] == 3 and all(k == 1 for k in taps[1:]) and frame_padding == 1


if triton is not None:

    @triton.jit
    def _temporal_conv(x_ptr, w_ptr, b_ptr, y_ptr, CI, CO, F, S, P, HAS_B: tl.constexpr, FLAT: tl.constexpr,
                       BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr,
                       IEEE: tl.constexpr):  # fmt: skip
        """y[n, :, f, s] = sum over taps k of w[k] @ x[n, :, f + k - 1, s] (+ b); grid: pixel tiles, channel tiles.

        x is (N, CI, F, S), w (3, CO, CI), y (N, CO, F, S), all contiguous. A program's pixels lie in one frame
        (grid axis 2: N * F), or with FLAT run over all P = N * F * S (clip, frame, pixel) triples, so that frames
        of few pixels still fill a tile (at the cost of loads the compiler cannot prove contiguous).
        """
        co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
        if FLAT:
            p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
            in_range = p < P
            s = p % S
            f = (p // S) % F
            n = (p // (S * F)).to(tl.int64)
        else:
            s = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
            in_range = s < S
            same = tl.zeros([BLOCK_P], tl.int32)  # frame and clip are the program's: vectors of one value
            f = same + tl.program_id(2) % F
            n = (same + tl.program_id(2) // F).to(tl.int64)
        x_at = x_ptr + (n * CI * F + f) * S + s  # channel 0 of the own frame
        ci = tl.arange(0, BLOCK_CI)
        acc = tl.zeros([BLOCK_CO, BLOCK_P], tl.float32)
        for k in range(3):
            frame_ok = in_range & (f + k - 1 >= 0) & (f + k - 1 < F)
            for start in range(0, CI, BLOCK_CI):
                c = start + ci
                w = tl.load(w_ptr + (k * CO + co[:, None]) * CI + c[None, :],
                            mask=(co[:, None] < CO) & (c[None, :] < CI), other=0.0)  # fmt: skip
                xs = tl.load(x_at[None, :] + (c[:, None].to(tl.int64) * F + k - 1) * S,
                             mask=(c[:, None] < CI) & frame_ok[None, :], other=0.0)  # fmt: skip
                if IEEE:
                    acc += tl.dot(w, xs, input_precision="ieee")
                else:
                    acc += tl.dot(w, xs)
        if HAS_B:
            acc += tl.load(b_ptr + co, mask=co < CO, other=0.0).to(tl.float32)[:, None]
        y_at = y_ptr + ((n * CO * F + f) * S + s)[None, :] + co[:, None].to(tl.int64) * F * S
        tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=(co[:, None] < CO) & in_range[None, :])


#: Frames of fewer pixels than this run with FLAT tiles (pixels across frames and clips).
FLAT_BELOW = 256


def default_tile(out_channels: int, pixels: int, frame_pixels: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_CO, BLOCK_P, BLOCK_CI, warps, stages) for `out_channels` x `pixels` (N * F * H * W) outputs.

    128 x 128 tiles (within 5 % of the best tile at every large shape of `benchmarks/bench_temporal_conv.py` on an
    H200) where they make a wave of programs on its 132 multiprocessors, else 64 x 64 (the deepest levels: 1280
    channels of 5 x 8 pixels). `frame_pixels` (H * W) decides the layout of a tile, not its size.

    Example:
        >>> default_tile(320, 8 * 40 * 64, 40 * 64)
        (128, 128, 32, 8, 3)
        >>> default_tile(1280, 8 * 5 * 8, 5 * 8)
        (64, 64, 32, 4, 4)
    """
    tiles = -(-out_channels // 128) * (-(-pixels // 128) if frame_pixels < FLAT_BELOW else
                                       pixels // frame_pixels * -(-frame_pixels // 128))  # fmt: skip
    return (128, 128, 32, 8, 3) if tiles >= 132 else (64, 64, 32, 4, 4)


def _launch(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, tile=None) -> torch.Tensor:
    """Run `_temporal_conv` on a contiguous (N, CI, F, ...) `x` with (3, CO, CI) `taps`.

    `tile` is (BLOCK_CO, BLOCK_P, BLOCK_CI, warps, stages), by default `default_tile`'s (benchmarks try others).
    """
    n, ci, f = x.shape[:3]
    s = x[0, 0, 0].numel()
    co = taps.shape[1]
    block_co, block_p, block_ci, warps, stages = tile or default_tile(co, n * f * s, s)
    flat = s < FLAT_BELOW
    y = x.new_empty((n, co, *x.shape[2:]))
    if flat:
        grid = (triton.cdiv(n * f * s, block_p), triton.cdiv(co, block_co), 1)
    else:
        grid = (triton.cdiv(s, block_p), triton.cdiv(co, block_co), n * f)
    with _on_device(x):
        _temporal_conv[grid](x, taps, bias if bias is not None else taps, y, ci, co, f, s, n * f * s,
                             HAS_B=bias is not None, FLAT=flat, BLOCK_CO=block_co, BLOCK_P=block_p,
                             BLOCK_CI=block_ci, IEEE=x.dtype == torch.float32, num_warps=warps,
                             num_stages=stages)  # fmt: skip
    return y


def temporal_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile=None) -> torch.Tensor:
    """`conv3d(x, weight, bias, padding=(1, 0, 0))` for a (CO, CI, 3, 1, 1) `weight`, in x's dtype.

    Example:
        >>> w = torch.randn(64, 32, 3, 1, 1, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> x = torch.randn(1, 32, 8, 40, 64, device="cuda", dtype=w.dtype)  # doctest: +SKIP
        >>> y = temporal_conv_forward(x, w, None)  # doctest: +SKIP
    """
    taps = weight.to(x.dtype).reshape(weight.shape[0], weight.shape[1], 3).permute(2, 0, 1).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return _launch(x.contiguous(), taps, bias, tile)


def temporal_conv_input_grad(grad: torch.Tensor, weight: torch.Tensor, tile=None) -> torch.Tensor:
    """The gradient of `temporal_conv_forward`'s input: the taps reversed, the weight transposed.

    Example:
        >>> dx = temporal_conv_input_grad(dy, w)  # doctest: +SKIP
    """
    taps = weight.to(grad.dtype).reshape(weight.shape[0], weight.shape[1], 3).permute(2, 1, 0).flip(0).contiguous()
    return _launch(grad.contiguous(), taps, None, tile)


class _TemporalConv(torch.autograd.Function):
    """A frozen (3, 1, 1) convolution on the Triton kernel; its backward pass computes the input's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return temporal_conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return temporal_conv_input_grad(grad, weight), None, None


def temporal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`conv3d(x, weight, bias, padding=(1, 0, 0))` for a frozen (CO, CI, 3, 1, 1) `weight`, on the Triton kernel.

    `x` is (N, CI, F, H, W) on a device where `fused_norm_available(x)` holds; the caller checks that and
    `temporal_conv_supported`. Under autocast it runs in autocast's dtype, as autocast's own convolution does.
    Keeps only the weight for the backward pass, which computes the input's gradient alone (the weight gets none).

    Example:
        >>> conv = torch.nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0)).requires_grad_(False)
        >>> x = torch.randn(1, 4, 5, 2, 3, device="cuda")  # doctest: +SKIP
        >>> torch.testing.assert_close(temporal_conv(x, conv.weight, conv.bias), conv(x))  # doctest: +SKIP
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    with torch.autocast(device_type, enabled=False):
        return _TemporalConv.apply(x, weight, bias)


__all__ = [
    "default_tile", "temporal_conv", "temporal_conv_forward", "temporal_conv_input_grad", "temporal_conv_supported"
]  # fmt: skip
