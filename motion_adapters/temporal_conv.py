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

from motion_adapters.fused_norm import _on_device, pdl_launch, triton

if triton is not None:
    import triton.language as tl

    from motion_adapters.fused_norm import _await_previous_kernel


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


    @triton.jit
    def _temporal_conv_rows(x_ptr, w_ptr, b_ptr, y_ptr, M, K, N, F, P, w_st, w_sk, w_sn, HAS_B: tl.constexpr,
                            REVERSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """y[r] = sum over taps t of x[r + (t - 1) * P] @ B_t (+ b), over the rows of channels-last clips.

        x is (M, K) rows and y (M, N), both of unit channel stride; row r = (clip * F + frame) * P + pixel, so a
        tap's rows are the output's rows shifted by whole frames, and rows whose frame + t - 1 leaves the clip read
        zeros (the padding). B_t[k, n] = w[t * w_st + k * w_sk + n * w_sn], strides into the weight as it lies, or
        with REVERSE w[(2 - t) * w_st + ...] (the input gradient's taps). Grid: row tiles, channel tiles.
        """
        if PDL:
            _await_previous_kernel()
        r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        frame = (r // P) % F
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        blocks = tl.cdiv(K, BLOCK_K)
        for i in range(0, 3 * blocks):  # one loop over taps and channel blocks, so that it pipelines as a whole
            t = i // blocks
            k = (i - t * blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            rows_ok = (r < M) & (frame + t - 1 >= 0) & (frame + t - 1 < F)
            a = tl.load(x_ptr + (r + (t - 1) * P)[:, None] * K + k[None, :], mask=rows_ok[:, None] & (k[None, :] < K),
                        other=0.0)  # fmt: skip
            if REVERSE:
                tap = 2 - t
            else:
                tap = t
            b = tl.load(w_ptr + tap * w_st + k[:, None] * w_sk + n[None, :] * w_sn,
                        mask=(k[:, None] < K) & (n[None, :] < N), other=0.0)  # fmt: skip
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if HAS_B:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + r[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(r[:, None] < M) & (n[None, :] < N))  # fmt: skip


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


def channels_last_clips(x: torch.Tensor) -> bool:
    """Whether (N, C, F, H, W) `x` is stored channels-last ((N, F, H, W, C) in memory) and not also contiguous.

    Example:
        >>> channels_last_clips(torch.zeros(1, 4, 3, 2, 2).to(memory_format=torch.channels_last_3d))
        True
        >>> channels_last_clips(torch.zeros(1, 4, 3, 2, 2))
        False
    """
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def rows_tile(rows: int, out_channels: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of `_temporal_conv_rows` for `rows` x `out_channels` outputs.

    128 x 128 tiles where they make a wave of programs on an H100's or H200's 132 multiprocessors, else 64 x 64.

    Example:
        >>> rows_tile(2 * 8 * 160 * 256, 128)
        (128, 128, 64, 8, 3)
        >>> rows_tile(8 * 5 * 8, 1280)
        (64, 64, 64, 4, 3)
    """
    tiles = -(-rows // 128) * -(-out_channels // 128)
    return (128, 128, 64, 8, 3) if tiles >= 132 else (64, 64, 64, 4, 3)


def _launch_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool,
                 tile=None) -> torch.Tensor:  # fmt: skip
    """`_temporal_conv_rows` on channels-last (N, K, F, H, W) `x` with a (CO, CI, 3, 1, 1) `weight` read in place.

    Forward (`reverse` False): K = CI, out CO, B_t = w[:, :, t].T. Input gradient (`reverse`): K = CO, out CI,
    B_t = w[:, :, 2 - t]. The output is channels-last like `x`.
    """
    nb, k, f, h, w = x.shape
    rows = x.permute(0, 2, 3, 4, 1)  # (N, F, H, W, K): dense rows of unit channel stride
    weight = weight.to(x.dtype)
    s_out, s_in, s_tap = weight.stride()[:3]
    # reverse: k runs over the weight's output channels, n over its input channels (the kernel reverses the taps)
    n_out, w_sk, w_sn = (weight.shape[1], s_out, s_in) if reverse else (weight.shape[0], s_in, s_out)
    m = nb * f * h * w
    block_m, block_n, block_k, warps, stages = tile or rows_tile(m, n_out)
    y = x.new_empty((nb, f, h, w, n_out))
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n_out, block_n))
    with _on_device(x):
        _temporal_conv_rows[grid](rows, weight, bias if bias is not None else weight, y, m, k, n_out, f, h * w,
                                  s_tap, w_sk, w_sn, HAS_B=bias is not None, REVERSE=reverse, BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32, num_warps=warps,
                                  num_stages=stages, **pdl_launch(x))  # fmt: skip
    return y.permute(0, 4, 1, 2, 3)


def temporal_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile=None) -> torch.Tensor:
    """`conv3d(x, weight, bias, padding=(1, 0, 0))` for a (CO, CI, 3, 1, 1) `weight`, in x's dtype.

    Channels-last `x` (`channels_last_clips`) runs on the rows kernel (`_temporal_conv_rows`, `rows_tile`'s tiles)
    and gives a channels-last output; any other `x` on the (N, C, F, H, W) kernel (`default_tile`'s tiles).

    Example:
        >>> w = torch.randn(64, 32, 3, 1, 1, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> x = torch.randn(1, 32, 8, 40, 64, device="cuda", dtype=w.dtype)  # doctest: +SKIP
        >>> y = temporal_conv_forward(x, w, None)  # doctest: +SKIP
    """
    if channels_last_clips(x):
        return _launch_rows(x, weight, bias, False, tile)
    taps = weight.to(x.dtype).reshape(weight.shape[0], weight.shape[1], 3).permute(2, 0, 1).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return _launch(x.contiguous(), taps, bias, tile)


def temporal_conv_input_grad(grad: torch.Tensor, weight: torch.Tensor, tile=None) -> torch.Tensor:
    """The gradient of `temporal_conv_forward`'s input: the taps reversed, the weight transposed.

    Example:
        >>> dx = temporal_conv_input_grad(dy, w)  # doctest: +SKIP
    """
    if channels_last_clips(grad):
        return _launch_rows(grad, weight, None, True, tile)
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
