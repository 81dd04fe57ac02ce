"""The fused group norm -> scale/shift -> activation Triton kernels: compiled on a GPU, else in Triton's interpreter.

Without CUDA, conftest.py sets `TRITON_INTERPRET=1` before Triton is first imported, and the kernels run on CPU
tensors; with CUDA the same tests run the compiled kernels on the GPU.
"""

import pytest
import torch

from motion_adapters import fused_norm as fused_module
from motion_adapters import lean_backward
from motion_adapters.config import MotionDistillationConfig
from motion_adapters.training import train_motion

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fused():
    """`motion_adapters.fused_norm`, where its kernels can run on DEVICE."""
    if not fused_module.fused_norm_available(torch.empty(0, device=DEVICE)):
        pytest.fail("the fused kernels cannot run here: TRITON_INTERPRET=1 must be set before triton is imported")
    return fused_module


def reference(x, weight, bias, factor, shift, groups, activation, eps=1e-5):
    """The unfused chain in float64: group norm, factor and shift, activation."""
    x = x.double()
    y = torch.nn.functional.group_norm(
        x, groups, None if weight is None else weight.double(), None if bias is None else bias.double(), eps
    )
    if factor is not None:
        y = y * factor.double() + shift.double()
    return {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "none": lambda t: t}[activation](y)


def inputs(shape, affine, scale_shift, seed=0, mean=3.0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + mean).to(DEVICE)
    weight = torch.randn(c, generator=g).to(DEVICE) if affine else None
    bias = torch.randn(c, generator=g).to(DEVICE) if affine else None
    if scale_shift:  # a chunk of a (N, 2C, 1, 1) time embedding, as diffusers' ResNet takes it: strided views
        temb = torch.randn(n, 2 * c, *[1] * (len(shape) - 2), generator=g).to(DEVICE)
        factor, shift = 1 + 0.3 * temb[:, :c], temb[:, c:]
    else:
        factor = shift = None
    return x, weight, bias, factor, shift


@pytest.mark.parametrize(
    ("shape", "groups", "activation", "affine", "scale_shift"),
    [
        ((2, 8, 3, 5), 4, "silu", True, False),  # one chunk a channel
        ((2, 8, 3, 700), 2, "gelu", True, True),  # three chunks a channel, the last partial
        ((1, 6, 2, 3, 300), 3, "silu", False, False),  # a (B, C, F, H, W) temporal norm, no affine
        ((2, 4, 9, 5), 2, "gelu", True, True),  # a short row: chunks of 128
        ((3, 4, 1030), 1, "none", True, True),
    ],
)
def test_forward_and_input_gradient_match_the_float64_chain(fused, shape, groups, activation, affine, scale_shift):
    x, weight, bias, factor, shift = inputs(shape, affine, scale_shift)
    y, mean, rstd = fused.group_norm_act_forward(x, weight, bias, factor, shift, groups, 1e-5, activation)
    x64 = x.double().requires_grad_(True)
    expected = reference(x64, weight, bias, factor, shift, groups, activation)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (expected_dx,) = torch.autograd.grad(expected, x64, grad.double())
    dx = fused.group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, groups, activation)
    assert y.dtype == dx.dtype == x.dtype and y.shape == dx.shape == x.shape
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (shape[0] * groups,)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), expected_dx, rtol=1e-4, atol=1e-5)
    groups_of = x.double().reshape(shape[0] * groups, -1)
    torch.testing.assert_close(mean.double(), groups_of.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (groups_of.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


def channels_last(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values with the channels innermost in memory: NHWC, NDHWC, or an (N, C, S) transposed view."""
    if layout == "nhwc":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "ndhwc":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.transpose(1, -1).contiguous().transpose(1, -1)  # (N, C, S) stored as (N, S, C): the attention's view


@pytest.mark.parametrize(
    ("shape", "layout", "groups", "activation", "affine", "scale_shift"),
    [
        ((2, 8, 3, 5), "nhwc", 4, "silu", True, True),  # one tile a sample
        ((2, 96, 9, 15), "nhwc", 4, "gelu", True, True),  # two channel tiles, the values in three chunks
        ((1, 6, 2, 3, 30), "ndhwc", 3, "silu", False, False),  # a temporal norm, fewer channels than a tile
        ((2, 8, 300), "nsc", 2, "none", True, False),  # the spatial attention's (N, C, H * W) view
    ],
)
@pytest.mark.parametrize("loop", [1, 2])
@pytest.mark.parametrize("fold", [0, 4096])
def test_channels_last_inputs_keep_their_layout_and_match_the_float64_chain(fused, monkeypatch, shape, layout,
                                                                           groups, activation, affine,
                                                                           scale_shift, loop, fold):  # fmt: skip
    # small tiles: several chunks and channel tiles at test sizes; loop 2: statistics chunks of two tiles, the
    # last one partial; fold: the group statistics combined in their own launches (0) or in the element-wise ones
    monkeypatch.setattr(fused, "CL_TILE", {"forward": 256, "backward": 256})
    monkeypatch.setattr(fused, "CL_LOOP", {"forward": loop, "backward": loop})
    monkeypatch.setattr(fused, "CL_FOLD_MAX_K", fold)
    if fold:  # the group kernels must not run
        for name in ("_group_moments", "_group_grad_means"):
            monkeypatch.setattr(fused, name, None)
    x, weight, bias, factor, shift = inputs(shape, affine, scale_shift)
    x = channels_last(x, layout)
    assert fused.channels_last_rows(x) is not None and not x.is_contiguous()
    y, mean, rstd = fused.group_norm_act_forward(x, weight, bias, factor, shift, groups, 1e-5, activation)
    x64 = x.double().requires_grad_(True)
    expected = reference(x64, weight, bias, factor, shift, groups, activation)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # contiguous: another layout
    (expected_dx,) = torch.autograd.grad(expected, x64, grad.double())
    dx = fused.group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, groups, activation)
    assert y.stride() == dx.stride() == x.stride()  # the layout is kept: no conversion before the next conv
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), expected_dx, rtol=1e-4, atol=1e-5)
    groups_of = x.double().reshape(shape[0] * groups, -1)
    torch.testing.assert_close(mean.double(), groups_of.mean(1), rtol=1e-6, atol=1e-6)
    if fold:
        monkeypatch.undo()  # the channel-row kernels have no fold
    contiguous = fused.group_norm_act_forward(x.contiguous(), weight, bias, factor, shift, groups, 1e-5, activation)
    torch.testing.assert_close(y, contiguous[0], rtol=1e-5, atol=1e-6)  # the channel-row kernels agree


@pytest.mark.parametrize("layout", ["contiguous", "nhwc", "nhwc_folded"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_input_bias_is_added_before_the_norm_inside_the_kernels(fused, monkeypatch, layout, per_sample):
    monkeypatch.setattr(fused, "CL_TILE", {"forward": 256, "backward": 256})
    monkeypatch.setattr(fused, "CL_LOOP", {"forward": 3, "backward": 3})
    monkeypatch.setattr(fused, "CL_FOLD_MAX_K", 4096 if layout == "nhwc_folded" else 0)
    x, weight, bias, factor, shift = inputs((2, 96, 5, 7), affine=True, scale_shift=True)  # two channel tiles
    if layout != "contiguous":
        x = channels_last(x, "nhwc")
    g = torch.Generator().manual_seed(3)
    # a convolution's bias (C,), or a time embedding added to it (N, C, 1, 1): a large one, that moves the groups
    input_bias = (torch.randn(2, 96, 1, 1, generator=g) if per_sample else torch.randn(96, generator=g)) * 5
    input_bias = input_bias.to(DEVICE)
    y, mean, rstd = fused.group_norm_act_forward(x, weight, bias, factor, shift, 4, 1e-5, "silu", input_bias)
    shifted = x + (input_bias if per_sample else input_bias[:, None, None])
    x64 = shifted.double().requires_grad_(True)
    expected = reference(x64, weight, bias, factor, shift, 4, "silu")
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), shifted.double().reshape(8, -1).mean(1), rtol=1e-6, atol=1e-5)
    assert y.stride() == x.stride()
    # backward: the gradient with respect to x + bias (the same as x's), the bias added again inside the kernels
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (expected_dx,) = torch.autograd.grad(expected, x64, grad.double())
    dx = fused.group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, 4, "silu", input_bias)
    torch.testing.assert_close(dx.double(), expected_dx, rtol=1e-4, atol=1e-5)
    without = fused.group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, 4, "silu")
    assert (without.double() - expected_dx).abs().max() > 1e-2  # the bias matters: the test has teeth


def test_few_program_norms_take_one_tile_a_program_then_smaller_tiles(fused, monkeypatch):
    """`CL_MIN_PROGRAMS`: show-1-base's deepest norm (1,280 channels, 8 x 5 x 8 values) runs 20 statistics programs
    at 0; asked for 132 (the default), one tile a program and tiles of 32 values (200 programs); the results those of
    the geometry at 0, forward and backward, and those of the float64 chain at a test size."""
    x = torch.empty(1, 1280, 8, 5, 8).contiguous(memory_format=torch.channels_last_3d)

    def geometry(direction):
        n, c, s, block_s, block_c, p, warps, loop, p_stats, k = fused._cl_layout(fused.channels_last_rows(x), 32,
                                                                               direction)  # fmt: skip
        return block_s, loop, p_stats * -(-c // block_c), p * -(-c // block_c), k

    assert fused.CL_MIN_PROGRAMS == 132
    monkeypatch.setattr(fused, "CL_MIN_PROGRAMS", 0)
    assert geometry("forward") == (128, 3, 20, 60, 40)
    monkeypatch.setattr(fused, "CL_MIN_PROGRAMS", 132)
    assert geometry("forward") == geometry("backward") == (32, 1, 200, 200, 400)
    monkeypatch.setattr(fused, "CL_MIN_PROGRAMS", 10**6)  # never reached: stops at CL_MIN_TILE
    assert geometry("forward")[0] == fused.CL_MIN_TILE // 64
    shape = (1, 96, 12, 5)
    x, weight, bias, factor, shift = inputs(shape, True, True)
    x = channels_last(x, "nhwc")
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    # 2 channel tiles of 60 values: 2 programs by default; asked for 64, tiles of 16 values (8 programs), the smallest
    # tile CL_MIN_TILE allows here
    for programs in (0, 64):
        monkeypatch.setattr(fused, "CL_MIN_PROGRAMS", programs)
        monkeypatch.setattr(fused, "CL_MIN_TILE", 16 * 64)
        monkeypatch.setattr(fused, "CL_TILE", {"forward": 4096, "backward": 4096})
        y, mean, rstd = fused.group_norm_act_forward(x, weight, bias, factor, shift, 4, 1e-5, "silu")
        dx = fused.group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, 4, "silu")
        layout = fused._cl_layout(fused.channels_last_rows(x), 4, "forward")
        results[programs] = (y, dx, layout)
    assert results[0][2][3] == 64 and results[64][2][3] == 16  # the tile shrank to 16 values
    torch.testing.assert_close(results[64][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[64][1], results[0][1], rtol=1e-4, atol=1e-6)
    x64 = x.double().requires_grad_(True)
    expected = reference(x64, weight, bias, factor, shift, 4, "silu")
    torch.testing.assert_close(results[64][0].double(), expected, rtol=1e-5, atol=1e-5)


def test_channels_last_tiles_cover_show1_shapes():
    # (values, channels, warps): 64 channels a tile, `tile` values in all, fewer where a sample has fewer values
    assert fused_module.cl_tile(320, 2560, 8192) == (128, 64, 8)
    assert fused_module.cl_tile(320, 2560, 16384) == (256, 64, 8)
    assert fused_module.cl_tile(6, 20480, 8192) == (1024, 8, 8)
    assert fused_module.cl_tile(1280, 40, 8192) == (64, 64, 8)
    assert fused_module.cl_tile(32, 4, 8192) == (4, 32, 1)
    assert fused_module.channels_last_rows(torch.zeros(2, 3, 4, 5)) is None  # contiguous: the channel-row kernels
    assert fused_module.channels_last_rows(torch.zeros(2, 3, 4, 5).transpose(2, 3)) is None  # neither layout


def test_channels_last_backward_reads_a_gradient_whose_strides_differ_only_at_size_one_dims(monkeypatch):
    """At batch 1 autograd hands gradients whose batch stride differs from the input's: same memory, no copy."""
    x = torch.randn(1, 8, 3, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    _, mean, rstd = fused_module.group_norm_act_forward(x, None, None, None, None, 2, 1e-5, "silu")
    grad = torch.randn(x.shape, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)
    odd = grad.as_strided(grad.shape, (7,) + grad.stride()[1:])  # another stride for the size-1 batch dim
    assert odd.stride() != x.stride() and torch.equal(odd, grad)
    copies = []
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: copies.append(t.shape) or empty_like(t, *a, **k))
    dx_odd = fused_module.group_norm_act_backward(odd, x, None, None, None, None, mean, rstd, 2, "silu")
    assert copies == [x.shape]  # the input gradient only: the gradient was read in place
    copies.clear()
    dx_far = fused_module.group_norm_act_backward(grad.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4),
                                                  x, None, None, None, None, mean, rstd, 2, "silu")  # fmt: skip
    assert len(copies) == 2  # a gradient in another layout is copied into the input's first
    dx = fused_module.group_norm_act_backward(grad, x, None, None, None, None, mean, rstd, 2, "silu")
    torch.testing.assert_close(dx_odd, dx, rtol=0, atol=0)
    torch.testing.assert_close(dx_far, dx, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "nsc", "nsc_folded"])
def test_statistics_hold_for_a_large_mean_and_many_chunks(fused, monkeypatch, layout):
    """A mean 10,000 times the spread: the one-pass E[x^2] - E[x]^2 in float32 loses the variance entirely, the
    kernels' shifted chunk moments combined by Chan's formula keep it. A small combine block makes the per-group
    reduction loop over its chunks; channels-last, a program merges several tiles' moments."""
    monkeypatch.setattr(fused, "MAX_BLOCK_K", 2)
    monkeypatch.setattr(fused, "CL_TILE", {"forward": 256, "backward": 256})
    monkeypatch.setattr(fused, "CL_LOOP", {"forward": 4, "backward": 4})
    x, *_ = inputs((1, 2, 5000), affine=False, scale_shift=False, mean=0.0)
    x = 100 + 0.005 * x  # spread 0.01
    monkeypatch.setattr(fused, "CL_FOLD_MAX_K", 4096 if layout == "nsc_folded" else 0)
    if layout.startswith("nsc"):
        x = channels_last(x, "nsc")
    y, mean, rstd = fused.group_norm_act_forward(x, None, None, None, None, 1, 1e-8, "none")
    exact = (x.double().flatten().var(unbiased=False) + 1e-8).rsqrt().reshape(1)
    naive = (x.square().mean() - x.mean().square()).clamp_min(0).add(1e-8).rsqrt().double().cpu()
    assert abs(float(naive.cpu() / exact.cpu()) - 1) > 0.1  # the test has teeth
    torch.testing.assert_close(rstd.double(), exact, rtol=2e-3, atol=0)
    torch.testing.assert_close(y.double(), reference(x, None, None, None, None, 1, "none", eps=1e-8), rtol=0,
                               atol=2e-3)  # fmt: skip


def test_bf16_output_is_within_one_rounding_of_the_exact_value(fused):
    x, weight, bias, factor, shift = inputs((2, 4, 2500), affine=True, scale_shift=True)
    x16, f16, s16 = x.bfloat16(), factor.bfloat16(), shift.bfloat16()
    y, _, _ = fused.group_norm_act_forward(x16, weight.bfloat16(), bias.bfloat16(), f16, s16, 2, 1e-5, "gelu")
    exact = reference(x16, weight.bfloat16(), bias.bfloat16(), f16, s16, 2, "gelu")
    assert y.dtype == torch.bfloat16
    # float32 arithmetic, one rounding to bf16 at the output: within one unit in the last place (2**-7 relative;
    # Triton's interpreter truncates where the GPU rounds to nearest), where PyTorch's chain rounds four times
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()


def test_chunks_fit_the_rows():
    # Show-1's rows: a ResNet norm at 40x64, 20x32, 5x8; a temporal norm at 8x40x64; SR1 at 160x256
    assert [fused_module.block_for(s) for s in (2560, 640, 40, 20480, 40960, 2100)] == [1024, 1024, 128, 1024, 1024,
                                                                                       1024]  # fmt: skip


def test_bad_arguments_are_named(fused):
    x = torch.randn(1, 6, 4, device=DEVICE)
    with pytest.raises(ValueError, match="activation='relu' must be one of"):
        fused.group_norm_act_forward(x, None, None, None, None, 3, 1e-5, "relu")
    with pytest.raises(ValueError, match="6 channels do not split into groups=4"):
        fused.group_norm_act_forward(x, None, None, None, None, 4, 1e-5, "silu")
    with pytest.raises(ValueError, match="factor and shift go together"):
        fused.group_norm_act_forward(x, None, None, torch.ones(1, 6, 1, device=DEVICE), None, 3, 1e-5, "silu")


@pytest.mark.parametrize("norm", ["scale_shift", "default"])
def test_recomputed_resnet_block_with_fused_norms_matches_diffusers(fused, norm, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4, time_embedding_norm=norm,
                          non_linearity="silu").requires_grad_(False).to(DEVICE)  # fmt: skip
    block.conv1.weight.requires_grad_(True)
    x = torch.randn(2, 8, 6, 6, device=DEVICE, requires_grad=True)
    temb = torch.randn(2, 12, device=DEVICE)
    seen = []
    forward = fused.group_norm_act_forward

    def counting_forward(*args):
        seen.append(args[7])
        return forward(*args)

    def run(fused_norms):
        with lean_backward.frozen_activations_recomputed(block, True, fused_norms=fused_norms):
            out = block(x, temb)
        return out, torch.autograd.grad(out.square().sum(), [x, block.conv1.weight])

    monkeypatch.setattr(lean_backward, "group_norm_act_forward", counting_forward)
    (out, grads), (fast_out, fast_grads) = run(False), run(True)
    assert seen == ["silu", "silu"]  # both pairs of the block ran fused, and only in the fused run
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    for fast, expected in zip(fast_grads, grads):
        torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("time_norm", "in_channels", "scale"),
                         [("default", 8, 1.0), ("scale_shift", 8, 1.4142), ("default", 16, 1.4142)])
@pytest.mark.parametrize("fold", [True, False])
def test_training_folds_frozen_resnet_biases_into_the_norm_and_residual_kernels(fused, monkeypatch, time_norm,
                                                                                in_channels, scale, fold):  # fmt: skip
    """Frozen convolutions keeping no input, fused norms: `conv1`'s bias (and a "default" time embedding) reach the
    second norm's kernels both ways, `conv2`'s and the shortcut's the residual kernel; same output and input
    gradient as diffusers' block as written (`fold` False: the passes of their own, as before)."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    # 8 -> 16 channels: a 1x1 shortcut convolution; 16 -> 16: none
    block = ResnetBlock2D(in_channels=in_channels, out_channels=16, temb_channels=12, groups=4,
                          time_embedding_norm=time_norm, output_scale_factor=scale).to(DEVICE)  # fmt: skip
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.bias.normal_(0, 1.0)
    block.requires_grad_(False)
    x = torch.randn(2, in_channels, 6, 6, device=DEVICE, requires_grad=True)
    temb = torch.randn(2, 12, device=DEVICE)
    monkeypatch.setattr(lean_backward, "FOLD_CONV_BIASES_TRAINING", fold)
    biases, sums = [], []
    forward, backward, residual_sum = (fused.group_norm_act_forward, fused.group_norm_act_backward,
                                       fused.residual_sum)  # fmt: skip
    monkeypatch.setattr(lean_backward, "group_norm_act_forward", lambda *a: biases.append(a[8] is not None)
                        or forward(*a))  # fmt: skip
    monkeypatch.setattr(lean_backward, "group_norm_act_backward", lambda *a: biases.append(a[10] is not None)
                        or backward(*a))  # fmt: skip
    monkeypatch.setattr(lean_backward, "residual_sum", lambda *a: sums.append(a[2] is not None) or residual_sum(*a))

    def run(enabled):
        with lean_backward.frozen_convs_keep_no_input(block, enabled), \
                lean_backward.frozen_activations_recomputed(block, enabled, fused_norms=enabled):  # fmt: skip
            out = block(x, temb)
        return out, torch.autograd.grad(out.square().sum(), x)[0]

    (out, grad), (fast_out, fast_grad) = run(False), run(True)
    # forward: norm1, norm2 (with the bias); backward: norm2's, norm1's
    assert biases == ([False, True, True, False] if fold else [False] * 4)
    assert sums == ([True] if fold else [])
    torch.testing.assert_close(fast_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="the refusal is for a UNet off CUDA")
def test_norm_kernels_triton_off_cuda_is_refused_with_the_reason():
    from diffusers import DDPMScheduler
    from tiny_models import tiny_unet3d

    config = MotionDistillationConfig(max_train_steps=1, num_frames=4, norm_kernels="triton",
                                      frozen_activations="recompute")  # fmt: skip
    with pytest.raises(ValueError, match="norm_kernels='triton' cannot run: the UNet is on cpu, not CUDA"):
        train_motion(tiny_unet3d(), torch.zeros(4, 4, 8, 8), torch.zeros(1, 7, 16), DDPMScheduler(), config,
                     progress=False)
    with pytest.raises(ValueError, match="norm_kernels='cuda' is not supported: use one of 'auto', 'torch'"):
        MotionDistillationConfig(norm_kernels="cuda")


def test_norm_kernels_triton_without_triton_names_the_import_error(monkeypatch):
    from diffusers import DDPMScheduler
    from tiny_models import tiny_unet3d

    from motion_adapters import training

    monkeypatch.setattr(training, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    config = MotionDistillationConfig(max_train_steps=1, num_frames=4, norm_kernels="triton")
    with pytest.raises(ValueError, match=r"cannot run: Triton cannot be imported \(ModuleNotFoundError: No module"):
        train_motion(tiny_unet3d(), torch.zeros(4, 4, 8, 8), torch.zeros(1, 7, 16), DDPMScheduler(), config,
                     progress=False)


COMPILE_FOR_HOPPER = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import motion_adapters.fused_norm as f

FLOAT32 = ("mean_part", "m2_part", "mean_ptr", "rstd_ptr", "s1_part", "s2_part", "c1_ptr", "c2_ptr")
for kernel in (f._chunk_moments, f._group_moments, f._normalize_act, f._chunk_grad_sums, f._group_grad_means,
               f._input_grad, f._residual_sum, f._bit_masked_scale):
    names = kernel.arg_names
    flags = [n for n in names if n.startswith(("HAS_", "ACTIVATION"))]
    for values in itertools.product(*[(0, 1, 2) if n == "ACTIVATION" else (True, False) for n in flags]):
        constexprs = {"BLOCK": 1024, "BLOCK_K": 64, **dict(zip(flags, values))}
        signature = {n: "constexpr" if n in constexprs else "*fp32" if n in FLOAT32 else "*u8" if n == "bits_ptr"
                     else "*bf16"
                     if n.endswith("_ptr") else "fp32" if n in ("eps", "scale") else "i32" for n in names}
        triton.compile(ASTSource(kernel, signature, {k: v for k, v in constexprs.items() if k in names}),
                       target=GPUTarget("cuda", 90, 32))
    print("compiled", kernel.__name__)
# channels-last kernels: every flag on or off, each with the group statistics folded in or not
for kernel in (f._cl_chunk_moments, f._cl_normalize_act, f._cl_chunk_grad_sums, f._cl_input_grad):
    names = kernel.arg_names
    flags = [n for n in names if n.startswith("HAS_")]
    for on, fold in itertools.product((True, False), (True, False)):
        constexprs = {"BLOCK_S": 64, "BLOCK_C": 64, "LOOP": 2, "CHUNK": 128, "BLOCK_K": 64, "ACTIVATION": 0,
                      "FOLD": fold, **dict.fromkeys(flags, on)}
        signature = {n: "constexpr" if n in constexprs else "*fp32" if n in FLOAT32 else "*bf16"
                     if n.endswith("_ptr") else "fp32" if n in ("eps", "scale") else "i32" for n in names}
        triton.compile(ASTSource(kernel, signature, {k: v for k, v in constexprs.items() if k in names}),
                       target=GPUTarget("cuda", 90, 32))
    print("compiled", kernel.__name__)
# the mask packing, and programmatic dependent launches (grid dependency control) in a kernel of each kind
triton.compile(ASTSource(f._pack_bits, {"mask_ptr": "*u8", "bits_ptr": "*u8", "n": "i32", "BYTES": "i32",
                                        "BLOCK": "constexpr", "PDL": "constexpr"}, {"BLOCK": 512, "PDL": True}),
               target=GPUTarget("cuda", 90, 32))
print("compiled", f._pack_bits.__name__)
for kernel, constexprs in ((f._cl_normalize_act, {"BLOCK_S": 64, "BLOCK_C": 64, "CHUNK": 128, "BLOCK_K": 64,
                                                  "ACTIVATION": 0, "FOLD": False}),
                           (f._group_moments, {"BLOCK": 1024, "BLOCK_K": 64}),
                           (f._add_layer_norm, {"HAS_A": True, "ROWS": 4, "BLOCK_C": 1024}),
                           (f._layer_norm_input_grad, {"HAS_G": True, "ROWS": 4, "BLOCK_C": 1024})):
    names = kernel.arg_names
    constexprs = {**constexprs, **{n: False for n in names if n.startswith("HAS_")}, "PDL": True}
    signature = {n: "constexpr" if n in constexprs else "*fp32" if n in FLOAT32 else "*bf16"
                 if n.endswith("_ptr") else "fp32" if n in ("eps", "scale") else "i32" for n in names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert "griddepcontrol.wait" in compiled.asm["ptx"] and "griddepcontrol.launch_dependents" in compiled.asm["ptx"]
    print("compiled with PDL", kernel.__name__)
"""


def test_kernels_compile_for_a_hopper_gpu_without_one():
    """The interpreter runs code the compiler refuses (a global read in a kernel, say): compile every kernel and
    every flag combination for sm_90, in a process with the interpreter off."""
    from hopper import compiled_for_hopper

    out = compiled_for_hopper(COMPILE_FOR_HOPPER)
    assert out.count("compiled _") == 13 and out.count("compiled with PDL") == 4, out


class _Block(torch.nn.Module):
    """A ResNet with the time embedding's scale and shift, then a temporal-convolution-style pair, as in Show-1."""

    def __init__(self):
        from diffusers.models.resnet import ResnetBlock2D

        super().__init__()
        self.resnet = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4,
                                    time_embedding_norm="scale_shift")  # fmt: skip
        self.conv = torch.nn.Sequential(torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Dropout(0.1),
                                        torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)))  # fmt: skip

    def forward(self, x, temb):
        h = self.resnet(x, temb)  # (B*F, C, H, W), F = 2
        return self.conv(h.unflatten(0, (-1, 2)).transpose(1, 2)).sum()


def test_fused_norm_activations_sample_like_the_modules_and_stand_aside_with_gradients(fused, monkeypatch):
    torch.manual_seed(0)
    model = _Block().to(DEVICE).eval()  # trainable parameters, as a loaded pipeline's UNet has them
    x, temb = torch.randn(4, 8, 6, 6, device=DEVICE), torch.randn(4, 12, device=DEVICE)
    calls = []
    forward = fused.group_norm_act_forward
    monkeypatch.setattr(lean_backward, "group_norm_act_forward",
                        lambda *a: calls.append((a[7], a[8] is not None)) or forward(*a))  # fmt: skip
    with torch.no_grad():
        expected = model(x, temb)
        with lean_backward.fused_norm_activations(model) as count:
            sampled = model(x, temb)
    # the ResNet's two pairs and the temporal pair ran fused; the second norm added conv1's bias
    assert count == 2 and calls == [("silu", False), ("silu", True), ("silu", False)]
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-4)
    calls.clear()
    with lean_backward.fused_norm_activations(model):
        with_grad = model(x, temb)
    assert calls == [] and with_grad.requires_grad  # gradients on: the modules ran as written
    torch.testing.assert_close(with_grad.detach(), expected, rtol=0, atol=0)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize(("time_norm", "in_channels"), [("scale_shift", 8), ("default", 8), ("scale_shift", 16)])
def test_sampling_folds_convolution_biases_into_the_fused_norms_that_follow(fused, monkeypatch, time_norm,
                                                                           in_channels):  # fmt: skip
    from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer

    torch.manual_seed(0)
    # 8 -> 16 channels: a 1x1 shortcut convolution; 16 -> 16: none; an output scale factor as SR1's
    resnet = ResnetBlock2D(in_channels=in_channels, out_channels=16, temb_channels=12, groups=4,
                           time_embedding_norm=time_norm, output_scale_factor=1.4142).to(DEVICE).eval()
    layer = TemporalConvLayer(16, 16, dropout=0.1, norm_num_groups=4).to(DEVICE).eval()
    with torch.no_grad():  # diffusers zero-initialises conv4; give every bias something to carry
        for module in (*resnet.modules(), *layer.modules()):
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                module.weight.normal_(0, 0.2)
                module.bias.normal_(0, 1.0)
    x, temb = torch.randn(4, in_channels, 6, 6, device=DEVICE), torch.randn(4, 12, device=DEVICE)
    calls, sums = [], []
    forward, residual_sum = fused.group_norm_act_forward, fused.residual_sum
    monkeypatch.setattr(lean_backward, "group_norm_act_forward",
                        lambda *a: calls.append(a[8] is not None) or forward(*a))  # fmt: skip
    monkeypatch.setattr(lean_backward, "residual_sum", lambda *a: sums.append(a[2] is not None) or residual_sum(*a))

    def run(x):
        return layer(resnet(x, temb), num_frames=2)

    with torch.no_grad():
        expected = run(x)
        with lean_backward.fused_norm_activations(resnet), lean_backward.fused_norm_activations(layer) as count:
            sampled = run(x)
    # ResNet: norm1, then norm2 with conv1's bias (and the time embedding, "default"); the temporal layer's four
    # norms, the last three with the bias of the convolution before them
    assert calls == [False, True, False, True, True, True] and count == 5  # the layer and its four sequences
    # conv2's bias (and the shortcut's) in the ResNet's residual addition, conv4's in the temporal layer's
    assert sums == [True, True]
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)
    assert all("forward" not in vars(m) for m in (*resnet.modules(), *layer.modules()))


@pytest.mark.parametrize(
    ("shape", "memory_format", "with_bias", "scale"),
    [
        ((2, 8, 5, 7), torch.channels_last, True, 1 / 1.4142),  # a ResNet's output, SR1's scale factor
        ((1, 6, 3, 4, 5), torch.channels_last_3d, True, 1.0),  # a temporal convolution layer's
        ((2, 8, 5, 7), torch.contiguous_format, True, 0.5),
        ((3, 4, 700), torch.contiguous_format, False, 1.0),  # several programs, the last partial
    ],
)
def test_residual_sum_adds_bias_residual_and_scale_in_one_pass_into_x(fused, shape, memory_format, with_bias, scale):
    g = torch.Generator().manual_seed(0)
    residual, x = (torch.randn(shape, generator=g).to(DEVICE).contiguous(memory_format=memory_format)
                   for _ in range(2))  # fmt: skip
    bias = torch.randn(shape[1], generator=g).to(DEVICE) if with_bias else None
    channel = bias.double().view(-1, *[1] * (len(shape) - 2)) if with_bias else 0.0
    expected = (residual.double() + x.double() + channel) * scale
    with torch.no_grad():
        out = fused.residual_sum(residual, x, bias, scale)
    assert out is x  # written into the convolution's output, its layout kept
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_residual_sum_of_differing_layouts_falls_back_to_torch(fused):
    residual = torch.randn(2, 8, 5, 7, device=DEVICE)
    x = torch.randn(2, 8, 5, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(8, device=DEVICE)
    with torch.no_grad():
        out = fused.residual_sum(residual, x, bias, 0.5)
    assert out is not x
    torch.testing.assert_close(out, (residual + x + bias[:, None, None]) * 0.5)
    x.requires_grad_(True)
    out = fused.residual_sum(residual, x, bias, 0.5)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 0.5))


@pytest.mark.parametrize("scale", [1.0, 1 / 1.4142])
def test_residual_sum_with_gradients_writes_a_new_tensor_and_passes_scaled_gradients(fused, monkeypatch, scale):
    g = torch.Generator().manual_seed(0)
    residual, x = (torch.randn(2, 8, 5, 7, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
                   .requires_grad_(True) for _ in range(2))  # fmt: skip
    bias = torch.randn(8, generator=g).to(DEVICE)
    before = x.detach().clone()
    launches = []
    kernel = fused._residual_sum

    class Counting:  # `kernel[grid](...)`, each launch recorded
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(fused, "_residual_sum", Counting())
    out = fused.residual_sum(residual, x, bias, scale)
    assert launches and out is not x and torch.equal(x.detach(), before)  # the kernel ran; x untouched
    torch.testing.assert_close(out, (residual + x + bias[:, None, None]) * scale, rtol=1e-6, atol=1e-6)
    grad = torch.randn(out.shape, generator=g).to(DEVICE)
    grad_residual, grad_x = torch.autograd.grad(out, (residual, x), grad)
    torch.testing.assert_close(grad_residual, grad * scale, rtol=0, atol=0)
    torch.testing.assert_close(grad_x, grad * scale, rtol=0, atol=0)
    # a bias that requires gradients gets them from PyTorch's operators
    trained = bias.clone().requires_grad_(True)
    (grad_bias,) = torch.autograd.grad(fused.residual_sum(residual, x, trained, scale).sum(), trained)
    torch.testing.assert_close(grad_bias, torch.full_like(bias, 2 * 5 * 7 * scale))


@pytest.mark.parametrize("memory_format", [torch.channels_last_3d, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_backward_reads_the_bits_in_one_pass(fused, monkeypatch, memory_format, dtype):
    """`_BitMaskDropout`'s backward on `bit_masked_scale`: PyTorch's values, with and without the kernel."""
    from motion_adapters.lean_backward import _BitMaskDropout

    calls = []
    kernel = fused.bit_masked_scale
    monkeypatch.setattr(lean_backward, "bit_masked_scale", lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(0)
    # 1 x 12 x 3 x 5 x 7 = 1260 values: not a multiple of 8 bits a byte, a partial last program
    x = torch.randn(1, 12, 3, 5, 7, generator=g).to(DEVICE, dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(x.shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    torch.manual_seed(1)
    out = _BitMaskDropout.apply(x, 0.1)
    (dx,) = torch.autograd.grad(out, x, grad)
    assert calls == [1] and dx.stride() == grad.stride()
    expected = (grad.float() * (out != 0).float() * (1 / 0.9)).to(dtype)  # PyTorch's float32 product, rounded
    torch.testing.assert_close(dx, expected, rtol=0 if dtype == torch.float32 else 8e-3, atol=0)
    tolerance = {"rtol": 0 if dtype == torch.float32 else 8e-3, "atol": 0}  # the interpreter truncates to bf16

    def again(gradient):
        torch.manual_seed(1)  # the same mask
        return torch.autograd.grad(_BitMaskDropout.apply(x, 0.1), x, gradient)[0]

    monkeypatch.setattr(lean_backward, "DROPOUT_BACKWARD_KERNEL", False)  # PyTorch's unpack and masked scale
    torch.testing.assert_close(again(grad), dx, **tolerance)
    monkeypatch.setattr(lean_backward, "DROPOUT_BACKWARD_KERNEL", True)
    if memory_format == torch.contiguous_format:
        other = grad.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        other = grad.contiguous()
    torch.testing.assert_close(again(other), expected, **tolerance)  # the mask's order differs: PyTorch's
    assert calls == [1]


def test_bit_masked_scale_refuses_what_it_cannot_read(fused):
    grad = torch.randn(4, 6, device=DEVICE)[:, ::2]  # every other column: not dense
    with pytest.raises(ValueError, match="dense gradient .*native_dropout_backward"):
        fused.bit_masked_scale(grad, torch.zeros(2, dtype=torch.uint8, device=DEVICE), 2.0)
    with pytest.raises(ValueError, match="at least one bit a value"):
        fused.bit_masked_scale(torch.randn(4, 6, device=DEVICE), torch.zeros(2, dtype=torch.uint8, device=DEVICE), 2.0)


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((1, 12, 3, 5, 7), torch.channels_last_3d), ((3, 5, 7), torch.contiguous_format), ((2, 16, 40, 64),
                                                                                       torch.channels_last)],
)
def test_pack_bits_kernel_packs_as_pytorchs_operators_do(fused, monkeypatch, shape, memory_format):
    """One pass against `_pack_bits`' PyTorch operators: memory order, first bit highest, a zero-padded last byte
    (1,260 and 105 values), several programs (40,960 values); `_unpack_bits` gets the mask back."""
    from motion_adapters.lean_backward import _memory_order, _pack_bits, _unpack_bits

    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(shape, generator=g) < 0.5).to(DEVICE).contiguous(memory_format=memory_format)
    bits = fused.pack_bits(mask)
    monkeypatch.setattr(lean_backward, "PACK_BITS_KERNEL", False)
    expected = _pack_bits(mask)
    assert bits.dtype == torch.uint8 and torch.equal(bits, expected)
    assert torch.equal(_unpack_bits(bits, mask.shape, _memory_order(mask)), mask)
    monkeypatch.setattr(lean_backward, "PACK_BITS_KERNEL", True)
    calls = []
    monkeypatch.setattr(lean_backward, "pack_bits", lambda m: calls.append(1) or fused.pack_bits(m))
    assert torch.equal(_pack_bits(mask), expected) and calls == [1]
    with pytest.raises(ValueError, match="dense bool mask"):
        fused.pack_bits(mask.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "c", "add"), [(40, 64, True), (9, 96, True), (12, 80, False)])
def test_frozen_add_layer_norm_matches_pytorchs_addition_and_norm(fused, dtype, m, c, add):
    """`(a + x, norm(a + x))` and the gradients reaching a and x from both outputs against PyTorch's addition and
    layer norm: channels not a power of two (96, 80 padded), rows not filling the last program."""
    from motion_adapters.lean_backward import frozen_add_layer_norm, frozen_layer_norm_applies

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.LayerNorm(c).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
        norm.bias.copy_(0.5 * torch.randn(c, generator=g))
    norm.requires_grad_(False)
    x = (3 + torch.randn(m, c, generator=g)).to(DEVICE, dtype).requires_grad_(True)  # a mean far from 0
    a = torch.randn(m, c, generator=g).to(DEVICE, dtype).requires_grad_(True)
    grad_s, grad_y = (torch.randn(m, c, generator=g).to(DEVICE, dtype) for _ in range(2))
    assert frozen_layer_norm_applies(norm.to(dtype), x)
    norm = norm.to(dtype)

    def run(fn):
        out = fn()
        outputs = out if add else (out,)
        grads = torch.autograd.grad(outputs, (a, x) if add else (x,), (grad_s, grad_y) if add else (grad_y,))
        return [t.detach() for t in (*outputs, *grads)]

    got = run(lambda: frozen_add_layer_norm(norm, a if add else None, x))
    expected = run(lambda: (lambda s: (s, norm(s)))(a + x) if add else norm(x))
    exact = run(lambda: (lambda s: (s, torch.nn.functional.layer_norm(
        s, (c,), norm.weight.double(), norm.bias.double(), norm.eps)))(a.double() + x.double()) if add else
        torch.nn.functional.layer_norm(x.double(), (c,), norm.weight.double(), norm.bias.double(), norm.eps))
    if dtype == torch.float32:
        for mine, theirs in zip(got, expected):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        return
    # bf16: one rounding of each output (PyTorch's backward rounds the norm's gradient, then the sum), so both are
    # held to float64 and ours must be as close as PyTorch's
    if add:  # the sum: rounded alike on a GPU; Triton's interpreter truncates to bf16 (one unit of the last place)
        torch.testing.assert_close(got[0], expected[0], rtol=0 if DEVICE == "cuda" else 8e-3, atol=0)
    for mine, theirs, truth in zip(got, expected, exact):
        err = lambda t: float((t.double() - truth.double()).norm() / truth.double().norm())  # noqa: E731
        assert err(mine) <= 1.5 * err(theirs) + 1e-3, (err(mine), err(theirs))


def test_frozen_layer_norm_leaves_trained_or_unaffine_norms_and_no_grad_to_pytorch(fused):
    from motion_adapters import lean_backward as lb

    x = torch.randn(8, 16, device=DEVICE)
    norm = torch.nn.LayerNorm(16).to(DEVICE).requires_grad_(False)
    assert lb.frozen_layer_norm_applies(norm, x)
    assert not lb.frozen_layer_norm_applies(torch.nn.LayerNorm(16).to(DEVICE), x)  # its weight trains
    assert not lb.frozen_layer_norm_applies(torch.nn.LayerNorm(16, elementwise_affine=False).to(DEVICE), x)
    assert not lb.frozen_layer_norm_applies(norm, x[None])  # not (M, C) rows
    with torch.no_grad():
        assert not lb.frozen_layer_norm_applies(norm, x)
    with pytest.raises(ValueError, match=r"contiguous \(M, C\) rows, a and x of one shape and dtype"):
        fused.add_layer_norm_forward(x[:4], x, norm.weight, norm.bias, norm.eps)
    with pytest.raises(ValueError, match="contiguous"):
        fused.add_layer_norm_forward(None, x.t(), norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("layout", ["contiguous", "nhwc", "ndhwc"])
@pytest.mark.parametrize("extra_layout", ["same", "other"])
def test_backward_adds_another_gradient_of_x_inside_the_kernel_or_after_it(fused, monkeypatch, layout,
                                                                          extra_layout):  # fmt: skip
    """`group_norm_act_backward(extra=...)`: the norm's input gradient plus `extra`, in the kernel where `extra`
    has x's strides (no addition of its own), else by PyTorch's addition."""
    shape = (1, 8, 3, 4, 6) if layout == "ndhwc" else (2, 8, 5, 6)
    x, weight, bias, factor, shift = inputs(shape, True, False)
    if layout != "contiguous":
        x = channels_last(x, layout)
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(shape, generator=g).to(DEVICE)
    extra = torch.empty_like(x).copy_(torch.randn(shape, generator=g).to(DEVICE))  # x's strides
    if extra_layout == "other":
        extra = extra.contiguous() if layout != "contiguous" else channels_last(extra, "nhwc")
        assert extra.stride() != x.stride()
    y, mean, rstd = fused.group_norm_act_forward(x, weight, bias, None, None, 4, 1e-5, "silu")
    alone = fused.group_norm_act_backward(grad, x, weight, bias, None, None, mean, rstd, 4, "silu")
    adds = []
    add = torch.Tensor.__add__
    monkeypatch.setattr(torch.Tensor, "__add__", lambda a, b: adds.append(1) or add(a, b))
    summed = fused.group_norm_act_backward(grad, x, weight, bias, None, None, mean, rstd, 4, "silu", None, extra)
    assert len(adds) == (0 if extra_layout == "same" else 1)
    assert summed.stride() == x.stride()
    torch.testing.assert_close(summed, alone + extra, rtol=1e-5, atol=1e-5)


def _adds_in_backward(out: torch.Tensor, inputs_: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], int]:
    """The gradients of `out.square().sum()` and how many tensor additions the backward pass ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Adds(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
                Adds.count += 1
            return func(*args, **(kwargs or {}))

    loss = out.square().sum()
    with Adds():
        grads = torch.autograd.grad(loss, inputs_)
    return grads, Adds.count


@pytest.mark.parametrize("in_channels", [16, 8])  # no shortcut; a 1 x 1 shortcut convolution
def test_skip_grads_in_norms_sum_a_resnets_residual_gradient_in_norm1s_kernel(fused, monkeypatch, in_channels):
    """SKIP_GRADS_IN_NORMS: norm1's input-gradient kernel adds the gradient the residual path brings to the block's
    input, so autograd runs one addition fewer; output and gradients as before."""
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=in_channels, out_channels=16, temb_channels=12, groups=4).to(DEVICE)
    block.requires_grad_(False)
    x = torch.randn(2, in_channels, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    temb = torch.randn(2, 12, device=DEVICE)

    def run(skip):
        monkeypatch.setattr(lean_backward, "SKIP_GRADS_IN_NORMS", skip)
        with lean_backward.frozen_convs_keep_no_input(block, True), \
                lean_backward.frozen_activations_recomputed(block, True, fused_norms=True):  # fmt: skip
            out = block(x, temb)
        return out, *_adds_in_backward(out, [x])

    (out, grads, adds), (skip_out, skip_grads, skip_adds) = run(False), run(True)
    assert skip_adds == adds - 1
    torch.testing.assert_close(skip_out, out, rtol=0, atol=0)
    torch.testing.assert_close(skip_grads[0], grads[0], rtol=1e-5, atol=1e-6)


def test_skip_grads_in_norms_sum_a_temporal_conv_layers_residual_gradient_in_its_first_norm(fused, monkeypatch):
    """SKIP_GRADS_IN_NORMS: a temporal convolution layer's first norm adds its residual's gradient in its kernel;
    the layer's forward is replaced only while training on the fused kernels, output and gradients as before."""
    from diffusers.models.resnet import TemporalConvLayer

    torch.manual_seed(0)
    layer = TemporalConvLayer(16, 16, dropout=0.1, norm_num_groups=4).to(DEVICE)
    with torch.no_grad():
        layer.conv4[-1].weight.normal_(0, 0.1)  # diffusers zero-initialises the last convolution
    layer.requires_grad_(False).train()
    x = torch.randn(6, 16, 4, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def run(skip):
        monkeypatch.setattr(lean_backward, "SKIP_GRADS_IN_NORMS", skip)
        torch.manual_seed(1)  # the same dropout masks
        with lean_backward.frozen_convs_keep_no_input(layer, True), \
                lean_backward.frozen_activations_recomputed(layer, True, fused_norms=True) as count:  # fmt: skip
            out = layer(x, num_frames=3)
        return count, out, *_adds_in_backward(out, [x])

    (count, out, grads, adds), (skip_count, skip_out, skip_grads, skip_adds) = run(False), run(True)
    assert (count, skip_count) == (4, 5)  # the four sequences, then the layer too
    assert "forward" not in vars(layer)  # restored
    assert skip_adds == adds - 1
    torch.testing.assert_close(skip_out, out, rtol=0, atol=0)
    torch.testing.assert_close(skip_grads[0], grads[0], rtol=1e-5, atol=1e-6)
    with lean_backward.frozen_activations_recomputed(layer, True, fused_norms=False) as count:
        assert count == 4  # not on PyTorch's norms
