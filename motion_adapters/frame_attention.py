"""Attention over a few frames in one Triton kernel a pass: Show-1's temporal attention, forward and backward.

Show-1's temporal attention attends, at every pixel, over the frames (5 to 8) with 64 heads of 2 to 20 channels.
PyTorch runs that as flash attention, whose 128-query tiles are mostly padding there, or as the math kernel: a
head split copy, two batched matmuls of 8 x 8 x d, a softmax, a head merge copy, and in the backward pass their
gradients plus the kept probabilities (docs/performance.md: about a fifth of a training step's GPU time).

Here each (sequence, head) pair's scores, softmax and output stay in registers, in float32, with one rounding at
the output. Up to 8 frames, heads of 8 channels or more take the "dots" kernels (the default, `SHORT_KERNEL`): a
block of pairs a program as one block-diagonal attention of (pairs * frames) rows on tensor cores (`tl.dot`), the
other pairs' keys masked. Narrower heads take the "pairs" kernels: one thread takes one pair, its (frames x frames)
scores accumulated over a loop on the head's channels, so every reduction stays within the thread and no head
channel is padded; wide heads split their channels over a few threads, which add their partial scores
(`PAIRS_SPLIT`). Longer sequences ("tile" kernels) take a block of pairs a program as (pairs, frames, frames,
channels) products, their channels padded to a power of two. All read q, k and v where the projections wrote them,
(N, F, heads * d) with any row strides, so there is no head split or merge. The backward pass recomputes the
probabilities from q and k (nothing but q, k and v is kept) and writes dq, dk and dv in one kernel.
`projected_frame_attention` adds the q, k and v projections, one stacked GEMM each way.
`TRITON_INTERPRET=1` runs the kernels on CPU tensors (the tests do).
"""

from __future__ import annotations

import math

import torch

from motion_adapters.fused_norm import _on_device, fused_norm_available, interpreting, pdl_launch, triton

if triton is not None:
    import triton.language as tl

    from motion_adapters.fused_norm import _await_previous_kernel

#: The most values of the (pairs, frames, frames, padded head channels) products a "tile" program forms at once;
#: the pairs a program takes follow from it. Longer sequences or wider heads than this allows fall back to PyTorch.
TILE = 8192
#: The most frames (padded to a power of two) that the "pairs" kernels take: a thread holds a pair's
#: frames x frames scores, and 8 x 8 float32 values already take a quarter of its registers.
PAIRS_FRAMES = 8
#: Pairs a "pairs" program takes, one a thread. H200 (frame_attention_h200.json), forward and backward passes at
#: Show-1's training, interpolation and SR1 shapes together: 64 pairs in 2 warps took 1 / 1.13 of the time of 128
#: in 4, and 1 / 6.2 of the "tile" kernels'.
PAIRS_BLOCK = 64
#: The kernels for sequences of up to `PAIRS_FRAMES` frames: "pairs" (one thread a pair, float32 arithmetic on CUDA
#: cores) or "dots" (a block of pairs as one block-diagonal attention on tensor cores: (pairs * frames, head
#: channels) tiles of q, k and v, the products of all the block's rows formed and the other pairs' entries masked, so
#: `DOTS_ROWS / frames` times the useful products, on units that are otherwise idle in this kernel). On an H200,
#: "dots" with DOTS_ROWS = 32 at heads of 8 channels or more made training steps 1.046 times faster than "pairs"
#: (training_dots_h200.json, `full_dots32_wide_attention` against the then default `full`): the default, with
#: narrower heads left on "pairs" (`DOTS_MIN_CHANNELS`).
SHORT_KERNEL = "dots"
#: Rows (pairs * padded frames) a "dots" program takes; its score tile is DOTS_ROWS x DOTS_ROWS float32. 32 took
#: less than 64 and 128 at every show-1-base shape (frame_attention_dots_h200.json).
DOTS_ROWS = 32
#: With SHORT_KERNEL = "dots", heads of fewer channels than this stay on the "pairs" kernels: padded to tl.dot's 16
#: channels, heads of 5 (show-1-base's 40 x 64 level) took 75 / 164 us forward / backward on "dots" (32 rows)
#: against 56 / 140 on "pairs" (H200, frame_attention_dots_h200.json), where heads of 10 to 20 took 2.3 to 4 times
#: less on "dots"; at the cascade's shapes, heads of 2 and 4 were slower on "dots" too and heads of 8 faster
#: (frame_attention_cascade_dots_h200.json).
DOTS_MIN_CHANNELS = 8
#: Whether the "dots" kernels round the probabilities and their gradients to the inputs' half dtype for their
#: products (as flash attention does: one more bf16 rounding, 2**-9, before the output's) instead of tf32 products.
DOTS_HALF_PROBABILITIES = False
#: Wider heads split over up to this many lanes (threads) a pair, each lane taking `PAIRS_SPLIT_CHANNELS` or more
#: of the head's channels: at show-1-base's lower levels (heads of 10 and 20 channels, a few thousand pairs) one
#: thread a pair leaves the GPU mostly idle, each thread a long loop of dependent loads. The lanes of a pair add
#: their partial scores (and score gradients) together; `PAIRS_BLOCK // split` pairs a program. H200
#: (frame_attention_split_h200.json): 17 / 58 against 35 / 98 us forward / backward at 10 x 16, 9 / 18 against
#: 20 / 51 at 5 x 8; training steps 1.03 times faster (training_qkv_final_h200.json, `full_unsplit_attention`).
PAIRS_SPLIT = 4
PAIRS_SPLIT_CHANNELS = 5
#: How many iterations of their loops over a lane's channels the "pairs" kernels unroll: 0 all of them (the loads of
#: every channel issued together), 1 none (one channel's loads, then its arithmetic, in turn). Rolled, a lane waits
#: out the latency of its loads once a channel; and the backward kernel already holds more than a thread's 255
#: registers (its frames x frames probabilities and their gradients), so few threads share a multiprocessor to
#: hide it.
PAIRS_UNROLL = 0
#: Where the "pairs" backward kernel computes dv: "with_qk" (its second loop over a lane's channels, the output
#: gradient's channel loaded with q's and k's: the kernels measured so far), "last" (the second loop, that channel
#: loaded after dq and dk are written) or "first" (its first loop, beside the probabilities' gradient: each channel
#: of the output's gradient loaded once, and the second loop no longer holds the probabilities). ptxas (sm_90a, loops
#: unrolled): spills of heads of 10 and 20 channels of 176 / 148 bytes, 32 / 28 for "last", 72 / 40 for "first".
#: The other two not timed on a GPU yet (bench_training's `full_dv_last`, `full_dv_first`).
PAIRS_DV = "with_qk"
#: Whether the "pairs" kernels address q, k, v and their gradients with 32-bit offsets where every offset fits
#: (64-bit otherwise): each column's frame addresses take one register instead of two. ptxas (sm_90a,
#: benchmarks/results/ptxas_registers_sm90.json): with the loops unrolled (the default) the backward kernel spills
#: more (560 to 1,404 bytes), rolled it needs 224 to 230 registers and no spills. Not timed on a GPU yet
#: (bench_training's `full_rolled_int32_attention`), so off.
PAIRS_INT32_OFFSETS = False
#: Whether `projected_frame_attention` pads heads of fewer than `PADDED_HEAD` channels that would run on the
#: "pairs" kernels (show-1-base's 40 x 64 level: 64 heads of 5) to `PADDED_HEAD`: its stacked weight gets zero rows
#: after each head's, so the projection writes each head's channels 16 bytes apart and aligned, and the "padded
#: pairs" kernels load a lane's frame of q, k or v, and store one of dq, dk or dv, as one 16-byte access instead
#: of a 2-byte one a channel (sm_90a: 24 loads a thread where 120 were, forward; 24 stores where 120 were,
#: backward). The price: the three projection GEMMs 8 / 5 times wider there. Not timed on a GPU yet
#: (bench_training's `full_padded_heads`), so off.
PAIRS_PADDED_HEADS = False
#: The channels a padded head takes (`PAIRS_PADDED_HEADS`): 8 bf16 values, one 16-byte access.
PADDED_HEAD = 8
#: Whether `projected_frame_attention` keeps only x and the stacked weight for the backward pass and projects x
#: again there (one GEMM a layer more) instead of keeping the projection: at show-1-base's training shapes, 32
#: attentions a step, about 0.69 GB less kept (0.93 GB with padded heads), for a GEMM each of about 20 us. A
#: memory lever for the overlapped optimizer (`training_step.OVERLAP_OPTIMIZER`), whose gradient buffers add up to
#: 0.54 GB to the peak. Not timed on a GPU yet (bench_training's `full_overlap_recompute_qkv`), so off.
RECOMPUTE_PROJECTION = False
#: Whether `projected_frame_attention`'s backward pass has cuBLAS write float32 weights' gradient in float32
#: (`torch.mm(..., out_dtype=torch.float32)`) instead of rounding it to bf16 and casting it in a pass of its own:
#: training steps 1.007 times faster on an H200 (training_weight_grads_h200.json, `full_cast_weight_grads`).
WEIGHT_GRAD_OUT_DTYPE = True


def frame_attention_supported(q: torch.Tensor, heads: int, kv_length: int | None = None) -> str | None:
    """Why `frame_attention` cannot run on `q` (a sentence), or None when it can.

    Example:
        >>> frame_attention_supported(torch.zeros(4, 8, 640, device="cuda"), 64)  # doctest: +SKIP
    """
    if not fused_norm_available(q):
        return "Triton cannot run on this device" if triton is not None else "Triton is not installed"
    if q.ndim != 3:
        return f"queries of {q.ndim} dimensions, not (N, frames, channels)"
    if q.shape[-1] % heads:
        return f"{q.shape[-1]} channels do not split into {heads} heads"
    if kv_length is not None and kv_length != q.shape[1]:
        return "keys of another length than the queries"
    if _padded(q.shape[1]) > PAIRS_FRAMES and _padded(q.shape[1]) ** 2 * _padded(q.shape[-1] // heads) > TILE:
        return f"{q.shape[1]} frames of {q.shape[-1] // heads} channels a head do not fit one program"
    return None


def _padded(n: int) -> int:
    return max(2, triton.next_power_of_2(n)) if triton is not None else n


if triton is not None:

    @triton.jit
    def _load(ptr, sn, sf, n, h, f, d, mask, D: tl.constexpr):
        """The (pairs, frames, head channels) tile of pairs (n, h), in float32."""
        at = n[:, None, None] * sn + f[None, :, None] * sf + h[:, None, None] * D + d[None, None, :]
        return tl.load(ptr + at, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _store(ptr, value, sn, sf, n, h, f, d, mask, D: tl.constexpr):
        at = n[:, None, None] * sn + f[None, :, None] * sf + h[:, None, None] * D + d[None, None, :]
        tl.store(ptr + at, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pairs(P, F, HEADS: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
               BLOCK_P: tl.constexpr):  # fmt: skip
        """This program's (sequence, head) pairs, frame and channel indices, and the tile mask."""
        pair = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        f = tl.arange(0, FP)
        d = tl.arange(0, DP)
        mask = (pair < P)[:, None, None] & (f < F)[None, :, None] & (d < D)[None, None, :]
        return pair // HEADS, pair % HEADS, f, d, mask

    @triton.jit
    def _probabilities(q, k, F, scale, FP: tl.constexpr):
        """softmax(q k^T * scale) over the keys, (pairs, queries, keys); padded keys get no weight."""
        s = tl.sum(q[:, :, None, :] * k[:, None, :, :], axis=3) * scale
        s = tl.where((tl.arange(0, FP) < F)[None, None, :], s, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=2)[:, :, None])
        return e / tl.sum(e, axis=2)[:, :, None]

    @triton.jit
    def _frame_attention_forward(q_ptr, k_ptr, v_ptr, o_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, o_sn, o_sf,
                                 P, F, scale, HEADS: tl.constexpr, D: tl.constexpr, FP: tl.constexpr,
                                 DP: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        if PDL:
            _await_previous_kernel()
        n, h, f, d, mask = _pairs(P, F, HEADS, D, FP, DP, BLOCK_P)
        q = _load(q_ptr, q_sn, q_sf, n, h, f, d, mask, D)
        k = _load(k_ptr, k_sn, k_sf, n, h, f, d, mask, D)
        v = _load(v_ptr, v_sn, v_sf, n, h, f, d, mask, D)
        p = _probabilities(q, k, F, scale, FP)
        _store(o_ptr, tl.sum(p[:, :, :, None] * v[:, None, :, :], axis=2), o_sn, o_sf, n, h, f, d, mask, D)

    @triton.jit
    def _frame_attention_backward(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, q_sn, q_sf, k_sn, k_sf,
                                  v_sn, v_sf, do_sn, do_sf, g_sn, g_sf, P, F, scale, HEADS: tl.constexpr,
                                  D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
                                  BLOCK_P: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """dq, dk and dv (written with the strides g_sn, g_sf) from q, k, v and the output's gradient."""
        if PDL:
            _await_previous_kernel()
        n, h, f, d, mask = _pairs(P, F, HEADS, D, FP, DP, BLOCK_P)
        q = _load(q_ptr, q_sn, q_sf, n, h, f, d, mask, D)
        k = _load(k_ptr, k_sn, k_sf, n, h, f, d, mask, D)
        v = _load(v_ptr, v_sn, v_sf, n, h, f, d, mask, D)
        do = _load(do_ptr, do_sn, do_sf, n, h, f, d, mask, D)
        p = _probabilities(q, k, F, scale, FP)
        dv = tl.sum(p[:, :, :, None] * do[:, :, None, :], axis=1)
        dp = tl.sum(do[:, :, None, :] * v[:, None, :, :], axis=3)
        ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None]) * scale
        dq = tl.sum(ds[:, :, :, None] * k[:, None, :, :], axis=2)
        dk = tl.sum(ds[:, :, :, None] * q[:, :, None, :], axis=1)
        _store(dq_ptr, dq, g_sn, g_sf, n, h, f, d, mask, D)
        _store(dk_ptr, dk, g_sn, g_sf, n, h, f, d, mask, D)
        _store(dv_ptr, dv, g_sn, g_sf, n, h, f, d, mask, D)


    @triton.jit
    def _dots_rows(P, F, HEADS: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
                   BLOCK_P: tl.constexpr):  # fmt: skip
        """This program's rows (BLOCK_P pairs x FP frames) and padded head channels.

        Returns each row's sequence, head, frame and pair in the block, the channel indices and the (rows, channels)
        mask of the rows that exist (frame < F, pair < P) and the channels below D.
        """
        r = tl.arange(0, BLOCK_P * FP)
        pair = tl.program_id(0).to(tl.int64) * BLOCK_P + r // FP
        f = r % FP
        c = tl.arange(0, DP)
        mask = ((f < F) & (pair < P))[:, None] & (c < D)[None, :]
        return pair // HEADS, pair % HEADS, f, r // FP, c, mask

    @triton.jit
    def _dots_tile(ptr, sn, sf, n, h, f, c, mask, D: tl.constexpr, HALF_DOTS: tl.constexpr):
        """(rows, padded channels) of q, k, v or a gradient (0 outside `mask`).

        In its dtype for `tl.dot` with HALF_DOTS, else in float32 (exact for half values: the same products).
        """
        at = n[:, None] * sn + f[:, None] * sf + (h * D)[:, None] + c[None, :]
        x = tl.load(ptr + at, mask=mask, other=0.0)
        if not HALF_DOTS:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _dots_put(ptr, value, sn, sf, n, h, f, c, mask, D: tl.constexpr):
        at = n[:, None] * sn + f[:, None] * sf + (h * D)[:, None] + c[None, :]
        tl.store(ptr + at, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dots_qkv(q_ptr, k_ptr, v_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, P, F, HEADS: tl.constexpr, D: tl.constexpr,
                  FP: tl.constexpr, DP: tl.constexpr, BLOCK_P: tl.constexpr, HALF_DOTS: tl.constexpr):  # fmt: skip
        """This program's rows (`_dots_rows`) and their q, k and v tiles (`_dots_tile`)."""
        n, h, f, block, c, mask = _dots_rows(P, F, HEADS, D, FP, DP, BLOCK_P)
        q = _dots_tile(q_ptr, q_sn, q_sf, n, h, f, c, mask, D, HALF_DOTS)
        k = _dots_tile(k_ptr, k_sn, k_sf, n, h, f, c, mask, D, HALF_DOTS)
        v = _dots_tile(v_ptr, v_sn, v_sf, n, h, f, c, mask, D, HALF_DOTS)
        return n, h, f, block, c, mask, q, k, v

    @triton.jit
    def _mixed_dot(a, b, PRECISION: tl.constexpr, HALF_P: tl.constexpr):
        """The product `a @ b` of probabilities or their gradients (float32) and a tile of q, k, v or do, in float32.

        HALF_P: a rounded to b's (half) dtype, as flash attention does; else b in float32 and the product with
        PRECISION.
        """
        if HALF_P:
            return tl.dot(a.to(b.dtype), b)
        return tl.dot(a, b.to(tl.float32), input_precision=PRECISION)

    @triton.jit
    def _dots_probabilities(q, k, f, block, F, scale, PRECISION: tl.constexpr):
        """Softmax over the keys of the block's (rows x rows) scores, each row's own pair's frames below F only."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        own = (block[:, None] == block[None, :]) & (f < F)[None, :]
        s = tl.where(own, s, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        return e / tl.sum(e, axis=1)[:, None]

    @triton.jit
    def _dots_forward(q_ptr, k_ptr, v_ptr, o_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, o_sn, o_sf, P, F, scale,
                      HEADS: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, DP: tl.constexpr,
                      BLOCK_P: tl.constexpr, PRECISION: tl.constexpr, HALF_DOTS: tl.constexpr,
                      HALF_P: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """The block's output, softmax(q k^T * scale) v.

        q k^T in the inputs' dtype, the probabilities' product with v in float32 with PRECISION ("tf32" for half
        inputs, "ieee" for float32 ones) or with HALF_P in the inputs' dtype, both accumulated in float32.
        """
        if PDL:
            _await_previous_kernel()
        n, h, f, block, c, mask, q, k, v = _dots_qkv(q_ptr, k_ptr, v_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, P, F,
                                                     HEADS, D, FP, DP, BLOCK_P, HALF_DOTS)  # fmt: skip
        p = _dots_probabilities(q, k, f, block, F, scale, PRECISION)
        _dots_put(o_ptr, _mixed_dot(p, v, PRECISION, HALF_P), o_sn, o_sf, n, h, f, c, mask, D)

    @triton.jit
    def _dots_backward(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf,
                       do_sn, do_sf, g_sn, g_sf, P, F, scale, HEADS: tl.constexpr, D: tl.constexpr,
                       FP: tl.constexpr, DP: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
                       HALF_DOTS: tl.constexpr, HALF_P: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """dq, dk and dv (written with the strides g_sn, g_sf) from q, k, v and the output's gradient.

        The probabilities recomputed, then dv = p^T do, ds = p (do v^T - rowsum(p * do v^T)) * scale, dq = ds k,
        dk = ds^T q; the products with p and ds as in the forward pass (`_mixed_dot`).
        """
        if PDL:
            _await_previous_kernel()
        n, h, f, block, c, mask, q, k, v = _dots_qkv(q_ptr, k_ptr, v_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, P, F,
                                                     HEADS, D, FP, DP, BLOCK_P, HALF_DOTS)  # fmt: skip
        do = _dots_tile(do_ptr, do_sn, do_sf, n, h, f, c, mask, D, HALF_DOTS)
        p = _dots_probabilities(q, k, f, block, F, scale, PRECISION)
        _dots_put(dv_ptr, _mixed_dot(tl.trans(p), do, PRECISION, HALF_P), g_sn, g_sf, n, h, f, c, mask, D)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale
        _dots_put(dq_ptr, _mixed_dot(ds, k, PRECISION, HALF_P), g_sn, g_sf, n, h, f, c, mask, D)
        _dots_put(dk_ptr, _mixed_dot(tl.trans(ds), q, PRECISION, HALF_P), g_sn, g_sf, n, h, f, c, mask, D)

    @triton.jit
    def _pair_lanes(P, F, HEADS: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, BLOCK_P: tl.constexpr,
                    SPLIT: tl.constexpr, WIDE: tl.constexpr):  # fmt: skip
        """This program's lanes: SPLIT lanes a (sequence, head) pair, each taking ceil(D / SPLIT) of its channels.

        Where SPLIT does not divide D the last lanes take fewer, or none (`_column` masks channels past D). Returns
        each lane's sequence, head and first channel, the frame indices and the (frames, lanes) mask. WIDE: 64-bit
        offsets (some offset of the tensors does not fit 32 bits).
        """
        lane = tl.arange(0, BLOCK_P * SPLIT)
        program = tl.program_id(0)
        if WIDE:
            program = program.to(tl.int64)
        pair = program * BLOCK_P + lane // SPLIT
        f = tl.arange(0, FP)
        first = (lane % SPLIT) * ((D + SPLIT - 1) // SPLIT)
        return pair // HEADS, pair % HEADS, first, f, (f < F)[:, None] & (pair < P)[None, :]

    @triton.jit
    def _pair_total(x, FP: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr):
        """(frames, frames, lanes) sums over each lane's channels -> the pair's sum, in each of its lanes."""
        if SPLIT > 1:
            total = tl.sum(tl.reshape(x, (FP, FP, BLOCK_P, SPLIT)), axis=3)
            x = tl.reshape(tl.broadcast_to(total[:, :, :, None], (FP, FP, BLOCK_P, SPLIT)), (FP, FP, BLOCK_P * SPLIT))
        return x

    @triton.jit
    def _column(ptr, sn, sf, n, h, f, c, mask, D: tl.constexpr):
        """Head channel c (one a lane) of every frame of the lanes' pairs, (frames, lanes), in float32 (0 past D)."""
        at = f[:, None] * sf + (n * sn + h * D + c)[None, :]
        return tl.load(ptr + at, mask=mask & (c < D)[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _put_column(ptr, value, sn, sf, n, h, f, c, mask, D: tl.constexpr):
        at = f[:, None] * sf + (n * sn + h * D + c)[None, :]
        tl.store(ptr + at, value.to(ptr.dtype.element_ty), mask=mask & (c < D)[None, :])

    @triton.jit
    def _pair_probabilities(q_ptr, k_ptr, q_sn, q_sf, k_sn, k_sf, n, h, first, f, mask, F, scale, D: tl.constexpr,
                            FP: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr,
                            UNROLL: tl.constexpr):  # fmt: skip
        """softmax(q k^T * scale) over the keys, (queries, keys, lanes); padded keys get no weight."""
        s = tl.zeros((FP, FP, BLOCK_P * SPLIT), dtype=tl.float32)
        for i in tl.range(0, (D + SPLIT - 1) // SPLIT, loop_unroll_factor=UNROLL):
            s += _column(q_ptr, q_sn, q_sf, n, h, f, first + i, mask, D)[:, None, :] * \
                _column(k_ptr, k_sn, k_sf, n, h, f, first + i, mask, D)[None, :, :]
        return _pair_softmax(_pair_total(s, FP, BLOCK_P, SPLIT), f, F, scale)

    @triton.jit
    def _pair_softmax(s, f, F, scale):
        """softmax(s * scale) of (queries, keys, lanes) scores over the keys; keys from F on get no weight."""
        s = tl.where((f < F)[None, :, None], s * scale, float("-inf"))
        e = tl.exp(s - tl.max(s, axis=1)[:, None, :])
        return e / tl.sum(e, axis=1)[:, None, :]

    @triton.jit
    def _pairs_forward(q_ptr, k_ptr, v_ptr, o_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, o_sn, o_sf, P, F, scale,
                       HEADS: tl.constexpr, D: tl.constexpr, FP: tl.constexpr, BLOCK_P: tl.constexpr,
                       SPLIT: tl.constexpr, UNROLL: tl.constexpr, WIDE: tl.constexpr,
                       PDL: tl.constexpr = False):  # fmt: skip
        if PDL:
            _await_previous_kernel()
        n, h, first, f, mask = _pair_lanes(P, F, HEADS, D, FP, BLOCK_P, SPLIT, WIDE)
        p = _pair_probabilities(q_ptr, k_ptr, q_sn, q_sf, k_sn, k_sf, n, h, first, f, mask, F, scale, D, FP,
                                BLOCK_P, SPLIT, UNROLL)  # fmt: skip
        for i in tl.range(0, (D + SPLIT - 1) // SPLIT, loop_unroll_factor=UNROLL):
            v = _column(v_ptr, v_sn, v_sf, n, h, f, first + i, mask, D)
            _put_column(o_ptr, tl.sum(p * v[None, :, :], axis=1), o_sn, o_sf, n, h, f, first + i, mask, D)

    @triton.jit
    def _pairs_backward(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf,
                        do_sn, do_sf, g_sn, g_sf, P, F, scale, HEADS: tl.constexpr, D: tl.constexpr,
                        FP: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr,
                        UNROLL: tl.constexpr, WIDE: tl.constexpr, DV: tl.constexpr,
                        PDL: tl.constexpr = False):  # fmt: skip
        """dq, dk and dv (written with the strides g_sn, g_sf) from q, k, v and the output's gradient.

        DV: where dv is computed (`PAIRS_DV`).
        """
        if PDL:
            _await_previous_kernel()
        n, h, first, f, mask = _pair_lanes(P, F, HEADS, D, FP, BLOCK_P, SPLIT, WIDE)
        p = _pair_probabilities(q_ptr, k_ptr, q_sn, q_sf, k_sn, k_sf, n, h, first, f, mask, F, scale, D, FP,
                                BLOCK_P, SPLIT, UNROLL)  # fmt: skip
        dp = tl.zeros((FP, FP, BLOCK_P * SPLIT), dtype=tl.float32)
        for i in tl.range(0, (D + SPLIT - 1) // SPLIT, loop_unroll_factor=UNROLL):
            c = first + i
            do = _column(do_ptr, do_sn, do_sf, n, h, f, c, mask, D)
            dp += do[:, None, :] * _column(v_ptr, v_sn, v_sf, n, h, f, c, mask, D)[None, :, :]
            if DV == "first":
                _put_column(dv_ptr, tl.sum(p * do[:, None, :], axis=0), g_sn, g_sf, n, h, f, c, mask, D)
        dp = _pair_total(dp, FP, BLOCK_P, SPLIT)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None, :]) * scale
        for i in tl.range(0, (D + SPLIT - 1) // SPLIT, loop_unroll_factor=UNROLL):
            c = first + i
            q = _column(q_ptr, q_sn, q_sf, n, h, f, c, mask, D)
            k = _column(k_ptr, k_sn, k_sf, n, h, f, c, mask, D)
            if DV == "with_qk":
                do = _column(do_ptr, do_sn, do_sf, n, h, f, c, mask, D)
            _put_column(dq_ptr, tl.sum(ds * k[None, :, :], axis=1), g_sn, g_sf, n, h, f, c, mask, D)
            _put_column(dk_ptr, tl.sum(ds * q[:, None, :], axis=0), g_sn, g_sf, n, h, f, c, mask, D)
            if DV == "last":
                do = _column(do_ptr, do_sn, do_sf, n, h, f, c, mask, D)
            if DV != "first":
                _put_column(dv_ptr, tl.sum(p * do[:, None, :], axis=0), g_sn, g_sf, n, h, f, c, mask, D)

    @triton.jit
    def _eight_columns(x):
        """The 8 channels of a (frames, lanes, 8) tile as 8 (frames, lanes) columns, in channel order."""
        even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 4, 2)))  # channels 0, 2, 4, 6 and 1, 3, 5, 7
        x04, x26 = tl.split(tl.reshape(even, (x.shape[0], x.shape[1], 2, 2)))
        x15, x37 = tl.split(tl.reshape(odd, (x.shape[0], x.shape[1], 2, 2)))
        x0, x4 = tl.split(x04)
        x2, x6 = tl.split(x26)
        x1, x5 = tl.split(x15)
        x3, x7 = tl.split(x37)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _padded_head(ptr, sn, sf, n, h, f, mask, HS: tl.constexpr):
        """The HS (8) channels of the lanes' padded heads, every frame, as 8 (frames, lanes) float32 columns.

        One (frames, lanes, HS) load: a lane's frame is HS contiguous values at a multiple of HS, one 16-byte load.
        """
        at = f[:, None, None] * sf + (n * sn + h * HS)[None, :, None] + tl.arange(0, HS)[None, None, :]
        return _eight_columns(tl.load(ptr + at, mask=mask[:, :, None], other=0.0).to(tl.float32))

    @triton.jit
    def _put_padded_head(ptr, x0, x1, x2, x3, x4, x5, x6, x7, sn, sf, n, h, f, mask, HS: tl.constexpr):
        """Store 8 (frames, lanes) columns as the lanes' padded heads, one 16-byte store a lane and frame."""
        shape: tl.constexpr = (x0.shape[0], x0.shape[1], 4)
        even = tl.reshape(tl.join(tl.join(x0, x4), tl.join(x2, x6)), shape)  # channels 0, 2, 4, 6
        odd = tl.reshape(tl.join(tl.join(x1, x5), tl.join(x3, x7)), shape)
        x = tl.reshape(tl.join(even, odd), (x0.shape[0], x0.shape[1], 8))
        at = f[:, None, None] * sf + (n * sn + h * HS)[None, :, None] + tl.arange(0, HS)[None, None, :]
        tl.store(ptr + at, x.to(ptr.dtype.element_ty), mask=mask[:, :, None])

    @triton.jit
    def _padded_scores(q, k, D: tl.constexpr):
        """(queries, keys, lanes) sums over the first D of 8 channels of q and k's columns."""
        s = q[0][:, None, :] * k[0][None, :, :]
        for i in tl.static_range(1, D):
            s += q[i][:, None, :] * k[i][None, :, :]
        return s

    @triton.jit
    def _keys_contracted(a, x, i: tl.constexpr, D: tl.constexpr):
        """The sum over keys of a (queries, keys, lanes) * column i of x on the keys; zeros for a padding column."""
        if i < D:
            return tl.sum(a * x[i][None, :, :], axis=1)
        return tl.zeros((a.shape[0], a.shape[2]), tl.float32)

    @triton.jit
    def _queries_contracted(a, x, i: tl.constexpr, D: tl.constexpr):
        """The sum over queries of a (queries, keys, lanes) * column i of x on the queries; zeros for padding."""
        if i < D:
            return tl.sum(a * x[i][:, None, :], axis=0)
        return tl.zeros((a.shape[1], a.shape[2]), tl.float32)

    @triton.jit
    def _padded_pairs_forward(q_ptr, k_ptr, v_ptr, o_ptr, q_sn, q_sf, k_sn, k_sf, v_sn, v_sf, o_sn, o_sf, P, F,
                              scale, HEADS: tl.constexpr, D: tl.constexpr, HS: tl.constexpr, FP: tl.constexpr,
                              BLOCK_P: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
        """The "pairs" forward kernel on q, k and v whose heads of D channels lie HS (8) apart (`PAIRS_PADDED_HEADS`).

        The output's heads are D channels apart, as the attention's output layer takes them.
        """
        if PDL:
            _await_previous_kernel()
        n, h, first, f, mask = _pair_lanes(P, F, HEADS, D, FP, BLOCK_P, 1, WIDE)
        q = _padded_head(q_ptr, q_sn, q_sf, n, h, f, mask, HS)
        k = _padded_head(k_ptr, k_sn, k_sf, n, h, f, mask, HS)
        p = _pair_softmax(_padded_scores(q, k, D), f, F, scale)
        v = _padded_head(v_ptr, v_sn, v_sf, n, h, f, mask, HS)
        for i in tl.static_range(D):
            _put_column(o_ptr, _keys_contracted(p, v, i, D), o_sn, o_sf, n, h, f, first + i, mask, D)

    @triton.jit
    def _column_or_zero(ptr, sn, sf, n, h, f, first, i: tl.constexpr, mask, D: tl.constexpr):
        """Channel i of the lanes' heads of D channels (`_column`), or zeros for a padding channel (i >= D).

        `first` is `_pair_lanes`' channel 0 of each lane (one lane a pair: a vector of zeros).
        """
        if i < D:
            return _column(ptr, sn, sf, n, h, f, first + i, mask, D)
        return tl.zeros((f.shape[0], mask.shape[1]), tl.float32)

    @triton.jit
    def _padded_pairs_backward(q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, q_sn, q_sf, k_sn, k_sf, v_sn,
                               v_sf, do_sn, do_sf, g_sn, g_sf, P, F, scale, HEADS: tl.constexpr, D: tl.constexpr,
                               HS: tl.constexpr, FP: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr,
                               PDL: tl.constexpr = False):  # fmt: skip
        """dq, dk and dv in padded heads (padding channels written 0) from padded q, k, v and the output's gradient.

        The output's gradient has heads D channels apart, as the attention's output layer hands it back.

        q and k are loaded again for dq and dk (16-byte loads that hit the cache) rather than held beside the
        probabilities and their gradients.
        """
        if PDL:
            _await_previous_kernel()
        n, h, first, f, mask = _pair_lanes(P, F, HEADS, D, FP, BLOCK_P, 1, WIDE)
        p = _pair_softmax(_padded_scores(_padded_head(q_ptr, q_sn, q_sf, n, h, f, mask, HS),
                                         _padded_head(k_ptr, k_sn, k_sf, n, h, f, mask, HS), D), f, F, scale)
        do = (_column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 0, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 1, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 2, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 3, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 4, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 5, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 6, mask, D),
              _column_or_zero(do_ptr, do_sn, do_sf, n, h, f, first, 7, mask, D))  # fmt: skip
        dp = _padded_scores(do, _padded_head(v_ptr, v_sn, v_sf, n, h, f, mask, HS), D)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None, :]) * scale
        _put_padded_head(dv_ptr, _queries_contracted(p, do, 0, D), _queries_contracted(p, do, 1, D),
                         _queries_contracted(p, do, 2, D), _queries_contracted(p, do, 3, D),
                         _queries_contracted(p, do, 4, D), _queries_contracted(p, do, 5, D),
                         _queries_contracted(p, do, 6, D), _queries_contracted(p, do, 7, D),
                         g_sn, g_sf, n, h, f, mask, HS)  # fmt: skip
        k = _padded_head(k_ptr, k_sn, k_sf, n, h, f, mask, HS)
        _put_padded_head(dq_ptr, _keys_contracted(ds, k, 0, D), _keys_contracted(ds, k, 1, D),
                         _keys_contracted(ds, k, 2, D), _keys_contracted(ds, k, 3, D), _keys_contracted(ds, k, 4, D),
                         _keys_contracted(ds, k, 5, D), _keys_contracted(ds, k, 6, D), _keys_contracted(ds, k, 7, D),
                         g_sn, g_sf, n, h, f, mask, HS)  # fmt: skip
        q = _padded_head(q_ptr, q_sn, q_sf, n, h, f, mask, HS)
        _put_padded_head(dk_ptr, _queries_contracted(ds, q, 0, D), _queries_contracted(ds, q, 1, D),
                         _queries_contracted(ds, q, 2, D), _queries_contracted(ds, q, 3, D),
                         _queries_contracted(ds, q, 4, D), _queries_contracted(ds, q, 5, D),
                         _queries_contracted(ds, q, 6, D), _queries_contracted(ds, q, 7, D),
                         g_sn, g_sf, n, h, f, mask, HS)  # fmt: skip

def _split(d: int) -> int:
    """Lanes a pair of `d` channels takes in the "pairs" kernels.

    The most, a power of two up to `PAIRS_SPLIT`, that leave each lane `PAIRS_SPLIT_CHANNELS` or more (rounded up).
    """
    split = 1
    while split * 2 <= PAIRS_SPLIT and -(-d // (split * 2)) >= PAIRS_SPLIT_CHANNELS:
        split *= 2
    return split


def padded_head(frames: int, head_channels: int) -> int:
    """The channels `projected_frame_attention` gives each head of `head_channels` at `frames` frames in memory.

    `PADDED_HEAD` where `PAIRS_PADDED_HEADS` pads it (heads narrower than that but wider than half of it, so that
    the projection grows by less than 8 / 5, which the "pairs" kernels take, one lane a pair), else `head_channels`.

    Example:
        >>> padded_head(8, 5) in (5, PADDED_HEAD)
        True
    """
    pairs = _padded(frames) <= PAIRS_FRAMES and (SHORT_KERNEL == "pairs" or head_channels < DOTS_MIN_CHANNELS)
    narrow = PADDED_HEAD // 2 < head_channels < PADDED_HEAD and _split(head_channels) == 1
    pad = PAIRS_PADDED_HEADS and pairs and narrow
    return PADDED_HEAD if pad else head_channels


def _launch(q: torch.Tensor, heads: int, kernel: str | None = None, block: int | None = None,
            num_warps: int | None = None, split: int | None = None, unroll: int | None = None,
            head_channels: int | None = None) -> tuple[tuple, tuple[int], dict]:  # fmt: skip
    """The (forward, backward) kernels, grid and shape constants of a launch over `q`'s (N * heads) pairs.

    `kernel` ("pairs", "dots" or "tile"), `block` (pairs a program), `num_warps`, `split` (lanes a pair) and `unroll`
    (`PAIRS_UNROLL`; these two "pairs" only) override the choice for benchmarks. `kernel="padded"` launches the
    "padded pairs" kernels on q, k and v of `head_channels` a head padded to `PADDED_HEAD` (`PAIRS_PADDED_HEADS`).
    """
    n, frames, channels = q.shape
    fp, d = _padded(frames), channels // heads
    if kernel == "padded":
        block = block or PAIRS_BLOCK
        meta = {"HEADS": heads, "D": head_channels, "HS": PADDED_HEAD, "FP": fp, "BLOCK_P": block,
                "num_warps": num_warps or max(1, block // 32)}  # fmt: skip
        return (_padded_pairs_forward, _padded_pairs_backward), (triton.cdiv(n * heads, block),), meta
    if not kernel:
        kernel = SHORT_KERNEL if fp <= PAIRS_FRAMES else "tile"
        if kernel == "dots" and d < DOTS_MIN_CHANNELS:
            kernel = "pairs"
    if kernel == "dots":
        dp = max(16, _padded(d))  # tl.dot's smallest inner dimension
        block = block or max(1, max(DOTS_ROWS, fp) // fp)
        meta = {"HEADS": heads, "D": d, "FP": fp, "DP": dp, "BLOCK_P": block,
                "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
                # Triton's interpreter (3.9) multiplies bf16 tiles wrongly in tl.dot: float32 tiles there
                "HALF_DOTS": q.dtype != torch.float32 and not interpreting(),
                "HALF_P": DOTS_HALF_PROBABILITIES and q.dtype != torch.float32 and not interpreting(),
                "num_warps": num_warps or max(1, block * fp // 16)}  # fmt: skip
        return (_dots_forward, _dots_backward), (triton.cdiv(n * heads, block),), meta
    if kernel == "pairs":
        split = split or _split(d)
        if split & (split - 1) or split > triton.next_power_of_2(d):
            raise ValueError(f"split={split} must be a power of two up to the {d} channels a head (rounded up).")
        block = block or max(1, PAIRS_BLOCK // split)
        lanes = block * split
        meta = {"HEADS": heads, "D": d, "FP": fp, "BLOCK_P": block, "SPLIT": split,
                "UNROLL": (PAIRS_UNROLL if unroll is None else unroll) or -(-d // split),
                "num_warps": num_warps or max(1, lanes // 32)}  # fmt: skip
        return (_pairs_forward, _pairs_backward), (triton.cdiv(n * heads, block),), meta
    dp = _padded(d)
    block = block or max(1, TILE // (fp * fp * dp))
    meta = {"HEADS": heads, "D": d, "FP": fp, "DP": dp, "BLOCK_P": block, "num_warps": num_warps or 4}
    return (_frame_attention_forward, _frame_attention_backward), (triton.cdiv(n * heads, block),), meta


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether some element of the (N, F, C) `tensors` lies 2**31 or more elements past its tensor's start.

    Always True without `PAIRS_INT32_OFFSETS`.
    """
    return not PAIRS_INT32_OFFSETS or any(
        sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31 for t in tensors)


def _pairs_meta(meta: dict, *tensors: torch.Tensor, backward: bool = False) -> dict:
    """`meta` with the "pairs" kernels' offset width (and, backward, where dv is written); others' unchanged."""
    if "SPLIT" not in meta and "HS" not in meta:
        return meta
    if backward and PAIRS_DV not in ("with_qk", "last", "first"):
        raise ValueError(f"PAIRS_DV={PAIRS_DV!r} must be 'with_qk', 'last' or 'first'.")
    return {**meta, "WIDE": _wide(*tensors), **({"DV": PAIRS_DV} if backward and "SPLIT" in meta else {})}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with unit channel stride (a copy only when it has another)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, k, v, heads: int) -> None:
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape (N, frames, channels); got {q.shape}, {k.shape}, {v.shape}.")
    reason = frame_attention_supported(q, heads)
    if reason is not None:
        raise ValueError(f"frame_attention cannot run here: {reason}. Use torch's scaled_dot_product_attention.")


def _attend(q, k, v, out, heads: int, scale: float, launch: tuple = ()) -> None:
    """Run the forward kernel on (N, F, heads * d) q, k, v (unit channel stride), writing `out` (same shape).

    `launch`: `_launch`'s arguments after `heads` (with "padded" kernels, q, k and v's heads `PADDED_HEAD` apart,
    `out`'s as many as its head channels, the last of them: `_padded_launch`).
    """
    (forward, _), grid, meta = _launch(q, heads, *launch)
    meta = _pairs_meta(meta, q, k, v, out)
    with _on_device(q):
        forward[grid](q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      out.stride(0), out.stride(1), q.shape[0] * heads, q.shape[1], scale, **meta,
                      **pdl_launch(q))  # fmt: skip


def _attend_backward(q, k, v, grad, dq, dk, dv, heads: int, scale: float, launch: tuple = ()) -> None:
    """Run the backward kernel, writing dq, dk and dv (one set of strides for the three; `launch` as `_attend`'s)."""
    (_, backward), grid, meta = _launch(q, heads, *launch)
    meta = _pairs_meta(meta, q, k, v, grad, dq, dk, dv, backward=True)
    with _on_device(q):
        backward[grid](q, k, v, grad, dq, dk, dv, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                       v.stride(1), grad.stride(0), grad.stride(1), dq.stride(0), dq.stride(1), q.shape[0] * heads,
                       q.shape[1], scale, **meta, **pdl_launch(q))  # fmt: skip


class _FrameAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float, launch: tuple = ()):
        q, k, v = _rows(q), _rows(k), _rows(v)
        out = torch.empty_like(q)  # q's strides where they are dense: a view of rows in frames-first order stays one
        _attend(q, k, v, out, heads, scale, launch)
        ctx.save_for_backward(q, k, v)
        ctx.heads, ctx.scale, ctx.launch = heads, scale, launch
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        grad = _rows(grad.to(q.dtype))
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        _attend_backward(q, k, v, grad, dq, dk, dv, ctx.heads, ctx.scale, ctx.launch)
        return dq, dk, dv, None, None, None


def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    scale: float | None = None) -> torch.Tensor:  # fmt: skip
    """Multi-head self-attention of (N, F, heads * d) projections over their F positions, heads merged.

    The same function as splitting the heads, `scaled_dot_product_attention` (scale `1 / sqrt(d)` unless given)
    and merging them, for sequences of a few frames: see the module docstring. Differentiable in q, k and v.

    Raises:
        ValueError: shapes that differ, channels `heads` does not divide, a device Triton cannot run on, or more
            frames or wider heads than one program holds (`frame_attention_supported` says which).

    Example:
        >>> q = torch.randn(2560, 8, 320, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> frame_attention(q, q, q, heads=64).shape  # doctest: +SKIP
        torch.Size([2560, 8, 320])
    """
    _check(q, k, v, heads)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1] // heads)
    return _FrameAttention.apply(q, k, v, heads, float(scale))


class _ProjectedFrameAttention(torch.autograd.Function):
    """q, k and v projected from the same token rows in one GEMM, then `frame_attention`, as one function.

    `x` is (frames * N, C) rows in frames-first order; the three weights are stacked into one (3 * out, C) matrix,
    so the forward pass runs one GEMM where three ran, and the backward pass one GEMM for the input's gradient (the
    three projections' gradients summed inside it, in float32, where autograd ran three GEMMs and added their bf16
    results) and one for the stacked weight gradient (three before, each cast to the weights' dtype on its own).
    The attention kernels read q, k and v as column blocks of the projection and write their gradients into the
    column blocks of one matrix. Keeps x, the projection (unless `RECOMPUTE_PROJECTION`) and the stacked weight in
    the compute dtype. On CUDA the float32 weights' gradient comes out of the GEMM in float32 (`_weight_grad`).
    Where `padded_head` pads the heads, the stacked weight has zero rows after each head's (`_stacked_weight`), and
    the projection and its gradient hold each head in `PADDED_HEAD` channels.
    """

    @staticmethod
    def forward(ctx, x, wq, wk, wv, frames: int, heads: int, scale: float, weight_grad=None, ready=None,
                stacked=None):  # fmt: skip
        if ready is not None:  # the weights are written on another stream (`projected_frame_attention`)
            torch.cuda.current_stream(x.device).wait_event(ready)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        d = wq.shape[0] // heads
        width = padded_head(frames, d)
        with torch.autocast(device_type, enabled=False):
            x = x.to(dtype)
            if stacked is not None and stacked.dtype == dtype and stacked.shape == (3 * heads * width, wq.shape[1]):
                weight = stacked  # written by the caller (`projected_frame_attention`)
            else:
                weight = _stacked_weight((wq, wk, wv), heads, width, dtype)
            projected = x @ weight.t()  # (frames * N, 3 * heads * width)
            q, k, v = _pair_blocks(projected, frames)
            out = torch.empty((frames, q.shape[0], wq.shape[0]), dtype=dtype, device=x.device)
            # (N, frames, out) view: the rows come back in frames-first order
            _attend(q, k, v, out.transpose(0, 1), heads, scale, _padded_launch(d, width))
        ctx.save_for_backward(x, None if RECOMPUTE_PROJECTION else projected, weight)
        ctx.frames, ctx.heads, ctx.scale, ctx.width = frames, heads, scale, width
        ctx.weight_dtype = wq.dtype
        ctx.weight_grad = weight_grad
        return out.view(-1, out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, projected, weight = ctx.saved_tensors
        if projected is None:  # RECOMPUTE_PROJECTION
            projected = x @ weight.t()
        frames, heads, width = ctx.frames, ctx.heads, ctx.width
        grad_pairs = _rows(grad.to(x.dtype)).unflatten(0, (frames, -1)).transpose(0, 1)
        grad_projected = torch.empty_like(projected)
        _attend_backward(*_pair_blocks(projected, frames), grad_pairs, *_pair_blocks(grad_projected, frames),
                         heads, ctx.scale, _padded_launch(grad.shape[-1] // heads, width))  # fmt: skip
        grad_x = grad_projected @ weight if ctx.needs_input_grad[0] else None
        grad_weights = [None] * 3
        if any(ctx.needs_input_grad[1:4]):
            d = grad.shape[-1] // heads
            out = ctx.weight_grad if width == d else None
            grad_weight = _weight_grad(grad_projected, x, ctx.weight_dtype, out)
            if width != d:  # the padding rows' gradients (0) left out
                grad_weight = grad_weight.view(3, heads, width, -1)[:, :, :d]
                grad_weight = grad_weight.reshape(3 * heads * d, -1) if ctx.weight_grad is None else \
                    ctx.weight_grad.view(3, heads, d, -1).copy_(grad_weight).view(3 * heads * d, -1)  # fmt: skip
            grad_weights = grad_weight.chunk(3)
        return grad_x, *grad_weights, None, None, None, None, None, None


def _stacked_weight(weights: tuple[torch.Tensor, ...], heads: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, C) weights stacked into one (len(weights) * heads * width, C) matrix in `dtype`.

    Each head's rows followed by `width - out / heads` zero rows (none where width is a head's channels).
    """
    out, channels = weights[0].shape
    empty = weights[0].new_empty if width == out // heads else weights[0].new_zeros
    return write_stacked_weight(empty((len(weights) * heads * width, channels), dtype=dtype), weights, heads)


def write_stacked_weight(stacked: torch.Tensor, weights: tuple[torch.Tensor, ...], heads: int) -> torch.Tensor:
    """Write the (out, C) `weights` into `stacked` as `projected_frame_attention` stacks them, and return it.

    `stacked` is (len(weights) * heads * width, C) in the compute dtype, width the channels a head takes there
    (`padded_head`); the rows past each head's channels are left as they are (zero, for padded heads).

    Example:
        >>> w = torch.ones(4, 3)
        >>> write_stacked_weight(torch.empty(12, 3), (w, 2 * w, 3 * w), heads=2)[:, 0].tolist()
        [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    """
    out, channels = weights[0].shape
    d = out // heads
    width = stacked.shape[0] // (len(weights) * heads)
    with torch.no_grad():  # the values only: `_ProjectedFrameAttention` gives the weights their gradients
        if width == d:
            return torch.cat(weights, out=stacked)
        view = stacked.view(len(weights), heads, width, channels)
        for i, weight in enumerate(weights):
            view[i, :, :d].copy_(weight.view(heads, d, channels))
    return stacked


def _padded_launch(head_channels: int, width: int) -> tuple:
    """`_attend`'s `launch` for q, k and v whose heads of `head_channels` lie `width` apart."""
    return ("padded", None, None, None, None, head_channels) if width != head_channels else ()


def _pair_blocks(rows: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v column blocks of (frames * N, 3 * out) frames-first rows, each an (N, frames, out) view."""
    return tuple(block.unflatten(0, (frames, -1)).transpose(0, 1) for block in rows.chunk(3, dim=1))


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """`grad.T @ x` in `dtype`, written into `out` when given (a tensor of that shape and dtype).

    On CUDA, float32 weights' gradient comes from the GEMM's float32 accumulator (no bf16 rounding, no cast pass);
    elsewhere the product is in x's dtype, then cast.
    """
    half = x.dtype in (torch.bfloat16, torch.float16)
    if WEIGHT_GRAD_OUT_DTYPE and x.is_cuda and dtype == torch.float32 and half:
        return torch.mm(grad.t(), x, out_dtype=dtype, **({} if out is None else {"out": out}))
    product = (grad.t() @ x).to(dtype)
    return product if out is None else out.copy_(product)


def projected_frame_attention_supported(x: torch.Tensor, out_features: int, frames: int, heads: int) -> str | None:
    """Why `projected_frame_attention` cannot attend over projections of `out_features` of rows `x`, or None.

    What `frame_attention_supported` says of the (rows / frames, frames, out_features) projections.
    """
    return frame_attention_supported(x.new_empty(()).expand(x.shape[0] // frames, frames, out_features), heads)


def projected_frame_attention(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, frames: int,
                              heads: int, scale: float | None = None, weight_grad: torch.Tensor | None = None,
                              ready: torch.cuda.Event | None = None,
                              stacked: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """`frame_attention` of the bias-free projections `x @ wq.T`, `x @ wk.T`, `x @ wv.T` of (frames * N, C) rows.

    `x` holds each frame's N tokens together (frames-first order); the output is (frames * N, out) in the same
    order. The same function as projecting with three linear layers and calling `frame_attention`, in one GEMM each
    way (`_ProjectedFrameAttention`); under autocast, in its dtype. Differentiable in x and the three weights.

    `weight_grad`: a (3 * out, C) tensor of the weights' dtype that the backward pass writes the three weights'
    gradients into (stacked), returning its row blocks as their gradients: memory that outlives the pass, for an
    optimizer that reads them later (`training_step.OVERLAP_OPTIMIZER`). `ready`: a CUDA event the forward pass
    waits for (on the current stream) before it reads the weights, which another stream writes. `stacked`: the
    three weights already stacked in the compute dtype (`write_stacked_weight`, the caller vouching that it holds
    their values when `ready` fires), used where its shape and dtype are those of the stacking it replaces.

    Raises:
        ValueError: weights of different shapes or not matching x's channels, rows that `frames` does not divide,
            or what `frame_attention` cannot run (`frame_attention_supported`).

    Example:
        >>> x = torch.randn(8 * 2560, 320, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> w = torch.randn(320, 320, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> projected_frame_attention(x, w, w, w, frames=8, heads=64).shape  # doctest: +SKIP
        torch.Size([20480, 320])
    """
    if not (wq.shape == wk.shape == wv.shape) or wq.ndim != 2 or wq.shape[1] != x.shape[-1] or x.ndim != 2:
        raise ValueError(f"x must be (rows, C) and the weights (out, C) alike; got x {tuple(x.shape)}, weights "
                         f"{tuple(wq.shape)}, {tuple(wk.shape)}, {tuple(wv.shape)}.")  # fmt: skip
    if x.shape[0] % frames:
        raise ValueError(f"{x.shape[0]} rows do not split into frames={frames}.")
    reason = projected_frame_attention_supported(x, wq.shape[0], frames, heads)
    if reason is not None:
        raise ValueError(f"projected_frame_attention cannot run here: {reason}.")
    if weight_grad is not None and (weight_grad.shape != (3 * wq.shape[0], wq.shape[1]) or
                                    weight_grad.dtype != wq.dtype or weight_grad.device != wq.device or
                                    not weight_grad.is_contiguous()):  # fmt: skip
        raise ValueError(f"weight_grad must be a contiguous ({3 * wq.shape[0]}, {wq.shape[1]}) {wq.dtype} tensor on "
                         f"{wq.device}; got {tuple(weight_grad.shape)} {weight_grad.dtype} on {weight_grad.device}.")
    if scale is None:
        scale = 1.0 / math.sqrt(wq.shape[0] // heads)
    return _ProjectedFrameAttention.apply(x, wq, wk, wv, frames, heads, float(scale), weight_grad, ready, stacked)


#: Attributes of an attention layer that `layout`'s temporal self-attention hands `projected_frame_attention` as its
#: `weight_grad`, `ready` and `stacked` (set by `training_step.StepRunner` when it overlaps the optimizer with the
#: forward pass).
WEIGHT_GRAD_ATTR = "_motion_adapters_weight_grad"
WEIGHTS_READY_ATTR = "_motion_adapters_weights_ready"
STACKED_WEIGHT_ATTR = "_motion_adapters_stacked_weight"


class FrameAttnProcessor:
    """A diffusers attention processor for temporal self-attention on `frame_attention`.

    It runs the fused kernel where the layer is plain self-attention over frames (3-d hidden states, no mask, no
    group, spatial or q/k norm) and the shapes fit; any other call goes to PyTorch's processor
    (`AttnProcessor2_0`), so the result is the same function either way.

    Example:
        >>> attn.set_processor(FrameAttnProcessor())  # doctest: +SKIP
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._fallback = AttnProcessor2_0()

    @staticmethod
    def _plain(attn, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        """Self-attention over 3-d hidden states with no mask and no group, spatial or q/k norm."""
        return (
            attention_mask is None and encoder_hidden_states is None and hidden_states.ndim == 3
            and attn.spatial_norm is None and attn.group_norm is None
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
        )  # fmt: skip

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):  # fmt: skip
        """The layer's output, as `AttnProcessor2_0` computes it."""
        if args or kwargs or not self._plain(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        return attention_output(attn, attend(attn, q, k, v), hidden_states)


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attn`'s heads over the frames of (N, F, heads * d) projections, heads merged.

    `frame_attention` where it runs (its output in q's strides), else what `AttnProcessor2_0` computes from the same
    projections.
    """
    if frame_attention_supported(q, attn.heads) is None:
        return frame_attention(q, k, v, attn.heads)
    split = [t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2).to(q.dtype)


def attention_output(attn, out: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The rest of a diffusers attention layer after its heads: output projection, dropout, residual, rescale."""
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    # a pass over the output for a factor that is almost always 1 (exactly the same values without it)
    return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor


__all__ = [
    "FrameAttnProcessor",
    "attend",
    "attention_output",
    "frame_attention",
    "frame_attention_supported",
    "projected_frame_attention",
    "projected_frame_attention_supported",
]
