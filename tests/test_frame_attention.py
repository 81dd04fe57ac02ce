"""The Triton frame-attention kernels: compiled on a GPU, else in Triton's interpreter (conftest.py sets it)."""

import pytest
import torch

from motion_adapters import frame_attention as fa
from motion_adapters import fused_norm
from motion_adapters.config import MotionDistillationConfig
from motion_adapters.training import train_motion

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: The library's choice for up to 8 frames; the tests below pin "pairs" (`_pairs_unless_asked`)
DEFAULT_SHORT_KERNEL = fa.SHORT_KERNEL


@pytest.fixture(autouse=True)
def _pairs_unless_asked(monkeypatch):
    """The tests here take the "pairs" kernels for up to 8 frames unless they set `SHORT_KERNEL` themselves (the
    default, "dots" at heads of 8 channels or more, is `test_up_to_8_frames_run_...`'s)."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", "pairs")


@pytest.fixture(autouse=True)
def _kernels_can_run():
    if fa.frame_attention_supported(torch.zeros(1, 2, 4, device=DEVICE), 2) is not None:
        pytest.fail("the kernels cannot run here: TRITON_INTERPRET=1 must be set before triton is imported")


def reference(q, k, v, heads):
    """Heads split, PyTorch's SDPA in float64, heads merged: what AttnProcessor2_0 computes."""
    split = [t.double().unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)


@pytest.mark.parametrize(
    ("n", "frames", "channels", "heads"),
    [
        (6, 8, 320, 64),  # show-1-base's top level: 64 heads of 5
        (5, 5, 128, 64),  # an interpolation window: 5 frames (padded to 8), heads of 2 (SR1's top level)
        (3, 8, 80, 4),  # heads of 20, fewer pairs a program
        (17, 3, 24, 2),  # pairs that do not fill the last program
        (3, 12, 32, 8),  # 12 frames: past the "pairs" kernels' 8 by default
    ],
)
@pytest.mark.parametrize("kernel", ["pairs", "tile", "dots"])
def test_output_and_gradients_match_float64_attention(n, frames, channels, heads, kernel, monkeypatch):
    launch, ran = fa._launch, []

    def forced(*args):
        kernels, grid, meta = launch(*args, kernel)
        ran.append(kernels[0].__name__)
        return kernels, grid, meta

    monkeypatch.setattr(fa, "_launch", forced)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, frames, channels, generator=g).to(DEVICE).requires_grad_(True) for _ in range(3))
    out = fa.frame_attention(q, k, v, heads)
    grad = torch.randn(out.shape, generator=g).to(DEVICE)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = reference(*exact, heads)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    assert out.shape == (n, frames, channels) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip((dq, dk, dv), expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    names = {"pairs": "_pairs_forward", "tile": "_frame_attention_forward", "dots": "_dots_forward"}
    assert ran == [names[kernel]] * 2  # forward, backward


@pytest.mark.parametrize(("channels", "heads", "split"),
                         [(80, 4, 1), (80, 4, 2), (80, 4, 4), (64, 8, 8), (20, 4, 2), (20, 4, 8)])  # fmt: skip
def test_pairs_split_over_lanes_match_float64_attention(channels, heads, split):
    """A pair's channels over 1 to 8 lanes (partial scores added across lanes), 7 frames, 12 or 24 pairs; heads of 5
    over 2 lanes (3 and 2 channels) and over 8 (three lanes idle)."""
    q, k, v, grad = (torch.randn(3, 7, channels, device=DEVICE) for _ in range(4))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = fa._FrameAttention.apply(*leaves, heads, (channels // heads) ** -0.5, ("pairs", None, None, split))
    grads = torch.autograd.grad(out, leaves, grad)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = reference(*exact, heads)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    assert fa._launch(q, heads, "pairs", None, None, split)[2]["SPLIT"] == split
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unroll", [1, 2, 0])
def test_pairs_loops_rolled_partly_or_fully_unrolled_match_float64_attention(unroll, monkeypatch):
    """Heads of 10 over 2 lanes (5 channels a lane): loops rolled, unrolled by 2 (a remainder of 1), unrolled."""
    monkeypatch.setattr(fa, "PAIRS_UNROLL", unroll)
    q, k, v, grad = (torch.randn(3, 8, 40, device=DEVICE) for _ in range(4))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = fa.frame_attention(*leaves, heads=4)
    grads = torch.autograd.grad(out, leaves, grad)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = reference(*exact, 4)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    assert fa._launch(q, 4)[2]["UNROLL"] == (unroll or 5)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("int32_offsets,dv", [(True, "first"), (False, "with_qk"), (True, "with_qk"),
                                              (False, "last")])  # fmt: skip
def test_pairs_offset_widths_and_dv_loop_match_float64_attention(int32_offsets, dv, monkeypatch):
    """The backward kernel's dv in its first or second loop, offsets 32- or 64-bit: one result."""
    monkeypatch.setattr(fa, "PAIRS_INT32_OFFSETS", int32_offsets)
    monkeypatch.setattr(fa, "PAIRS_DV", dv)
    q, k, v, grad = (torch.randn(3, 8, 40, device=DEVICE) for _ in range(4))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    launched = []
    backward = fa._attend_backward
    monkeypatch.setattr(fa, "_attend_backward", lambda *a, **k: launched.append(a) or backward(*a, **k))
    out = fa.frame_attention(*leaves, heads=4)
    grads = torch.autograd.grad(out, leaves, grad)
    assert len(launched) == 1
    meta = fa._pairs_meta(fa._launch(q, 4)[2], *launched[0][:7], backward=True)
    assert (meta["WIDE"], meta["DV"]) == (not int32_offsets, dv)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = reference(*exact, 4)
    expected_grads = torch.autograd.grad(expected, exact, grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_an_unknown_dv_placement_is_named(monkeypatch):
    monkeypatch.setattr(fa, "PAIRS_DV", "middle")
    q = torch.randn(2, 8, 40, device=DEVICE, requires_grad=True)
    out = fa.frame_attention(q, q, q, heads=4)  # the forward kernel does not compute dv
    with pytest.raises(ValueError, match="PAIRS_DV='middle' must be 'with_qk', 'last' or 'first'"):
        out.sum().backward()


def test_offsets_past_32_bits_take_64_bit_addressing(monkeypatch):
    """A tensor whose last element lies 2**31 elements past its start, by its strides (on the meta device: nothing
    allocated); one that stays below, and any with the 32-bit offsets switched off."""
    def strided(first):
        return torch.empty_strided((3, 2, 4), (first, 4, 1), device="meta")

    monkeypatch.setattr(fa, "PAIRS_INT32_OFFSETS", True)
    assert fa._wide(strided(2**30)) and not fa._wide(strided(2**30 - 4))
    monkeypatch.setattr(fa, "PAIRS_INT32_OFFSETS", False)
    assert fa._wide(strided(8))


def test_wider_heads_split_over_more_lanes_by_default():
    splits = {d: fa._launch(torch.empty(4, 8, 64 * d), 64)[2]["SPLIT"] for d in (2, 5, 10, 20)}
    assert splits == {2: 1, 5: 1, 10: 2, 20: 4}
    with pytest.raises(ValueError, match=r"split=3 must be a power of two up to the 20 channels"):
        fa._launch(torch.empty(4, 8, 64 * 20), 64, "pairs", None, None, 3)
    with pytest.raises(ValueError, match=r"split=16 must be a power of two up to the 5 channels"):
        fa._launch(torch.empty(4, 8, 64 * 5), 64, "pairs", None, None, 16)


@pytest.mark.parametrize("short_kernel", ["pairs", "dots"])
def test_strided_projections_are_read_in_place_and_the_scale_is_honoured(short_kernel, monkeypatch):
    """q, k and v as column slices of one (N, F, 3C) projection, as a fused q/k/v layer would give them."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", short_kernel)
    qkv = torch.randn(4, 6, 3 * 48, device=DEVICE, requires_grad=True)
    q, k, v = qkv.split(48, dim=-1)
    out = fa.frame_attention(q, k, v, heads=4, scale=0.3)
    out.square().sum().backward()
    exact = qkv.detach().double().requires_grad_(True)
    eq, ek, ev = exact.split(48, dim=-1)
    split = [t.unflatten(-1, (4, -1)).transpose(1, 2) for t in (eq, ek, ev)]
    expected = torch.nn.functional.scaled_dot_product_attention(*split, scale=0.3).transpose(1, 2).flatten(2)
    expected.square().sum().backward()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), exact.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("short_kernel", ["pairs", "dots"])
def test_bf16_output_is_within_one_rounding_of_the_exact_value(short_kernel, monkeypatch):
    monkeypatch.setattr(fa, "SHORT_KERNEL", short_kernel)
    q, k, v = (torch.randn(64, 8, 320, device=DEVICE).bfloat16() for _ in range(3))
    out = fa.frame_attention(q, k, v, heads=64)
    exact = reference(q, k, v, 64)  # the same bf16 inputs, exact arithmetic
    assert out.dtype == torch.bfloat16
    # float32 arithmetic, one rounding at the output: within one unit in the last place (2**-7 relative; Triton's
    # interpreter truncates where the GPU rounds to nearest). The "dots" kernels round the probabilities to tf32 (a
    # 10-bit mantissa) for their product with v on a GPU: up to 2**-11 of sum_j p_j |v_j| more
    slack = 2**-11 * reference(q, k, v.abs(), 64) if short_kernel == "dots" else 0.0
    assert ((out.double() - exact).abs() <= exact.abs() * 2**-7 + slack + 1e-6).all()


def test_up_to_8_frames_run_the_short_kernels_longer_sequences_the_tile_kernels(monkeypatch):
    """By default heads of 16 channels take "dots" up to 8 frames, heads of 4 "pairs"; 9 frames and more "tile"."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", DEFAULT_SHORT_KERNEL)
    assert [fa._launch(torch.empty(4, frames, 64), 4)[0][0].__name__ for frames in (2, 8, 9, 29)] == [
        "_dots_forward", "_dots_forward", "_frame_attention_forward", "_frame_attention_forward"]
    assert [fa._launch(torch.empty(4, frames, 64), 16)[0][0].__name__ for frames in (2, 8, 9)] == [
        "_pairs_forward", "_pairs_forward", "_frame_attention_forward"]
    monkeypatch.setattr(fa, "SHORT_KERNEL", "pairs")
    assert [fa._launch(torch.empty(4, frames, 64), 4)[0][0].__name__ for frames in (2, 8, 9)] == [
        "_pairs_forward", "_pairs_forward", "_frame_attention_forward"]


def test_narrow_heads_stay_on_the_pairs_kernels_under_dots(monkeypatch):
    """`DOTS_MIN_CHANNELS`: heads of 5 channels (show-1-base's 40 x 64 level) keep "pairs", heads of 10 take "dots";
    0 sends every width to "dots", and a kernel asked for by name is the one launched."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", "dots")

    def chosen(width):
        return fa._launch(torch.empty(4, 8, 64 * width), 64)[0][0].__name__

    assert (chosen(5), chosen(10)) == ("_pairs_forward", "_dots_forward")
    assert fa._launch(torch.empty(4, 8, 64 * 5), 64, "dots")[0][0].__name__ == "_dots_forward"
    monkeypatch.setattr(fa, "DOTS_MIN_CHANNELS", 0)
    assert chosen(5) == "_dots_forward"


@pytest.mark.parametrize(("frames", "width", "pairs", "rows", "warps", "inner"),
                         [(8, 10, 8, 64, 4, 16), (5, 20, 8, 64, 4, 32), (2, 5, 32, 64, 4, 16), (29, 5, 2, 64, 4, 16),
                          (8, 10, 4, 32, 2, 16), (5, 20, 4, 32, 2, 32), (2, 5, 16, 32, 2, 16), (29, 5, 1, 32, 2, 16)])
def test_dots_blocks_fill_a_tile_of_rows(frames, width, pairs, rows, warps, inner, monkeypatch):
    """`DOTS_ROWS` rows a program (pairs times frames padded to a power of two; 32 by default, 64 the first choice),
    heads padded to 16 channels or more (tl.dot's smallest inner dimension), a warp each 16 rows; tf32 products of
    the probabilities for half inputs."""
    assert fa.DOTS_ROWS == 32
    monkeypatch.setattr(fa, "DOTS_ROWS", rows)
    _, grid, meta = fa._launch(torch.empty(3, frames, 64 * width, dtype=torch.bfloat16), 64, "dots")
    assert (meta["BLOCK_P"], meta["BLOCK_P"] * meta["FP"], meta["num_warps"], meta["DP"]) == (pairs, rows, warps,
                                                                                              inner)
    assert grid == (-(-3 * 64 // pairs),) and meta["PRECISION"] == "tf32"
    # bf16 tiles into tl.dot on a GPU; float32 ones in the interpreter, whose bf16 products are wrong (Triton 3.9)
    assert meta["HALF_DOTS"] is (not fused_norm.interpreting())
    fp32 = fa._launch(torch.empty(3, frames, 64 * width), 64, "dots")[2]
    assert fp32["PRECISION"] == "ieee" and fp32["HALF_DOTS"] is False


def test_bad_arguments_are_named():
    x = torch.randn(2, 8, 60, device=DEVICE)
    with pytest.raises(ValueError, match="60 channels do not split into 7 heads"):
        fa.frame_attention(x, x, x, heads=7)
    with pytest.raises(ValueError, match="must have one shape"):
        fa.frame_attention(x, x[:, :4], x[:, :4], heads=4)
    long = torch.randn(1, 64, 256, device=DEVICE)
    with pytest.raises(ValueError, match="64 frames of 64 channels a head do not fit one program"):
        fa.frame_attention(long, long, long, heads=4)
    assert fa.frame_attention_supported(torch.zeros(2, 8, 60, device="meta"), 4) == "Triton cannot run on this device"


@pytest.mark.parametrize("short_kernel", ["pairs", "dots"])
def test_projected_attention_matches_three_projections_and_the_attention_in_float64(short_kernel, monkeypatch):
    """One stacked GEMM each way against separate bias-free projections and exact attention, frames-first rows:
    the projection's column blocks read in place (row stride 3C, frame stride N * 3C)."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", short_kernel)
    launched = []
    launch = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda *a: launched.append(launch(*a)[0][0].__name__) or launch(*a))
    frames, n, c, heads = 6, 5, 48, 4
    x = torch.randn(frames * n, c, device=DEVICE, requires_grad=True)
    weights = [(torch.randn(c, c, device=DEVICE) * c**-0.5).requires_grad_(True) for _ in range(3)]
    out = fa.projected_frame_attention(x, *weights, frames=frames, heads=heads)
    grads = torch.autograd.grad(out.square().sum(), (x, *weights))
    exact = [t.detach().double().requires_grad_(True) for t in (x, *weights)]
    q, k, v = ((exact[0] @ w.t()).unflatten(0, (frames, n)).transpose(0, 1) for w in exact[1:])
    expected = reference(q, k, v, heads).transpose(0, 1).flatten(0, 1)  # back to frames-first rows
    expected_grads = torch.autograd.grad(expected.square().sum(), exact)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert launched == [f"_{short_kernel}_forward"] * 2


def test_projected_attention_under_autocast_runs_bf16_and_returns_float32_weight_gradients():
    frames, n, c = 8, 3, 320
    x = torch.randn(frames * n, c, device=DEVICE).bfloat16().requires_grad_(True)
    weights = [(torch.randn(c, c, device=DEVICE) * c**-0.5).requires_grad_(True) for _ in range(3)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = fa.projected_frame_attention(x, *weights, frames=frames, heads=64)
    grads = torch.autograd.grad(out.float().square().sum(), (x, *weights))
    assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 and g.shape == (c, c) for g in grads[1:])
    exact = [t.detach().double().requires_grad_(True) for t in (x, *weights)]
    q, k, v = ((exact[0] @ w.bfloat16().double().t()).unflatten(0, (frames, n)).transpose(0, 1) for w in exact[1:])
    expected = reference(q, k, v, 64).transpose(0, 1).flatten(0, 1)
    expected_grads = torch.autograd.grad(expected.square().sum(), exact)
    for got, want in zip((out, *grads), (expected, *expected_grads)):  # bf16 roundings of q, k, v and the output
        assert float((got.detach().double() - want.detach()).norm() / want.detach().norm()) < 2e-2


def test_projected_attention_names_bad_arguments():
    x, w = torch.randn(12, 16, device=DEVICE), torch.randn(16, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"weights \(out, C\) alike"):
        fa.projected_frame_attention(x, w, w[:8], w, frames=4, heads=2)
    with pytest.raises(ValueError, match="12 rows do not split into frames=5"):
        fa.projected_frame_attention(x, w, w, w, frames=5, heads=2)
    with pytest.raises(ValueError, match="16 channels do not split into 3 heads"):
        fa.projected_frame_attention(x, w, w, w, frames=4, heads=3)


@pytest.mark.parametrize(("frames", "n", "heads", "d"), [(8, 4, 64, 5), (6, 3, 4, 7), (5, 2, 3, 6)])
def test_padded_heads_match_float64_attention_and_the_unpadded_kernels(frames, n, heads, d, monkeypatch):
    """PAIRS_PADDED_HEADS: heads of 5 to 7 channels projected 8 apart (show-1-base's 40 x 64 level, 8 frames; odd
    widths; fewer frames than the padded 8), run on the "padded pairs" kernels: the float64 attention's values and
    gradients, and the unpadded kernels' exactly (the same sums in the same order, the padding's zeros aside)."""
    launched = []
    launch = fa._launch
    monkeypatch.setattr(fa, "_launch", lambda *a, **kw: launched.append(launch(*a, **kw)[0][0].__name__)
                        or launch(*a, **kw))  # fmt: skip
    c = heads * d
    x = torch.randn(frames * n, c, device=DEVICE, requires_grad=True)
    weights = [(torch.randn(c, c, device=DEVICE) * c**-0.5).requires_grad_(True) for _ in range(3)]
    weighting = torch.randn(frames * n, c, device=DEVICE)

    def run(padded):
        monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", padded)
        out = fa.projected_frame_attention(x, *weights, frames=frames, heads=heads)
        return (out, *torch.autograd.grad((out * weighting).sum(), (x, *weights)))

    unpadded, padded = run(False), run(True)
    assert launched == ["_pairs_forward"] * 2 + ["_padded_pairs_forward"] * 2  # forward and backward passes each
    exact = [t.detach().double().requires_grad_(True) for t in (x, *weights)]
    q, k, v = ((exact[0] @ w.t()).unflatten(0, (frames, n)).transpose(0, 1) for w in exact[1:])
    expected = reference(q, k, v, heads).transpose(0, 1).flatten(0, 1)
    expected = (expected, *torch.autograd.grad((expected * weighting.double()).sum(), exact))
    for got, same, want in zip(padded, unpadded, expected):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, same, rtol=1e-6, atol=1e-6)


def test_padded_heads_under_autocast_are_bf16_and_leave_the_padding_of_the_gradient_zero(monkeypatch):
    """Show-1's 40 x 64 level under bf16 autocast, padded: within the unpadded kernels' roundings; the projection's
    gradient written by the backward kernel holds 0 in every padding channel (the stacked weight's zero rows meet
    it in the input's gradient GEMM), and the weights' gradients are float32 and (out, C)."""
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", True)
    frames, n, c = 8, 3, 320
    x = torch.randn(frames * n, c, device=DEVICE).bfloat16().requires_grad_(True)
    weights = [(torch.randn(c, c, device=DEVICE) * c**-0.5).requires_grad_(True) for _ in range(3)]
    written = []
    empty_like = torch.empty_like
    # every buffer the function allocates this way starts as NaN: only the kernel's writes can clear the padding
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, **kw: written.append(empty_like(t, **kw).fill_(float("nan"))) or written[-1])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = fa.projected_frame_attention(x, *weights, frames=frames, heads=64)
    grads = torch.autograd.grad(out.float().square().sum(), (x, *weights))
    (grad_projected,) = [t for t in written if t.shape == (frames * n, 3 * 64 * fa.PADDED_HEAD)]
    padding = grad_projected.view(-1, 3, 64, fa.PADDED_HEAD)[..., 5:]
    assert padding.numel() and not padding.any()
    assert grad_projected.view(-1, 3, 64, fa.PADDED_HEAD)[..., :5].abs().sum() > 0
    assert all(g.dtype == torch.float32 and g.shape == (c, c) for g in grads[1:])
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        unpadded = fa.projected_frame_attention(x, *weights, frames=frames, heads=64)
    unpadded_grads = torch.autograd.grad(unpadded.float().square().sum(), (x, *weights))
    for got, want in zip((out, *grads), (unpadded, *unpadded_grads)):
        got, want = got.detach().double(), want.detach().double()
        assert float((got - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("padded", [False, True])
def test_recomputed_projection_keeps_less_and_gives_the_same_gradients(padded, monkeypatch):
    """RECOMPUTE_PROJECTION: the backward pass projects x again instead of keeping the projection (padded heads
    too): x and the stacked weight kept, nothing (frames * N, 3 * out) wide; the same gradients, bit for bit."""
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", padded)
    frames, n, heads, c = 8, 4, 4, 20
    x = torch.randn(frames * n, c, device=DEVICE, requires_grad=True)
    weights = [(torch.randn(c, c, device=DEVICE) * c**-0.5).requires_grad_(True) for _ in range(3)]

    def run(recompute):
        monkeypatch.setattr(fa, "RECOMPUTE_PROJECTION", recompute)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            out = fa.projected_frame_attention(x, *weights, frames=frames, heads=heads)
        return kept, (out, *torch.autograd.grad(out.square().sum(), (x, *weights)))

    (kept, expected), (recomputed_kept, got) = run(False), run(True)
    width = 8 if padded else 5
    assert kept == [(frames * n, c), (frames * n, 3 * heads * width), (3 * heads * width, c)]
    assert recomputed_kept == [(frames * n, c), (3 * heads * width, c)]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("frames", "d", "short_kernel", "padded"),
                         [(8, 5, "dots", 8), (8, 5, "pairs", 8), (5, 7, "dots", 8), (8, 8, "pairs", 8),
                          (8, 10, "pairs", 10), (8, 10, "dots", 10), (8, 4, "dots", 4), (8, 2, "pairs", 2),
                          (29, 5, "dots", 5)])
def test_padded_head_pads_only_narrow_heads_on_one_lane_of_the_pairs_kernels(frames, d, short_kernel, padded,
                                                                             monkeypatch):  # fmt: skip
    """Heads of 5 to 7 channels on the "pairs" kernels, one lane a pair, up to 8 frames: padded to 8 with the
    flag; heads of 8 need no padding, heads of 2 and 4 would move 2 to 4 times the bytes padded, heads of 10 split
    over lanes ("pairs") or take "dots", 29 frames the "tile" kernels. Without the flag nothing is padded."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", short_kernel)
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", True)
    assert fa.padded_head(frames, d) == padded
    monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", False)
    assert fa.padded_head(frames, d) == d


@pytest.mark.parametrize(("fused", "biased"), [(True, False), (False, False), (True, True)])
def test_temporal_transformer_rows_take_one_projection_gemm_where_the_projections_are_plain(fused, biased,
                                                                                            monkeypatch):  # fmt: skip
    """The rows path of a batch-1 temporal transformer with FUSED_QKV on and off: the same function and gradients;
    projections that are not bias-free `nn.Linear` layers (here a bias on to_k) keep the three projections."""
    from motion_adapters import layout

    model = _temporal_attention()
    if biased:
        for module in model.modules():
            if hasattr(module, "to_k"):
                module.to_k.bias = torch.nn.Parameter(torch.randn(module.to_k.out_features, device=DEVICE))
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(fa.FrameAttnProcessor())
    calls = []
    stacked = fa._ProjectedFrameAttention.apply
    monkeypatch.setattr(fa._ProjectedFrameAttention, "apply", lambda *a: calls.append(a[0].shape) or stacked(*a))
    x = torch.randn(6, 64, 3, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weights = [p for n, p in model.named_parameters() if n.endswith(("to_q.weight", "to_k.weight", "to_v.weight"))]

    def run(on):
        monkeypatch.setattr(layout, "FUSED_QKV", on)
        # the transformer's group norm written channels-last, as the training step's norms write it (PyTorch's CUDA
        # group norm returns NCFHW), then the rows path
        normed = model.norm(x.unflatten(0, (1, 6)).transpose(1, 2)).contiguous(memory_format=torch.channels_last_3d)
        out = layout._temporal_transformer_rows(model, x, normed)
        return (out, *torch.autograd.grad(out.square().sum(), (x, *weights)))

    expected = run(False)
    assert not calls
    got = run(fused)
    assert len(calls) == (2 if fused and not biased else 0)  # attn1 and attn2 of the one block
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _temporal_attention():
    from motion_adapters.models.blocks_show1 import temporal_attention

    torch.manual_seed(0)
    return temporal_attention(64, 16, norm_num_groups=8).to(DEVICE)  # 16 heads of 4, Show-1's split


def test_processor_matches_pytorchs_in_a_temporal_transformer_and_runs_the_kernel(monkeypatch):
    calls = []
    kernel = fa.frame_attention
    monkeypatch.setattr(fa, "frame_attention", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    model = _temporal_attention()
    x = torch.randn(2 * 6, 64, 3, 5, device=DEVICE, requires_grad=True)  # (B * F, C, H, W), 6 frames

    def run():
        out = model(x, num_frames=6).sample
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        return out, grad

    expected, expected_grad = run()
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(fa.FrameAttnProcessor())
    out, grad = run()
    assert calls and all(shape == (2 * 3 * 5, 6, 64) for shape in calls)  # every attention on the kernel
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_processor_hands_what_it_does_not_cover_to_pytorchs():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8).to(DEVICE)
    x, context = torch.randn(3, 5, 32, device=DEVICE), torch.randn(3, 7, 32, device=DEVICE)
    mask = torch.zeros(3, 1, 5, device=DEVICE)
    mask[..., -1] = -1e4
    expected = [attn(x, context), attn(x, attention_mask=mask)]
    attn.set_processor(fa.FrameAttnProcessor())
    got = [attn(x, context), attn(x, attention_mask=mask)]  # cross-attention, a mask
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("choice", ["triton_attention", "triton_fast", "triton_conv", "triton"])
def test_triton_temporal_kernels_off_cuda_are_refused_with_the_reason(choice):
    from diffusers import DDPMScheduler
    from tiny_models import tiny_unet3d

    config = MotionDistillationConfig(max_train_steps=1, num_frames=4, temporal_kernels=choice)
    with pytest.raises(ValueError, match=rf"temporal_kernels='{choice}' cannot run: the UNet is on cpu"):
        train_motion(tiny_unet3d(), torch.zeros(4, 4, 8, 8), torch.zeros(1, 7, 16), DDPMScheduler(), config,
                     progress=False)


COMPILE_FOR_HOPPER = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import motion_adapters.frame_attention as fa

fa.SHORT_KERNEL = "pairs"  # a kernel of None below: the "pairs" kernels up to 8 frames, the "tile" ones past them
# Show-1's head widths at 8 frames, interpolation's 5 frames, and SR2's 29 frames (the tile kernels); the "pairs"
# kernels' loops unrolled (the default) and rolled, their offsets 32-bit with dv in the first loop, and 64-bit (the
# default) with dv beside q and k (the default) or last; the "dots" kernels on bf16, 8 to 29 frames with tf32
# products of the probabilities (the default) and 5 to 8 with bf16 ones
for unroll, wide, dv in ((0, False, "first"), (1, False, "first"), (0, True, "with_qk"), (0, True, "last")):
    fa.PAIRS_UNROLL, fa.PAIRS_INT32_OFFSETS, fa.PAIRS_DV = unroll, not wide, dv
    fa.DOTS_HALF_PROBABILITIES = wide  # the "dots" kernels' bf16 probabilities: compiled with the 64-bit pairs
    for frames, width, kernel in ((8, 5, None), (8, 20, None), (5, 10, None), (8, 2, None), (8, 5, "tile"),
                                  (29, 5, None), (8, 10, "dots"), (8, 20, "dots"), (5, 2, "dots"), (29, 5, "dots")):
        if (unroll or wide) and (kernel == "tile" or frames > 8) or (unroll or dv == "last") and kernel == "dots":
            continue
        x = torch.empty(4, frames, 64 * width, dtype=torch.bfloat16 if kernel == "dots" else torch.float32)
        kernels, _, meta = fa._launch(x, 64, kernel)
        meta = fa._pairs_meta(meta, x, backward=True)
        assert kernel in ("tile", "dots") or frames > 8 or meta["WIDE"] == wide, meta
        assert kernel != "dots" or (meta["HALF_DOTS"], meta["HALF_P"]) == (True, wide), meta
        warps = meta.pop("num_warps")
        for kernel in kernels:
            names = kernel.arg_names
            signature = {n: "constexpr" if n in meta else "*bf16" if n.endswith("_ptr") else "fp32" if n == "scale"
                         else "i32" for n in names}
            triton.compile(ASTSource(kernel, signature, {k: v for k, v in meta.items() if k in names}),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            print("compiled", kernel.__name__)
# the "padded pairs" kernels at show-1-base's 40 x 64 level (heads of 5, padded to 8), 32- and 64-bit offsets,
# compiled as a launch on 16-byte aligned pointers and strides specialises them: a lane's padded head one 16-byte
# access (PTX's ld.global.v4.b32 / st.global.v4.b32)
for wide in (False, True):
    fa.PAIRS_INT32_OFFSETS = not wide
    x = torch.empty(4, 8, 64 * fa.PADDED_HEAD, dtype=torch.bfloat16)
    kernels, _, meta = fa._launch(x, 64, "padded", head_channels=5)
    meta = fa._pairs_meta(meta, x, backward=True)
    warps = meta.pop("num_warps")
    for kernel in kernels:
        names = kernel.arg_names
        signature = {n: "constexpr" if n in meta else "*bf16" if n.endswith("_ptr") else "fp32" if n == "scale"
                     else "i32" for n in names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n.endswith(("_ptr", "_sn", "_sf"))}
        compiled = triton.compile(ASTSource(kernel, signature, {k: v for k, v in meta.items() if k in names}, aligned),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = compiled.asm["ptx"]
        print("compiled", kernel.__name__, "loads.v4", ptx.count("ld.global.v4.b32"),
              "stores.v4", ptx.count("st.global.v4.b32"))
"""


def test_kernels_compile_for_a_hopper_gpu_without_one():
    """The interpreter runs code the compiler refuses: compile the kernels for sm_90 with the interpreter off."""
    from hopper import compiled_for_hopper

    out = compiled_for_hopper(COMPILE_FOR_HOPPER)
    assert out.count("compiled _pairs_") == 32 and out.count("compiled _frame_attention_") == 4, out
    assert out.count("compiled _dots_") == 8 + 6, out  # tf32 products, 4 shapes; bf16 products, 3 of them
    # q, k and v loaded as 16-byte vectors: 8 frames each, twice for q and k in the backward kernel; dq, dk and dv
    # stored as 16-byte vectors (the forward kernel's output is unpadded)
    assert out.count("compiled _padded_pairs_forward loads.v4 24 stores.v4 0") == 2, out
    assert out.count("compiled _padded_pairs_backward loads.v4 40 stores.v4 24") == 2, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("short_kernel", "half_p"), [("pairs", False), ("dots", False), ("dots", True)])
def test_training_step_on_triton_attention_is_as_close_to_float32_as_the_math_kernel(short_kernel, half_p,
                                                                                       monkeypatch):  # fmt: skip
    """bf16 steps of a tiny Show-1 UNet with the math SDPA kernel and with the Triton kernels ("pairs" or "dots",
    the latter's probabilities in tf32 or bf16 products), each against the same step in float32."""
    monkeypatch.setattr(fa, "SHORT_KERNEL", short_kernel)
    monkeypatch.setattr(fa, "DOTS_HALF_PROBABILITIES", half_p)
    from test_training_speed import embeds, tiny_show1

    from motion_adapters import inject_temporal_adapter
    from motion_adapters.training_step import temporal_kernels

    device = torch.device("cuda")
    x, text = torch.randn(1, 3, 8, 16, 16, device=device), embeds(64).to(device)

    def run(kernels, half=True):
        unet = tiny_show1().to(device).eval()
        inject_temporal_adapter(unet, target="temporal_attn.to_[qkv]", mode="full")
        for name, p in unet.named_parameters():
            p.requires_grad_(".temp_attentions." in name and name.endswith(("to_q.weight", "to_v.weight")))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half), temporal_kernels(unet, kernels):
            out = unet(x, torch.tensor([10], device=device), text).sample
        out.float().pow(2).mean().backward()
        return [out.detach()] + [p.grad.clone() for p in unet.parameters() if p.requires_grad]

    exact = run("library", half=False)
    errors = {kernels: [float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(run(kernels),
                                                                                                   exact)]
              for kernels in ("math_attention", "triton_attention")}  # fmt: skip
    assert len(exact) > 2
    assert all(t <= 1.5 * m + 1e-3 for t, m in zip(errors["triton_attention"], errors["math_attention"])), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_padded_heads_on_the_gpu_are_as_close_to_float64_as_the_unpadded_kernels(monkeypatch):
    """Show-1-base's 40 x 64 level (2,560 pixels, 8 frames, 64 heads of 5) in bf16 on the GPU, compiled with the
    16-byte accesses: output and gradients of x and the weights within 1.5 times the unpadded kernels' relative
    error from float64 (plus 1e-3)."""
    frames, n, c = 8, 2560, 320
    x = torch.randn(frames * n, c, device="cuda").bfloat16().requires_grad_(True)
    weights = [(torch.randn(c, c, device="cuda") * c**-0.5).requires_grad_(True) for _ in range(3)]
    weighting = torch.randn(frames * n, c, device="cuda")

    def run(padded):
        monkeypatch.setattr(fa, "PAIRS_PADDED_HEADS", padded)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fa.projected_frame_attention(x, *weights, frames=frames, heads=64)
        return (out, *torch.autograd.grad((out.float() * weighting).sum(), (x, *weights)))

    exact = [t.detach().double().requires_grad_(True) for t in (x, *weights)]
    q, k, v = ((exact[0] @ w.bfloat16().double().t()).unflatten(0, (frames, n)).transpose(0, 1) for w in exact[1:])
    expected = reference(q, k, v, 64).transpose(0, 1).flatten(0, 1)
    expected = (expected, *torch.autograd.grad((expected * weighting.double()).sum(), exact))

    def errors(got):
        return [float((a.detach().double() - b.detach()).norm() / b.detach().norm()) for a, b in zip(got, expected)]

    unpadded, padded = errors(run(False)), errors(run(True))
    assert all(p <= 1.5 * u + 1e-3 for p, u in zip(padded, unpadded)), (padded, unpadded)


@pytest.mark.parametrize("half", [False, True])
def test_temporal_transformer_rows_fuse_residual_additions_into_frozen_layer_norms(half, monkeypatch):
    """A batch-1 temporal transformer on token rows, its layer norms frozen (as in training): each residual
    addition and the norm after it as `frozen_add_layer_norm` (three norms a block: the one kernel a norm), against
    PyTorch's additions and norms: the output and the gradients of the input and the trained q/k/v weights."""
    from motion_adapters import layout, lean_backward

    model = _temporal_attention()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("to_q.weight", "to_k.weight", "to_v.weight")))
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(fa.FrameAttnProcessor())
    calls = []
    fused = lean_backward._FrozenAddLayerNorm.apply
    monkeypatch.setattr(lean_backward._FrozenAddLayerNorm, "apply", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(6, 64, 3, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    weights = [p for p in model.parameters() if p.requires_grad]

    def run(on):
        monkeypatch.setattr(lean_backward, "FUSED_LAYER_NORMS", on)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=half):
            normed = model.norm(x.unflatten(0, (1, 6)).transpose(1, 2))
            out = layout._temporal_transformer_rows(model, x, normed.contiguous(memory_format=torch.channels_last_3d))
        grads = torch.autograd.grad(out.float().square().sum(), (x, *weights))
        return [t.detach().float() for t in (out, *grads)]

    expected = run(False)
    assert not calls
    got = run(True)
    assert len(calls) == 3 * len(model.transformer_blocks) and len(weights) == 6
    for a, b in zip(got, expected):
        if half:  # bf16 roundings in different places: the same function to about one part in a hundred
            assert float((a - b).norm() / b.norm()) < 2e-2
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
