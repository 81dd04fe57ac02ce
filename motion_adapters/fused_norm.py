"""Fused `act(group_norm(x) * factor + shift)` in Triton, forward and backward, for frozen group norms.

PyTorch's CUDA group norm computes each group's statistics with one thread block per (sample, group): a temporal
convolution's norm over a (1, C, F, H, W) activation with 32 groups runs 32 blocks on a GPU with 132 SMs, and the
statistics pass alone was 13 ms of an H200 training step (docs/performance.md). Around it sit separate kernels for
the time embedding's scale and shift, the activation and, in the backward pass, their gradients.

Here every pass is split over (sample, channel, chunk of the frames and pixels) programs:

- forward: per-chunk moments (two passes over the chunk, shifted by its first value), combined per group with
  Chan's formula into float32
  mean and 1 / std; then one kernel that normalises, applies the norm's weight and bias, the factor and shift,
  and the activation;
- backward: per-chunk sums of `d_xhat` and `d_xhat * xhat` (recomputing the pre-activation from `x`), combined
  per group; then one kernel for the input gradient.

Channels-last inputs (`torch.channels_last`, `torch.channels_last_3d`, and their (N, C, H * W) views) run on
kernels of their own that take (values, channels) tiles and keep the layout: the output and the input gradient
have the input's strides, so a convolution that follows needs no layout conversion. Their statistics kernels sum
element-wise in registers and reduce over a tile's rows once (sums and squared sums of the values shifted by the
chunk's first value of each channel), as a reduction across rows costs a round through shared memory.

The arithmetic is float32 throughout with one rounding at the output, where PyTorch's chain rounds after the
norm, the scale, the shift and the activation. Only the input gets a gradient: the norm's weight and bias, the
factor and the shift must not require one (the callers check). `TRITON_INTERPRET=1` runs the kernels on CPU
tensors (the tests do).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR = None
except Exception as error:  # pragma: no cover - not installed, or built for another PyTorch: the kernels are optional
    triton = tl = None
    TRITON_IMPORT_ERROR = f"{type(error).__name__}: {error}"

#: The values of a (sample, channel) row that one program handles: 1024, or 128 for rows shorter than 512 (the
#: deepest levels of a UNet). On an H200 (`benchmarks/results/fused_norm_h200.json`) 1024 was as fast as or faster
#: than chunks fitted to each row's length everywhere but there; each size is one more compilation of each kernel.
BLOCK, SHORT_BLOCK, SHORT_ROW = 1024, 128, 512
#: The most per-chunk partial results a program combines at once (it loops over more).
MAX_BLOCK_K = 4096
#: Channels-last tiles: up to CL_BLOCK_C channels by CL_TILE[direction] / channels values (see `cl_tile`), and the
#: tiles one program of the statistics kernels (moments, gradient sums) takes in turn, CL_LOOP[direction]. On an H200
#: (`benchmarks/results/fused_norm_rows_h200.json`) tiles of 8192 values four at a time forward and of 4096 four at
#: a time backward were the fastest of the seven settings timed, or within 3 %, at six of the seven Show-1 shapes
#: forward and all seven backward (SR1's ResNet norm: 0.194 against 0.205 ms forward at 16384 one at a time, 0.404
#: against 0.502 ms backward at 8192).
CL_BLOCK_C = 64
CL_TILE = {"forward": 8192, "backward": 4096}
CL_LOOP = {"forward": 4, "backward": 4}
#: Channels-last norms whose groups have at most this many per-chunk results (the lower levels of a UNet: a few
#: chunks a sample) combine them in the element-wise kernel that uses the statistics, each program for its own
#: channels, instead of in a launch of their own (`_group_moments`, `_group_grad_means`); 0 never. Off: at 128 on an
#: H200 training steps were 1.034 times slower (0.04777 against 0.04620 s: every program of the element-wise kernel
#: re-reads its groups' results; benchmarks/results/training_unroll_final_h200.json, `full_unfolded_norms`).
CL_FOLD_MAX_K = 0
#: Channels-last norms whose statistics kernel would run fewer programs than this (the lower levels of a UNet at
#: batch 1: 20 programs for 1,280 channels of 8 x 5 x 8 values forward) take one tile a program instead of CL_LOOP,
#: then tiles of half as many values, down to CL_MIN_TILE, until they run this many: the element-wise kernels' grids
#: grow with them. 0 never. The statistics kernels' times there (4 to 7 us, fused_norm_rows_h200.json) are their
#: programs' loops more than their bytes. On an H200, 132 made training steps 1.007 and 1.005 times faster in two
#: runs (training_dots_default_h200.json, training_cl132_dv_first_h200.json, `full_cl_min_programs_132`); 264 did not.
CL_MIN_PROGRAMS = 132
CL_MIN_TILE = 1024
ACTIVATIONS = ("silu", "gelu", "none")


def interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Whether the kernels of this package are launched as programmatic dependent launches where they can be (Hopper
#: and later, a Triton with grid dependency control, not the interpreter): the GPU may schedule a kernel's programs
#: while the kernel before it in the stream drains, each program waiting (`gdc_wait`) for all of that kernel's
#: memory before it reads or writes any, then letting the next kernel launch (`gdc_launch_dependents`).
PDL = True


@functools.cache
def _pdl_device(index: int) -> bool:
    if triton is None:
        return False
    try:
        import triton.language.extra.cuda as cuda_extra
    except ImportError:  # pragma: no cover - a Triton without the CUDA extras
        return False
    return hasattr(cuda_extra, "gdc_wait") and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(x: torch.Tensor) -> dict:
    """The launch arguments that make a kernel of this package on `x`'s device a programmatic dependent launch.

    Empty (a plain launch; the kernels' `PDL` defaults to False) off CUDA, in the interpreter, before Hopper, or
    with `PDL` off.

    Example:
        >>> pdl_launch(torch.zeros(1))
        {}
    """
    if not (PDL and x.is_cuda and not interpreting() and _pdl_device(x.device.index or 0)):
        return {}
    return {"PDL": True, "launch_pdl": True}


def fused_norm_available(x: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels can run on `x`'s device: Triton importable, and CUDA (or the interpreter on CPU).

    Example:
        >>> fused_norm_available(torch.zeros(1, device="cuda"))  # doctest: +SKIP
        True
    """
    if triton is None:
        return False
    if x is None:
        return torch.cuda.is_available() or interpreting()
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _await_previous_kernel():
        """Wait for the kernel before this one in the stream (all its memory), then let the next one launch."""
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _act(z, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            return z * tl.sigmoid(z)
        elif ACTIVATION == 1:
            return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
        else:
            return z

    @triton.jit
    def _act_grad(z, ACTIVATION: tl.constexpr):
        if ACTIVATION == 0:
            s = tl.sigmoid(z)
            return s * (1.0 + z * (1.0 - s))
        elif ACTIVATION == 1:
            return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        else:
            return tl.full(z.shape, 1.0, tl.float32)

    @triton.jit
    def _coefficients(nc, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, mean_ptr, rstd_ptr,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_F: tl.constexpr):  # fmt: skip
        """mean, rstd, the effective weight (norm weight times factor) and offset of channel row `nc`."""
        n = nc // C
        c = nc % C
        row = n * G + c // (C // G)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        if HAS_W:
            weight = tl.load(w_ptr + c).to(tl.float32)
        else:
            weight = 1.0
        if HAS_B:
            offset = tl.load(b_ptr + c).to(tl.float32)
        else:
            offset = 0.0
        if HAS_F:
            factor = tl.load(f_ptr + n * f_sn + c * f_sc).to(tl.float32)
            weight = weight * factor
            offset = offset * factor + tl.load(s_ptr + n * s_sn + c * s_sc).to(tl.float32)
        return mean, rstd, weight, offset

    @triton.jit
    def _normalized_and_grad(x_ptr, dy_ptr, at, mask, mean, rstd, weight, offset, ACTIVATION: tl.constexpr):
        """The normalised x (xhat) and the gradient reaching it: dy * act'(xhat * weight + offset) * weight."""
        xhat = (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
        dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        return xhat, tl.where(mask, dy * _act_grad(xhat * weight + offset, ACTIVATION) * weight, 0.0)

    @triton.jit
    def _chunk_moments(x_ptr, mean_part, m2_part, xb_ptr, xb_sn, xb_sc, C, S, P, HAS_XB: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """Mean and sum of squared deviations of chunk `p` of channel row `nc` (grid: rows, chunks)."""
        if PDL:
            _await_previous_kernel()
        nc = tl.program_id(0)
        p = tl.program_id(1)
        offs = p * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        row = x_ptr + nc.to(tl.int64) * S
        pivot = tl.load(row + p * BLOCK).to(tl.float32)  # sums of x - pivot keep their digits when |mean| >> std
        x = tl.where(mask, tl.load(row + offs, mask=mask, other=0.0).to(tl.float32) - pivot, 0.0)
        count = tl.minimum(S - p * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        d = tl.where(mask, x - mean, 0.0)
        if HAS_XB:  # an input bias moves the row's mean, not its spread
            mean += tl.load(xb_ptr + (nc // C) * xb_sn + (nc % C) * xb_sc).to(tl.float32)
        tl.store(mean_part + nc * P + p, pivot + mean)
        tl.store(m2_part + nc * P + p, tl.sum(d * d, axis=0))

    @triton.jit
    def _group_moments(mean_part, m2_part, mean_ptr, rstd_ptr, S, P, K, eps, BLOCK: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """Combine the K = channels-per-group * P chunk moments of group row `r` (Chan et al.) into mean, 1/std."""
        if PDL:
            _await_previous_kernel()
        r = tl.program_id(0)
        base = r.to(tl.int64) * K
        total = tl.zeros([BLOCK_K], tl.float32)
        counts = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            mask = k < K
            count = tl.where(mask, tl.minimum(S - (k % P) * BLOCK, BLOCK).to(tl.float32), 0.0)
            total += count * tl.load(mean_part + base + k, mask=mask, other=0.0)
            counts += count
        n = tl.sum(counts, axis=0)
        mean = tl.sum(total, axis=0) / n
        m2 = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            mask = k < K
            count = tl.where(mask, tl.minimum(S - (k % P) * BLOCK, BLOCK).to(tl.float32), 0.0)
            d = tl.load(mean_part + base + k, mask=mask, other=0.0) - mean
            m2 += tl.load(m2_part + base + k, mask=mask, other=0.0) + count * d * d
        var = tl.sum(m2, axis=0) / n
        tl.store(mean_ptr + r, mean)
        tl.store(rstd_ptr + r, 1.0 / tl.sqrt(var + eps))

    @triton.jit
    def _normalize_act(x_ptr, y_ptr, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, mean_ptr, rstd_ptr,
                       xb_ptr, xb_sn, xb_sc, C, G, S, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       HAS_F: tl.constexpr, HAS_XB: tl.constexpr, ACTIVATION: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        if PDL:
            _await_previous_kernel()
        nc = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        mean, rstd, weight, offset = _coefficients(nc, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                                                   mean_ptr, rstd_ptr, HAS_W, HAS_B, HAS_F)  # fmt: skip
        if HAS_XB:
            mean -= tl.load(xb_ptr + (nc // C) * xb_sn + (nc % C) * xb_sc).to(tl.float32)
        at = nc.to(tl.int64) * S + offs
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        y = _act((x - mean) * rstd * weight + offset, ACTIVATION)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chunk_grad_sums(x_ptr, dy_ptr, s1_part, s2_part, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                         mean_ptr, rstd_ptr, xb_ptr, xb_sn, xb_sc, C, G, S, P, HAS_W: tl.constexpr,
                         HAS_B: tl.constexpr, HAS_F: tl.constexpr, HAS_XB: tl.constexpr, ACTIVATION: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """Sums of d_xhat and d_xhat * xhat over chunk `p` of channel row `nc`."""
        if PDL:
            _await_previous_kernel()
        nc = tl.program_id(0)
        p = tl.program_id(1)
        offs = p * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        mean, rstd, weight, offset = _coefficients(nc, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                                                   mean_ptr, rstd_ptr, HAS_W, HAS_B, HAS_F)  # fmt: skip
        if HAS_XB:  # x + input bias is what was normalised
            mean -= tl.load(xb_ptr + (nc // C) * xb_sn + (nc % C) * xb_sc).to(tl.float32)
        xhat, dxhat = _normalized_and_grad(x_ptr, dy_ptr, nc.to(tl.int64) * S + offs, mask, mean, rstd, weight,
                                           offset, ACTIVATION)  # fmt: skip
        tl.store(s1_part + nc * P + p, tl.sum(dxhat, axis=0))
        tl.store(s2_part + nc * P + p, tl.sum(dxhat * xhat, axis=0))

    @triton.jit
    def _group_grad_means(s1_part, s2_part, c1_ptr, c2_ptr, K, L, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:
            _await_previous_kernel()
        r = tl.program_id(0)
        base = r.to(tl.int64) * K
        s1 = tl.zeros([BLOCK_K], tl.float32)
        s2 = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            mask = k < K
            s1 += tl.load(s1_part + base + k, mask=mask, other=0.0)
            s2 += tl.load(s2_part + base + k, mask=mask, other=0.0)
        tl.store(c1_ptr + r, tl.sum(s1, axis=0) / L)
        tl.store(c2_ptr + r, tl.sum(s2, axis=0) / L)

    @triton.jit
    def _input_grad(x_ptr, dy_ptr, dx_ptr, c1_ptr, c2_ptr, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                    mean_ptr, rstd_ptr, xb_ptr, xb_sn, xb_sc, e_ptr, C, G, S, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, HAS_F: tl.constexpr, HAS_XB: tl.constexpr, HAS_E: tl.constexpr,
                    ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """The input gradient of chunk `p` of channel row `nc`; HAS_E: plus `e` (another gradient of x) there."""
        if PDL:
            _await_previous_kernel()
        nc = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S
        mean, rstd, weight, offset = _coefficients(nc, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                                                   mean_ptr, rstd_ptr, HAS_W, HAS_B, HAS_F)  # fmt: skip
        if HAS_XB:
            mean -= tl.load(xb_ptr + (nc // C) * xb_sn + (nc % C) * xb_sc).to(tl.float32)
        row = (nc // C) * G + (nc % C) // (C // G)
        c1 = tl.load(c1_ptr + row)
        c2 = tl.load(c2_ptr + row)
        at = nc.to(tl.int64) * S + offs
        xhat, dxhat = _normalized_and_grad(x_ptr, dy_ptr, at, mask, mean, rstd, weight, offset, ACTIVATION)
        dx = rstd * (dxhat - c1 - xhat * c2)
        if HAS_E:
            dx += tl.load(e_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


    # Channels-last: `x` is (N, S, C) in memory (channels innermost, as NHWC and NDHWC tensors are). A program takes
    # a (BLOCK_S values, BLOCK_C channels) tile of one sample and keeps one result a channel, so the per-chunk
    # moments and gradient sums land where the channel-row kernels above put theirs ((n * C + c) * P + p) and the
    # same group kernels combine them.

    @triton.jit
    def _cl_program(pid, cb, C, P, BLOCK_C: tl.constexpr):
        """Sample `n`, chunk `p`, channels `c` and their mask of the program at (pid, cb) of an (N * P, tiles) grid."""
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        return pid // P, pid % P, c, c < C

    @triton.jit
    def _cl_rows(n, first, c, cmask, C, S, BLOCK_S: tl.constexpr):
        """The mask and offsets of rows first .. first + BLOCK_S of sample `n`, channels `c`."""
        s = first + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & cmask[None, :]
        return mask, n.to(tl.int64) * S * C + s[:, None].to(tl.int64) * C + c[None, :]

    @triton.jit
    def _cl_tile(pid, cb, C, S, P, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        n, p, c, cmask = _cl_program(pid, cb, C, P, BLOCK_C)
        mask, at = _cl_rows(n, p * BLOCK_S, c, cmask, C, S, BLOCK_S)
        return n, p, c, cmask, mask, at

    @triton.jit
    def _cl_coefficients(n, c, cmask, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, mean_ptr, rstd_ptr,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_F: tl.constexpr):  # fmt: skip
        """Per-channel vectors: mean, rstd, effective weight and offset of channels `c` of sample `n`."""
        row = n * G + c // (C // G)
        mean = tl.load(mean_ptr + row, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=cmask, other=0.0)
        weight, offset = _cl_affine(n, c, cmask, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, HAS_W, HAS_B,
                                    HAS_F)  # fmt: skip
        return mean, rstd, weight, offset

    @triton.jit
    def _cl_group_parts(part_ptr, n, c, cmask, C, G, P, BLOCK_K: tl.constexpr):
        """The (channels, BLOCK_K) per-chunk results of each channel's group, their (k) indices and mask.

        A group's K = channels a group * P results are consecutive (at (n * C + c) * P + p).
        """
        k = tl.arange(0, BLOCK_K)
        mask = cmask[:, None] & (k < (C // G) * P)[None, :]
        first = (n * C + (c // (C // G)) * (C // G)) * P
        return tl.load(part_ptr + first[:, None] + k[None, :], mask=mask, other=0.0), k, mask

    @triton.jit
    def _cl_folded_moments(mean_part, m2_part, n, c, cmask, C, G, S, P, eps, CHUNK: tl.constexpr,
                           BLOCK_K: tl.constexpr):  # fmt: skip
        """Each channel's group's mean and 1/std from its chunk moments (Chan et al.), as `_group_moments` does.

        Per channel, for groups of at most BLOCK_K chunk results, in the kernel that uses them.
        """
        means, k, mask = _cl_group_parts(mean_part, n, c, cmask, C, G, P, BLOCK_K)
        m2s, k, mask = _cl_group_parts(m2_part, n, c, cmask, C, G, P, BLOCK_K)
        count = tl.where(mask, tl.minimum(S - (k % P) * CHUNK, CHUNK).to(tl.float32)[None, :], 0.0)
        total = tl.maximum(tl.sum(count, axis=1), 1.0)
        mean = tl.sum(count * means, axis=1) / total
        d = means - mean[:, None]
        var = tl.sum(m2s + count * d * d, axis=1) / total
        return mean, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _cl_affine(n, c, cmask, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, HAS_F: tl.constexpr):  # fmt: skip
        """Per-channel vectors: the effective weight (norm weight times factor) and offset of channels `c`."""
        if HAS_W:
            weight = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        else:
            weight = tl.where(cmask, 1.0, 1.0)
        if HAS_B:
            offset = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        else:
            offset = tl.where(cmask, 0.0, 0.0)
        if HAS_F:
            factor = tl.load(f_ptr + n * f_sn + c * f_sc, mask=cmask, other=0.0).to(tl.float32)
            weight = weight * factor
            offset = offset * factor + tl.load(s_ptr + n * s_sn + c * s_sc, mask=cmask, other=0.0).to(tl.float32)
        return weight, offset

    @triton.jit
    def _cl_normalized_and_grad(x_ptr, dy_ptr, at, mask, mean, rstd, weight, offset, ACTIVATION: tl.constexpr):
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        grad = dy * _act_grad(xhat * weight[None, :] + offset[None, :], ACTIVATION) * weight[None, :]
        return xhat, tl.where(mask, grad, 0.0)

    @triton.jit
    def _cl_chunk_moments(x_ptr, mean_part, m2_part, xb_ptr, xb_sn, xb_sc, C, S, P, HAS_XB: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, LOOP: tl.constexpr,
                          PDL: tl.constexpr = False):  # fmt: skip
        """Per-channel mean and sum of squared deviations of chunk `p` (LOOP tiles of BLOCK_S values) of sample `n`.

        Grid: (N * P, channel tiles). The values, shifted by the chunk's first value of each channel, are summed
        and squared-summed element-wise in registers over the LOOP tiles, then reduced over the tile's rows once:
        a reduction across the rows of a tile costs a round through shared memory, an element-wise sum does not.
        """
        if PDL:
            _await_previous_kernel()
        n, p, c, cmask = _cl_program(tl.program_id(0), tl.program_id(1), C, P, BLOCK_C)
        start = p * BLOCK_S * LOOP
        pivot = tl.load(x_ptr + n.to(tl.int64) * S * C + start.to(tl.int64) * C + c, mask=cmask,
                        other=0.0).to(tl.float32)  # fmt: skip
        total = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        squares = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for i in range(LOOP):
            mask, at = _cl_rows(n, start + i * BLOCK_S, c, cmask, C, S, BLOCK_S)
            d = tl.where(mask, tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - pivot[None, :], 0.0)
            total += d
            squares += d * d
        count = tl.maximum(tl.minimum(S - start, BLOCK_S * LOOP), 1).to(tl.float32)
        shifted = tl.sum(total, axis=0)
        mean = shifted / count
        m2 = tl.maximum(tl.sum(squares, axis=0) - shifted * mean, 0.0)
        if HAS_XB:
            mean += tl.load(xb_ptr + n * xb_sn + c * xb_sc, mask=cmask, other=0.0).to(tl.float32)
        out = (n * C + c) * P + p
        tl.store(mean_part + out, pivot + mean, mask=cmask)
        tl.store(m2_part + out, m2, mask=cmask)

    @triton.jit
    def _cl_normalize_act(x_ptr, y_ptr, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, mean_ptr, rstd_ptr,
                          xb_ptr, xb_sn, xb_sc, mean_part, m2_part, C, G, S, P, P_STATS, eps, HAS_W: tl.constexpr,
                          HAS_B: tl.constexpr, HAS_F: tl.constexpr, HAS_XB: tl.constexpr, ACTIVATION: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, FOLD: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """The output of one tile.

        FOLD: the group statistics from the chunk moments here (no `_group_moments`), stored to mean_ptr and rstd_ptr
        by the programs of the first chunk.
        """
        if PDL:
            _await_previous_kernel()
        n, p, c, cmask, mask, at = _cl_tile(tl.program_id(0), tl.program_id(1), C, S, P, BLOCK_S, BLOCK_C)
        if FOLD:
            mean, rstd = _cl_folded_moments(mean_part, m2_part, n, c, cmask, C, G, S, P_STATS, eps, CHUNK, BLOCK_K)
            if p == 0:  # channels of a group store one value
                row = n * G + c // (C // G)
                tl.store(mean_ptr + row, mean, mask=cmask)
                tl.store(rstd_ptr + row, rstd, mask=cmask)
            weight, offset = _cl_affine(n, c, cmask, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc, HAS_W,
                                        HAS_B, HAS_F)  # fmt: skip
        else:
            mean, rstd, weight, offset = _cl_coefficients(n, c, cmask, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc,
                                                          s_sn, s_sc, mean_ptr, rstd_ptr, HAS_W, HAS_B,
                                                          HAS_F)  # fmt: skip
        if HAS_XB:
            mean -= tl.load(xb_ptr + n * xb_sn + c * xb_sc, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        y = _act((x - mean[None, :]) * rstd[None, :] * weight[None, :] + offset[None, :], ACTIVATION)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _cl_chunk_grad_sums(x_ptr, dy_ptr, s1_part, s2_part, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                            mean_ptr, rstd_ptr, xb_ptr, xb_sn, xb_sc, C, G, S, P, HAS_W: tl.constexpr,
                            HAS_B: tl.constexpr, HAS_F: tl.constexpr, HAS_XB: tl.constexpr, ACTIVATION: tl.constexpr,
                            BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, LOOP: tl.constexpr,
                            PDL: tl.constexpr = False):  # fmt: skip
        """Per-channel sums of d_xhat and d_xhat * xhat over chunk `p` (LOOP tiles) of sample `n`."""
        if PDL:
            _await_previous_kernel()
        n, p, c, cmask = _cl_program(tl.program_id(0), tl.program_id(1), C, P, BLOCK_C)
        mean, rstd, weight, offset = _cl_coefficients(n, c, cmask, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc,
                                                      s_sn, s_sc, mean_ptr, rstd_ptr, HAS_W, HAS_B, HAS_F)  # fmt: skip
        if HAS_XB:  # x + input bias is what was normalised
            mean -= tl.load(xb_ptr + n * xb_sn + c * xb_sc, mask=cmask, other=0.0).to(tl.float32)
        s1 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)  # element-wise over the LOOP tiles, reduced once
        s2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for i in range(LOOP):
            mask, at = _cl_rows(n, (p * LOOP + i) * BLOCK_S, c, cmask, C, S, BLOCK_S)
            xhat, dxhat = _cl_normalized_and_grad(x_ptr, dy_ptr, at, mask, mean, rstd, weight, offset, ACTIVATION)
            s1 += dxhat
            s2 += dxhat * xhat
        out = (n * C + c) * P + p
        tl.store(s1_part + out, tl.sum(s1, axis=0), mask=cmask)
        tl.store(s2_part + out, tl.sum(s2, axis=0), mask=cmask)

    @triton.jit
    def _cl_input_grad(x_ptr, dy_ptr, dx_ptr, c1_ptr, c2_ptr, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc, s_sn, s_sc,
                       mean_ptr, rstd_ptr, xb_ptr, xb_sn, xb_sc, s1_part, s2_part, e_ptr, C, G, S, P, P_STATS,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_F: tl.constexpr, HAS_XB: tl.constexpr,
                       HAS_E: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
                       FOLD: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """The input gradient of one tile, plus `e` (another gradient of x, in x's layout) where HAS_E.

        FOLD: the group sums from the chunk sums here (no `_group_grad_means`).
        """
        if PDL:
            _await_previous_kernel()
        n, p, c, cmask, mask, at = _cl_tile(tl.program_id(0), tl.program_id(1), C, S, P, BLOCK_S, BLOCK_C)
        mean, rstd, weight, offset = _cl_coefficients(n, c, cmask, C, G, w_ptr, b_ptr, f_ptr, s_ptr, f_sn, f_sc,
                                                      s_sn, s_sc, mean_ptr, rstd_ptr, HAS_W, HAS_B, HAS_F)  # fmt: skip
        if HAS_XB:
            mean -= tl.load(xb_ptr + n * xb_sn + c * xb_sc, mask=cmask, other=0.0).to(tl.float32)
        if FOLD:
            s1, k, kmask = _cl_group_parts(s1_part, n, c, cmask, C, G, P_STATS, BLOCK_K)
            s2, k, kmask = _cl_group_parts(s2_part, n, c, cmask, C, G, P_STATS, BLOCK_K)
            c1 = tl.sum(s1, axis=1) / ((C // G) * S)
            c2 = tl.sum(s2, axis=1) / ((C // G) * S)
        else:
            row = n * G + c // (C // G)
            c1 = tl.load(c1_ptr + row, mask=cmask, other=0.0)
            c2 = tl.load(c2_ptr + row, mask=cmask, other=0.0)
        xhat, dxhat = _cl_normalized_and_grad(x_ptr, dy_ptr, at, mask, mean, rstd, weight, offset, ACTIVATION)
        dx = rstd[None, :] * (dxhat - c1[None, :] - xhat * c2[None, :])
        if HAS_E:
            dx += tl.load(e_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _residual_sum(r_ptr, x_ptr, bias_ptr, out_ptr, n, channel_stride, C, scale, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """(residual + x + bias[channel]) * scale over dense memory: float32 inside, one rounding."""
        if PDL:
            _await_previous_kernel()
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = at < n
        y = tl.load(r_ptr + at, mask=mask, other=0.0).to(tl.float32) + tl.load(x_ptr + at, mask=mask,
                                                                               other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(bias_ptr + (at // channel_stride) % C, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (y * scale).to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _layer_norm_tile(M, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's rows, channels, channel mask, (rows, channels) mask and offsets of (M, C) rows."""
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        return r, c, cmask, (r < M)[:, None] & cmask[None, :], r[:, None] * C + c[None, :]

    @triton.jit
    def _add_layer_norm(a_ptr, x_ptr, s_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, M, C, eps,
                        HAS_A: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                        PDL: tl.constexpr = False):  # fmt: skip
        """The sum s = a + x (rounded as PyTorch's addition is) and y = layer_norm(s) * w + b, per row of C."""
        if PDL:
            _await_previous_kernel()
        r, c, cmask, mask, at = _layer_norm_tile(M, C, ROWS, BLOCK_C)
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_A:
            total = (x + tl.load(a_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
            tl.store(s_ptr + at, total, mask=mask)
            x = total.to(tl.float32)
        mean = tl.sum(x, axis=1) / C
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + r, mean, mask=r < M)
        tl.store(rstd_ptr + r, rstd, mask=r < M)

    @triton.jit
    def _layer_norm_input_grad(dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, g_ptr, dx_ptr, M, C, HAS_G: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """The input gradient rstd * (w dy - mean(w dy) - xhat * mean(w dy xhat)) (+ g) per row of C, in float32."""
        if PDL:
            _await_previous_kernel()
        r, c, cmask, mask, at = _layer_norm_tile(M, C, ROWS, BLOCK_C)
        mean = tl.load(mean_ptr + r, mask=r < M, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=r < M, other=0.0)
        xhat = tl.where(mask, (tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean[:, None])
                        * rstd[:, None], 0.0)  # fmt: skip
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        wdy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32) * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_G:
            dx += tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pack_bits(mask_ptr, bits_ptr, n, BYTES, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """bits[i] = mask[8 i] << 7 | ... | mask[8 i + 7] over `n` mask bytes (0 past n); BLOCK bytes a program."""
        if PDL:
            _await_previous_kernel()
        byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, 8)
        at = byte[:, None] * 8 + j[None, :]
        values = tl.load(mask_ptr + at, mask=at < n, other=0).to(tl.int32)
        packed = tl.sum((values != 0).to(tl.int32) << (7 - j)[None, :], axis=1)
        tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte < BYTES)

    @triton.jit
    def _bit_masked_scale(grad_ptr, bits_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Gradient times bit times scale over dense memory; bits eight a byte in memory order, first highest."""
        if PDL:
            _await_previous_kernel()
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = at < n
        grad = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32)
        bits = tl.load(bits_ptr + at // 8, mask=mask, other=0).to(tl.int32)
        keep = ((bits >> (7 - (at % 8)).to(tl.int32)) & 1).to(tl.float32)
        tl.store(out_ptr + at, (keep * grad * scale).to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _geglu(p_ptr, out_ptr, n, H, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """`hidden * gelu(gate)` of projection rows `[hidden | gate]` (2H values a row) into (rows, H) `out`."""
        if PDL:
            _await_previous_kernel()
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = at < n
        source = (at // H) * 2 * H + at % H
        hidden = tl.load(p_ptr + source, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(p_ptr + source + H, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (hidden * _act(gate, 1)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_grad(g_ptr, p_ptr, out_ptr, n, H, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """The gradient of `_geglu` at projection rows `p` for output gradient `g`, as rows `[d_hidden | d_gate]`."""
        if PDL:
            _await_previous_kernel()
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = at < n
        source = (at // H) * 2 * H + at % H
        grad = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
        hidden = tl.load(p_ptr + source, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(p_ptr + source + H, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + source, (grad * _act(gate, 1)).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + source + H, (grad * hidden * _act_grad(gate, 1)).to(out_ptr.dtype.element_ty), mask=mask)


def block_for(s: int) -> int:
    """The chunk size for rows of `s` values (see `BLOCK`).

    Example:
        >>> block_for(8 * 40 * 64), block_for(5 * 8)  # a temporal norm at 40 x 64; a ResNet norm at 5 x 8
        (1024, 128)
    """
    return SHORT_BLOCK if s < SHORT_ROW else BLOCK


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _block_k(k: int) -> int:
    return min(MAX_BLOCK_K, triton.next_power_of_2(max(k, 1)))


def _affine_args(x: torch.Tensor, weight, bias, factor, shift):
    """The pointer and stride arguments the kernels take for the norm's affine and the (N, C) factor and shift."""
    n, c = x.shape[:2]
    if (factor is None) != (shift is None):
        raise ValueError("factor and shift go together: pass both or neither.")
    if factor is not None:
        factor = factor.reshape(factor.shape[0], -1).expand(n, c)
        shift = shift.reshape(shift.shape[0], -1).expand(n, c)
        f_args = (factor, shift, factor.stride(0), factor.stride(1), shift.stride(0), shift.stride(1))
    else:
        f_args = (x, x, 0, 0, 0, 0)
    w = weight if weight is not None else x
    b = bias if bias is not None else x
    flags = {"HAS_W": weight is not None, "HAS_B": bias is not None, "HAS_F": factor is not None}
    return (w, b, *f_args), flags


def _on_device(x: torch.Tensor):
    """Launch on `x`'s GPU: Triton launches on the current device, which need not be the tensor's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def group_norm_act_forward(x, weight, bias, factor, shift, groups: int, eps: float, activation: str,
                           input_bias=None):  # fmt: skip
    """`(y, mean, rstd)`: `y = act(group_norm(x) * factor + shift)` in x's dtype, float32 (N, groups) statistics.

    `x` is (N, C, ...); `factor` and `shift` are broadcastable to (N, C, 1, ...) or both None; `activation` is
    "silu", "gelu" (exact) or "none". `input_bias`, broadcastable to (N, C, 1, ...), is added to `x` first, inside
    the kernels (the bias of the convolution before the norm, or a time embedding added to it, without a pass of
    its own); the statistics are then those of `x + input_bias`, and `group_norm_act_backward` takes the same
    bias. Raises `ValueError` for another activation or channels that `groups` does not divide.

    Example:
        >>> x = torch.randn(8, 320, 40, 64, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> y, mean, rstd = group_norm_act_forward(x, None, None, None, None, 32, 1e-5, "silu")  # doctest: +SKIP
    """
    with _on_device(x):
        return _forward(x, weight, bias, factor, shift, groups, eps, activation, input_bias)


def group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, groups: int, activation: str,
                            input_bias=None, extra=None):  # fmt: skip
    """The gradient of `group_norm_act_forward`'s output with respect to `x` alone, in x's dtype.

    `mean` and `rstd` are the statistics the forward pass returned; the pre-activation is recomputed from `x` (plus
    `input_bias`, the one the forward pass took, inside the kernels). The gradient with respect to `x` is also the
    one with respect to `x + input_bias`; none is computed for the bias. `extra`, another gradient of `x` (a
    residual connection's), is added: in the last kernel's float32 sum where it has x's shape and strides (one
    rounding, no pass of its own), else by PyTorch's addition after it.

    Example:
        >>> dx = group_norm_act_backward(grad, x, None, None, None, None, mean, rstd, 32, "silu")  # doctest: +SKIP
    """
    # the kernels write dx in x's layout where x is channels-last rows or contiguous (else contiguous)
    in_kernel = extra is not None and extra.shape == x.shape and extra.stride() == x.stride() and (
        channels_last_rows(x) is not None or x.is_contiguous())  # fmt: skip
    with _on_device(x):
        dx = _backward(grad, x, weight, bias, factor, shift, mean, rstd, groups, activation, input_bias,
                       extra if in_kernel else None)  # fmt: skip
    return dx if extra is None or in_kernel else dx + extra


def _layout(x: torch.Tensor, groups: int) -> tuple[int, int, int, int, int, int, int]:
    """(N, C, values a channel row, chunk size, chunks a row, warps, chunk results a group) of a contiguous `x`."""
    n, c = x.shape[:2]
    s = x.numel() // (n * c)
    block = block_for(s)
    p = triton.cdiv(s, block)
    return n, c, s, block, p, _warps(block), (c // groups) * p


def _input_bias_args(x: torch.Tensor, input_bias) -> tuple[tuple, dict]:
    """The pointer and (N, C) stride arguments of an input bias broadcastable to (N, C, 1, ...), or none."""
    if input_bias is None:
        return (x, 0, 0), {"HAS_XB": False}
    n, c = x.shape[:2]
    xb = input_bias.reshape(-1, c) if input_bias.dim() <= 1 else input_bias.reshape(input_bias.shape[0], -1)
    xb = xb.expand(n, c)
    return (xb, xb.stride(0), xb.stride(1)), {"HAS_XB": True}


def _forward(x, weight, bias, factor, shift, groups: int, eps: float, activation: str, input_bias=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} must be one of {ACTIVATIONS}.")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into groups={groups}.")
    xb_args, xb_flag = _input_bias_args(x, input_bias)
    rows = channels_last_rows(x)
    if rows is not None:
        return _cl_forward(x, rows, weight, bias, factor, shift, groups, eps, activation, xb_args, xb_flag)
    x = x.contiguous()
    n, c, s, block, p, warps, k = _layout(x, groups)
    parts = torch.empty(2, n * c * p, device=x.device, dtype=torch.float32)
    stats = torch.empty(2, n * groups, device=x.device, dtype=torch.float32)
    pdl = pdl_launch(x)  # the same launch arguments for each of the norm's kernels
    _chunk_moments[(n * c, p)](x, parts[0], parts[1], *xb_args, c, s, p, **xb_flag, BLOCK=block, num_warps=warps,
                               **pdl)
    _group_moments[(n * groups,)](parts[0], parts[1], stats[0], stats[1], s, p, k, eps, BLOCK=block,
                                  BLOCK_K=_block_k(k), **pdl)  # fmt: skip
    affine, flags = _affine_args(x, weight, bias, factor, shift)
    y = torch.empty_like(x)
    _normalize_act[(n * c, p)](x, y, *affine, stats[0], stats[1], *xb_args, c, groups, s, **flags, **xb_flag,
                               ACTIVATION=ACTIVATIONS.index(activation), BLOCK=block, num_warps=warps,
                               **pdl)  # fmt: skip
    return y, stats[0], stats[1]


def channels_last_rows(x: torch.Tensor) -> torch.Tensor | None:
    """`x` as an (N, values a channel, C) contiguous view when its channels are innermost in memory, else None.

    That is the memory of a `torch.channels_last` (N, C, H, W) tensor, of a `torch.channels_last_3d`
    (N, C, F, H, W) one, and of the (N, C, H * W) view of either; a contiguous `x` gives None (the channel-row
    kernels take it).

    Example:
        >>> channels_last_rows(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)).shape
        torch.Size([2, 4, 5, 3])
        >>> channels_last_rows(torch.zeros(2, 3, 4, 5)) is None
        True
    """
    if x.dim() < 3 or x.is_contiguous():
        return None
    rows = x.permute(0, *range(2, x.dim()), 1)
    return rows if rows.is_contiguous() else None


def cl_tile(c: int, s: int, tile: int) -> tuple[int, int, int]:
    """(values, channels, warps) of a channels-last program's tile of `tile` values, for C channels of S a sample.

    Example:
        >>> cl_tile(320, 8 * 40 * 64, 8192), cl_tile(1280, 40, 8192)
        ((128, 64, 8), (64, 64, 8))
    """
    block_c = min(CL_BLOCK_C, triton.next_power_of_2(c))
    block_s = min(tile // block_c, triton.next_power_of_2(s))
    return block_s, block_c, max(1, min(8, block_s * block_c // 512))


def _cl_layout(rows: torch.Tensor, groups: int, direction: str):
    """The launch geometry of channels-last `rows` for the "forward" or "backward" kernels.

    (N, C, S, tile values, tile channels, tiles a sample, warps, tiles a statistics chunk, chunks a sample, chunk
    results a group).
    """
    n, c = rows.shape[0], rows.shape[-1]
    s = rows.numel() // (n * c)
    tile = CL_TILE[direction]
    block_s, block_c, warps = cl_tile(c, s, tile)
    p = triton.cdiv(s, block_s)
    loop = max(1, min(CL_LOOP[direction], p))
    p_stats = triton.cdiv(s, block_s * loop)
    if n * p_stats * triton.cdiv(c, block_c) < CL_MIN_PROGRAMS:  # few programs: one tile each, then smaller tiles
        loop, p_stats = 1, p
        while n * p * triton.cdiv(c, block_c) < CL_MIN_PROGRAMS and tile > CL_MIN_TILE:
            tile //= 2
            block_s, block_c, warps = cl_tile(c, s, tile)
            p = p_stats = triton.cdiv(s, block_s)
    return n, c, s, block_s, block_c, p, warps, loop, p_stats, (c // groups) * p_stats


def _cl_forward(x, rows, weight, bias, factor, shift, groups: int, eps: float, activation: str, xb_args, xb_flag):
    n, c, s, block_s, block_c, p, warps, loop, p_stats, k = _cl_layout(rows, groups, "forward")
    tiles = triton.cdiv(c, block_c)
    parts = torch.empty(2, n * c * p_stats, device=x.device, dtype=torch.float32)
    stats = torch.empty(2, n * groups, device=x.device, dtype=torch.float32)
    pdl = pdl_launch(rows)  # the same launch arguments for each of the norm's kernels
    _cl_chunk_moments[(n * p_stats, tiles)](rows, parts[0], parts[1], *xb_args, c, s, p_stats, **xb_flag,
                                            BLOCK_S=block_s, BLOCK_C=block_c, LOOP=loop,
                                            num_warps=warps, **pdl)  # fmt: skip
    fold = k <= CL_FOLD_MAX_K
    fold_k = triton.next_power_of_2(k) if fold else 1  # the folding program loads all of a group's results at once
    if not fold:
        _group_moments[(n * groups,)](parts[0], parts[1], stats[0], stats[1], s, p_stats, k, eps,
                                      BLOCK=block_s * loop, BLOCK_K=_block_k(k), **pdl)  # fmt: skip
    affine, flags = _affine_args(x, weight, bias, factor, shift)
    y = torch.empty_like(x)  # x's strides: the same channels-last memory
    _cl_normalize_act[(n * p, tiles)](rows, y, *affine, stats[0], stats[1], *xb_args, parts[0], parts[1], c, groups,
                                      s, p, p_stats, eps, **flags, **xb_flag,
                                      ACTIVATION=ACTIVATIONS.index(activation), BLOCK_S=block_s, BLOCK_C=block_c,
                                      FOLD=fold, CHUNK=block_s * loop, BLOCK_K=fold_k, num_warps=warps,
                                      **pdl)  # fmt: skip
    return y, stats[0], stats[1]


def _backward(grad, x, weight, bias, factor, shift, mean, rstd, groups: int, activation: str, input_bias=None,
              extra=None):  # fmt: skip
    """`extra`, where given, has x's shape and strides, and x is channels-last rows or contiguous."""
    xb_args, xb_flag = _input_bias_args(x, input_bias)
    rows = channels_last_rows(x)
    if rows is not None:
        return _cl_backward(grad, x, rows, weight, bias, factor, shift, mean, rstd, groups, activation, xb_args,
                            xb_flag, extra)  # fmt: skip
    x, grad = x.contiguous(), grad.to(x.dtype).contiguous()
    n, c, s, block, p, warps, k = _layout(x, groups)
    affine, flags = _affine_args(x, weight, bias, factor, shift)
    act = ACTIVATIONS.index(activation)
    parts = torch.empty(2, n * c * p, device=x.device, dtype=torch.float32)
    pdl = pdl_launch(x)  # the same launch arguments for each of the norm's kernels
    _chunk_grad_sums[(n * c, p)](x, grad, parts[0], parts[1], *affine, mean, rstd, *xb_args, c, groups, s, p,
                                 **flags, **xb_flag, ACTIVATION=act, BLOCK=block, num_warps=warps,
                                 **pdl)  # fmt: skip
    means = torch.empty(2, n * groups, device=x.device, dtype=torch.float32)
    _group_grad_means[(n * groups,)](parts[0], parts[1], means[0], means[1], k, (c // groups) * s,
                                     BLOCK_K=_block_k(k), **pdl)  # fmt: skip
    dx = torch.empty_like(x)
    _input_grad[(n * c, p)](x, grad, dx, means[0], means[1], *affine, mean, rstd, *xb_args,
                            dx if extra is None else extra, c, groups, s, **flags, **xb_flag,
                            HAS_E=extra is not None, ACTIVATION=act, BLOCK=block, num_warps=warps,
                            **pdl)  # fmt: skip
    return dx


def _cl_backward(grad, x, rows, weight, bias, factor, shift, mean, rstd, groups: int, activation: str, xb_args,
                 xb_flag, extra=None):  # fmt: skip
    grad = grad.to(x.dtype)
    if channels_last_rows(grad) is None:  # the kernels read grad as they read x: (N, values, C) rows
        grad = torch.empty_like(x).copy_(grad)
    n, c, s, block_s, block_c, p, warps, loop, p_stats, k = _cl_layout(rows, groups, "backward")
    tiles = triton.cdiv(c, block_c)
    affine, flags = _affine_args(x, weight, bias, factor, shift)
    act = ACTIVATIONS.index(activation)
    parts = torch.empty(2, n * c * p_stats, device=x.device, dtype=torch.float32)
    pdl = pdl_launch(rows)  # the same launch arguments for each of the norm's kernels
    _cl_chunk_grad_sums[(n * p_stats, tiles)](rows, grad, parts[0], parts[1], *affine, mean, rstd, *xb_args, c,
                                              groups, s, p_stats, **flags, **xb_flag, ACTIVATION=act,
                                              BLOCK_S=block_s, BLOCK_C=block_c, LOOP=loop,
                                              num_warps=warps, **pdl)  # fmt: skip
    means = torch.empty(2, n * groups, device=x.device, dtype=torch.float32)
    fold = k <= CL_FOLD_MAX_K
    fold_k = triton.next_power_of_2(k) if fold else 1
    if not fold:
        _group_grad_means[(n * groups,)](parts[0], parts[1], means[0], means[1], k, (c // groups) * s,
                                         BLOCK_K=_block_k(k), **pdl)  # fmt: skip
    dx = torch.empty_like(x)
    _cl_input_grad[(n * p, tiles)](rows, grad, dx, means[0], means[1], *affine, mean, rstd, *xb_args, parts[0],
                                   parts[1], dx if extra is None else extra, c, groups, s, p, p_stats, **flags,
                                   **xb_flag, HAS_E=extra is not None, ACTIVATION=act, BLOCK_S=block_s,
                                   BLOCK_C=block_c, FOLD=fold, BLOCK_K=fold_k, num_warps=warps,
                                   **pdl)  # fmt: skip
    return dx


#: Values a program of `residual_sum` takes.
SUM_BLOCK = 2048
#: Whether `residual_sum` runs its kernel; benchmarks/bench_stage_kernels.py switches it off ("_nosum") to measure
#: what it saves against PyTorch's operators.
RESIDUAL_SUM_KERNEL = True


def _dense(x: torch.Tensor) -> bool:
    """Whether `x`'s elements fill its memory with no gap or overlap (any order of dimensions)."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
        x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))


def residual_sum(residual: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
                 scale: float = 1.0) -> torch.Tensor:  # fmt: skip
    """`(residual + x + bias[:, None, ...]) * scale` in one pass.

    A convolution's bias (added by PyTorch in a pass of its own after cuDNN's kernel, a broadcast addition that
    runs on its unvectorized kernel), a residual addition and a UNet's output scale factor, as one kernel over
    the memory of (N, C, ...) tensors: where both are dense with the same strides (contiguous or channels-last)
    and on a device the kernels run on. With gradients off the sum is written into `x` (a convolution's fresh
    output); with gradients on, into a new tensor, and the backward pass hands `grad * scale` to `residual` and
    `x` (the same tensor, no pass at scale 1; a bias that requires gradients goes to PyTorch's operators).
    Elsewhere PyTorch's operators compute the same into a new tensor.

    Example:
        >>> out = residual_sum(input_tensor, conv2_without_bias(h), conv2.bias, 1 / 1.414)  # doctest: +SKIP
    """
    same = residual.shape == x.shape and residual.stride() == x.stride() and residual.dtype == x.dtype
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (residual, x, bias))
    if (not (RESIDUAL_SUM_KERNEL and same and fused_norm_available(x) and _dense(x) and x.ndim >= 2)
            or (tracked and bias is not None and bias.requires_grad)):  # fmt: skip
        out = residual + x if bias is None else residual + (x + bias.view(-1, *[1] * (x.ndim - 2)).to(x.dtype))
        return out if scale == 1.0 else out * scale
    if tracked:
        return _ResidualSum.apply(residual, x, bias, float(scale))
    return _residual_sum_into(residual, x, bias, float(scale), x)


def _residual_sum_into(residual, x, bias, scale: float, out: torch.Tensor) -> torch.Tensor:
    bias_arg = bias.to(x.dtype).contiguous() if bias is not None else x
    with _on_device(x):
        _residual_sum[(triton.cdiv(x.numel(), SUM_BLOCK),)](
            residual, x, bias_arg, out, x.numel(), x.stride(1), x.shape[1], scale, HAS_BIAS=bias is not None,
            BLOCK=SUM_BLOCK, num_warps=4, **pdl_launch(residual))  # fmt: skip
    return out


class _ResidualSum(torch.autograd.Function):
    """`residual_sum` with gradients on: a new output; `grad * scale` to both inputs, none to the frozen bias."""

    @staticmethod
    def forward(ctx, residual, x, bias, scale):
        ctx.scale = scale
        return _residual_sum_into(residual, x, bias, scale, torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad):
        grad = grad if ctx.scale == 1.0 else grad * ctx.scale
        return grad, grad, None, None


#: Values a program of the GEGLU kernels takes.
GEGLU_BLOCK = 2048


def _geglu_rows(projection: torch.Tensor) -> int:
    if not (projection.is_contiguous() and projection.shape[-1] % 2 == 0 and fused_norm_available(projection)):
        raise ValueError("the GEGLU kernels take a contiguous projection [hidden | gate] with an even last dimension "
                         "on a device their kernels run on; use torch.nn.functional.gelu elsewhere.")
    return projection.shape[-1] // 2


def geglu(projection: torch.Tensor) -> torch.Tensor:
    """`hidden * gelu(gate)` for `hidden, gate = projection.chunk(2, -1)` (diffusers' GEGLU, exact GELU), one pass.

    float32 inside, one rounding to `projection`'s dtype (PyTorch's operators round the GELU and the product each).

    Example:
        >>> act = geglu(torch.nn.functional.linear(x, proj.weight, proj.bias))  # doctest: +SKIP
    """
    h = _geglu_rows(projection)
    out = projection.new_empty(*projection.shape[:-1], h)
    with _on_device(projection):
        _geglu[(triton.cdiv(out.numel(), GEGLU_BLOCK),)](projection, out, out.numel(), h, BLOCK=GEGLU_BLOCK,
                                                         num_warps=4, **pdl_launch(projection))  # fmt: skip
    return out


def geglu_backward(grad: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """The gradient of `geglu` with respect to `projection`, `[grad * gelu(gate) | grad * hidden * gelu'(gate)]`.

    One pass that writes both halves in place of the concatenation, float32 inside.

    Example:
        >>> grad_projection = geglu_backward(grad_act, projection)  # doctest: +SKIP
    """
    h = _geglu_rows(projection)
    grad = grad.to(projection.dtype).contiguous()
    if grad.shape != (*projection.shape[:-1], h):
        raise ValueError(f"geglu_backward: grad has shape {tuple(grad.shape)}, the product of a projection of shape "
                         f"{tuple(projection.shape)} has {(*projection.shape[:-1], h)}.")
    out = torch.empty_like(projection)
    with _on_device(projection):
        _geglu_grad[(triton.cdiv(grad.numel(), GEGLU_BLOCK),)](grad, projection, out, grad.numel(), h,
                                                               BLOCK=GEGLU_BLOCK, num_warps=4,
                                                               **pdl_launch(grad))  # fmt: skip
    return out


#: Values of the (rows, channels) block one program of the layer-norm kernels takes (channels padded to a power
#: of two; at least one row).
LAYER_NORM_TILE = 4096


def _layer_norm_launch(rows: torch.Tensor) -> tuple[tuple[int], dict]:
    m, c = rows.shape
    block_c = triton.next_power_of_2(c)
    per = max(1, LAYER_NORM_TILE // block_c)
    return (triton.cdiv(m, per),), {"ROWS": per, "BLOCK_C": block_c, "num_warps": 4 if block_c * per <= 4096 else 8}


def add_layer_norm_forward(a: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """`(s, y, mean, rstd)`: `s = a + x` (x itself where `a` is None), `y = layer_norm(s, (C,), weight, bias)`.

    `a` and `x` are contiguous (M, C) rows of one dtype, `weight` and `bias` (C,); one pass: the sum rounded to the
    rows' dtype as PyTorch's addition rounds it, the norm over it in float32 (two passes over the row in
    registers), `y` rounded once; float32 (M,) statistics for `layer_norm_input_grad`.

    Example:
        >>> s, y, mean, rstd = add_layer_norm_forward(a, x, norm.weight, norm.bias, norm.eps)  # doctest: +SKIP
    """
    if x.dim() != 2 or not x.is_contiguous() or (a is not None and (a.shape != x.shape or a.dtype != x.dtype
                                                                    or not a.is_contiguous())):  # fmt: skip
        raise ValueError("add_layer_norm_forward takes contiguous (M, C) rows, a and x of one shape and dtype.")
    m, c = x.shape
    s = x if a is None else torch.empty_like(x)
    y = torch.empty_like(x)
    stats = torch.empty(2, m, device=x.device, dtype=torch.float32)
    grid, meta = _layer_norm_launch(x)
    with _on_device(x):
        _add_layer_norm[grid](x if a is None else a, x, s, y, weight, bias, stats[0], stats[1], m, c, float(eps),
                              HAS_A=a is not None, **meta, **pdl_launch(x))  # fmt: skip
    return s, y, stats[0], stats[1]


def layer_norm_input_grad(grad: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The gradient of `add_layer_norm_forward`'s `y` with respect to `s` (weight and bias frozen), plus `extra`.

    `extra` (the gradient `s` receives from its other uses, or None) is added in the same pass, in float32, and the
    sum rounded once to `s`'s dtype.

    Example:
        >>> ds = layer_norm_input_grad(grad_y, s, norm.weight, mean, rstd, grad_s)  # doctest: +SKIP
    """
    grad = grad.to(s.dtype).contiguous()
    if extra is not None:
        extra = extra.to(s.dtype).contiguous()
    dx = torch.empty_like(s)
    grid, meta = _layer_norm_launch(s)
    with _on_device(s):
        _layer_norm_input_grad[grid](grad, s, weight, mean, rstd, grad if extra is None else extra, dx, s.shape[0],
                                     s.shape[1], HAS_G=extra is not None, **meta, **pdl_launch(s))  # fmt: skip
    return dx


#: Values a program of `bit_masked_scale` takes.
MASK_BLOCK = 2048
#: Bytes of bits (eight mask values each) a program of `pack_bits` writes.
PACK_BLOCK = 512


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A dense bool `mask` as bits, eight to a byte in memory order, the first in the highest bit, in one pass.

    What `lean_backward._pack_bits` computes with PyTorch's operators (three passes and an int64 intermediate);
    the mask must be dense (contiguous or channels-last) on a device the kernels run on.

    Example:
        >>> bits = pack_bits(torch.rand(4, 6, device="cuda") < 0.5)  # doctest: +SKIP
        >>> bits.shape, bits.dtype  # doctest: +SKIP
        (torch.Size([3]), torch.uint8)
    """
    if mask.dtype != torch.bool or not (_dense(mask) and fused_norm_available(mask)):
        raise ValueError("pack_bits takes a dense bool mask on a device its kernel runs on; pack it with "
                         "PyTorch's operators elsewhere (lean_backward._pack_bits).")  # fmt: skip
    # the mask's bytes in memory order: a flat view of its storage (dense: no gaps, any dimension order)
    flat = mask.as_strided((mask.numel(),), (1,)).view(torch.uint8)
    n_bytes = -(-mask.numel() // 8)
    bits = torch.empty(n_bytes, dtype=torch.uint8, device=mask.device)
    with _on_device(mask):
        _pack_bits[(triton.cdiv(n_bytes, PACK_BLOCK),)](flat, bits, mask.numel(), n_bytes, BLOCK=PACK_BLOCK,
                                                        num_warps=4, **pdl_launch(mask))  # fmt: skip
    return bits


def bit_masked_scale(grad: torch.Tensor, bits: torch.Tensor, scale: float) -> torch.Tensor:
    """Dropout's backward, `grad * mask * scale`, with the mask as bits: one pass, no unpacked mask.

    `bits` holds the mask eight values a byte in `grad`'s memory order, the first in the highest bit (as
    `lean_backward._pack_bits` packs it); `grad` must be dense (contiguous or channels-last, the orders a mask is
    packed in) and on a device the kernels run on. The product is float32 inside, as PyTorch's
    `native_dropout_backward` computes it.

    Example:
        >>> dx = bit_masked_scale(grad, packed, 1 / (1 - p))  # doctest: +SKIP
    """
    if not (_dense(grad) and fused_norm_available(grad)) or bits.numel() * 8 < grad.numel():
        raise ValueError("bit_masked_scale takes a dense gradient on a device its kernel runs on and at least one bit "
                         "a value; unpack the bits and call torch.ops.aten.native_dropout_backward elsewhere.")
    out = torch.empty_like(grad)
    with _on_device(grad):
        _bit_masked_scale[(triton.cdiv(grad.numel(), MASK_BLOCK),)](grad, bits, out, grad.numel(), float(scale),
                                                                    BLOCK=MASK_BLOCK, num_warps=4,
                                                                    **pdl_launch(grad))  # fmt: skip
    return out


__all__ = [
    "add_layer_norm_forward",
    "bit_masked_scale",
    "layer_norm_input_grad",
    "pack_bits",
    "block_for",
    "channels_last_rows",
    "cl_tile",
    "fused_norm_available",
    "geglu",
    "geglu_backward",
    "group_norm_act_backward",
    "group_norm_act_forward",
    "residual_sum",
]
