"""Frozen 3 x 3 convolutions on the implicit-GEMM kernel (`motion_adapters.implicit_conv`), in Triton's interpreter
on the CPU (conftest.py) or compiled on a GPU."""

import pytest
import torch

from motion_adapters import im2col_conv, implicit_conv
from motion_adapters.implicit_conv import ImplicitConv
from motion_adapters.lean_backward import conv_keeping_no_input

interpreted = pytest.mark.skipif(not implicit_conv.fused_norm_available(torch.zeros(1)),
                                 reason="needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")


@pytest.fixture
def implicit_calls(monkeypatch):
    """Switched on for every convolution of 1 row or more (the gather-and-GEMM path for few rows off: it comes
    first); the shapes of the inputs it ran on."""
    monkeypatch.setattr(im2col_conv, "IM2COL_CONVS", False)
    monkeypatch.setattr(implicit_conv, "IMPLICIT_CONVS", True)
    monkeypatch.setattr(implicit_conv, "MIN_ROWS", 1)
    calls = []
    apply = ImplicitConv.apply
    monkeypatch.setattr(ImplicitConv, "apply", lambda *a: calls.append(tuple(a[0].shape)) or apply(*a))
    return calls


def channels_last(shape, seed, dtype=torch.float32, scale=1.0):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    return t.to(dtype).contiguous(memory_format=torch.channels_last)


@interpreted
@pytest.mark.parametrize(("shape", "out_channels", "bias"), [
    ((2, 64, 5, 7), 128, True),  # 70 pixels: one partial pixel tile; 128 output channels: one full channel tile
    ((3, 128, 6, 6), 192, False),  # 192 = 3 x 64: tiles of 64 channels; tiles across the images' edges
    ((1, 64, 9, 4), 64, True),  # a tall, narrow image
])  # fmt: skip
def test_the_convolution_and_its_input_gradient_match_conv2d(implicit_calls, shape, out_channels, bias):
    weight = channels_last((out_channels, shape[1], 3, 3), 1, scale=(9 * shape[1]) ** -0.5)
    b = torch.randn(out_channels, generator=torch.Generator().manual_seed(4)) if bias else None
    x = channels_last(shape, 2).requires_grad_(True)
    out = conv_keeping_no_input(x, weight, b, [1, 1], [1, 1], [1, 1], 1)
    grad_out = channels_last(tuple(out.shape), 3)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    exact_x = x.detach().double().requires_grad_(True)
    expected = torch.nn.functional.conv2d(exact_x, weight.double(), None if b is None else b.double(), padding=1)
    (expected_grad,) = torch.autograd.grad(expected, exact_x, grad_out.double())
    assert implicit_calls == [shape]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)
    for tensor in (out, grad):
        assert tensor.is_contiguous(memory_format=torch.channels_last) and tensor.dtype == torch.float32
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        conv_keeping_no_input(x, weight, b, [1, 1], [1, 1], [1, 1], 1)
    assert saved == [weight.shape]  # the weight only


@interpreted
def test_bf16_results_are_within_a_rounding_of_the_float64_convolution(implicit_calls):
    """bf16 in and out, the nine taps and 128 channels summed in float32 and rounded once."""
    x = channels_last((2, 128, 4, 6), 0, torch.bfloat16).requires_grad_(True)
    weight = channels_last((64, 128, 3, 3), 1, torch.bfloat16, scale=(9 * 128) ** -0.5)
    out = conv_keeping_no_input(x, weight, None, [1, 1], [1, 1], [1, 1], 1)
    grad_out = channels_last(tuple(out.shape), 3, torch.bfloat16)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    exact_x = x.detach().double().requires_grad_(True)
    expected = torch.nn.functional.conv2d(exact_x, weight.double(), padding=1)
    (expected_grad,) = torch.autograd.grad(expected, exact_x, grad_out.double())
    assert out.dtype == grad.dtype == torch.bfloat16 and len(implicit_calls) == 1
    for got, want in ((out, expected), (grad, expected_grad)):
        # one rounding to bf16 (2**-8 relative, 2**-7 where the interpreter truncates) of float32 sums
        assert ((got.double() - want).abs() <= want.abs() * 2**-7 + 1e-5).all()


@interpreted
@pytest.mark.parametrize("case", ["stride_2", "no_padding", "contiguous_input", "contiguous_weight", "channels_96",
                                  "few_rows", "switched_off"])  # fmt: skip
def test_other_convolutions_stay_where_they_ran(implicit_calls, monkeypatch, case):
    channels = 96 if case == "channels_96" else 64  # the reduced channels must be a multiple of BLOCK_K
    weight = channels_last((64, channels, 3, 3), 1)
    if case == "contiguous_weight":
        weight = weight.contiguous()
    x = channels_last((2, channels, 5, 8), 2)
    if case == "contiguous_input":
        x = x.contiguous()
    if case == "few_rows":
        monkeypatch.setattr(implicit_conv, "MIN_ROWS", 81)  # 80 output pixels
    if case == "switched_off":
        monkeypatch.setattr(implicit_conv, "IMPLICIT_CONVS", False)
    stride, padding = (2 if case == "stride_2" else 1), (0 if case == "no_padding" else 1)
    out = conv_keeping_no_input(x, weight, None, [stride] * 2, [padding] * 2, [1, 1], 1)
    assert implicit_calls == []
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, None, stride, padding))


@interpreted
def test_64_bit_offsets_give_the_same_results(implicit_calls, monkeypatch):
    """Offsets past 2**31 elements (on the meta device: nothing allocated) take 64-bit addressing; forced on a small
    convolution, the same results as 32-bit offsets."""
    rows, weight_meta = torch.empty((2**31 - 2**24) // 64, 64, device="meta"), torch.empty(64, 64, 3, 3, device="meta")
    assert implicit_conv._wide(rows, weight_meta, 64) and not implicit_conv._wide(rows[:-1], weight_meta, 64)
    assert implicit_conv._wide(rows[:1000], weight_meta, 2**22)  # the output's offsets
    x = channels_last((2, 64, 5, 7), 0).requires_grad_(True)
    weight = channels_last((128, 64, 3, 3), 1, scale=(9 * 64) ** -0.5)
    results = []
    for wide in (False, True):
        monkeypatch.setattr(implicit_conv, "_wide", lambda *args, wide=wide: wide)
        out = conv_keeping_no_input(x, weight, None, [1, 1], [1, 1], [1, 1], 1)
        results.append((out, *torch.autograd.grad(out, x, torch.ones_like(out))))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert len(implicit_calls) == 2


def test_off_by_default():
    assert implicit_conv.IMPLICIT_CONVS is False


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import motion_adapters.implicit_conv as ic

kernel = ic._conv3x3
# the JIT specialises pointers and integers divisible by 16 (Show-1's widths, torch's allocations): so here
aligned = ("x_ptr", "w_ptr", "b_ptr", "out_ptr", "ROWS", "C_RED", "N_OUT", "TAP_STRIDE")
for flip in (False, True):
    for block_n in (128, 64):
        meta = {"FLIP": flip, "HAS_BIAS": not flip, "HALF_DOTS": True, "WIDE": flip and block_n == 64,
                "BLOCK_M": ic.BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": ic.BLOCK_K, "GROUP_M": ic.GROUP_M}
        signature = {n: "constexpr" if n in meta else "*bf16" if n.endswith("_ptr") else "i32"
                     for n in kernel.arg_names}
        strided = ("S_RED",) if flip else ("S_N",)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned + strided}
        compiled = triton.compile(ASTSource(kernel, signature, meta, attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": ic.NUM_WARPS, "num_stages": ic.NUM_STAGES})
        ptx = compiled.asm["ptx"]
        print("compiled", flip, block_n, "wgmma" in ptx, "cp.async" in ptx)
"""


@pytest.mark.skipif(implicit_conv.triton is None, reason="needs Triton")
def test_kernel_compiles_for_a_hopper_gpu_to_pipelined_tensor_core_code():
    """For sm_90 with the interpreter off, both directions, both channel tiles (one of them on 64-bit offsets):
    wgmma products fed by asynchronous copies (the loop software-pipelined over `NUM_STAGES`)."""
    from hopper import compiled_for_hopper

    out = compiled_for_hopper(COMPILE_FOR_HOPPER)
    assert out.count("compiled ") == 4 and out.count(" True True") == 4, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("channels_in", "channels_out", "size"), [(320, 320, (40, 64)), (640, 320, (40, 64)),
                                                                   (640, 640, (20, 32)), (1280, 640, (20, 32))])
def test_compiled_kernel_matches_cudnn_in_bf16_at_show1_base_shapes(implicit_calls, channels_in, channels_out, size):
    """Show-1-base's 40 x 64 and 20 x 32 levels on the GPU: output and input gradient against cuDNN's, both against
    float32."""
    from cudnn_reference import assert_as_close_as_cudnn

    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, device="cuda", generator=generator) * scale
        return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    x = randn(8, channels_in, *size).requires_grad_(True)
    weight = randn(channels_out, channels_in, 3, 3, scale=(9 * channels_in) ** -0.5)
    bias = torch.randn(channels_out, device="cuda", generator=generator).to(torch.bfloat16)
    grad_out = randn(8, channels_out, *size)
    out = conv_keeping_no_input(x, weight, bias, [1, 1], [1, 1], [1, 1], 1)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert implicit_calls == [tuple(x.shape)]
    assert_as_close_as_cudnn(out, grad, x, weight, bias, grad_out)
