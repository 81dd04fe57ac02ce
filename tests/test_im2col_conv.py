"""Frozen 3 x 3 convolutions of few pixels as a gather and a GEMM (`motion_adapters.im2col_conv`), in Triton's
interpreter on the CPU (conftest.py) or compiled on a GPU."""

import pytest
import torch

from motion_adapters import im2col_conv
from motion_adapters.im2col_conv import Im2colConv, fold_neighbourhoods, gather_neighbourhoods
from motion_adapters.lean_backward import conv_keeping_no_input

interpreted = pytest.mark.skipif(not im2col_conv.fused_norm_available(torch.zeros(1)),
                                 reason="needs Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")


@pytest.fixture
def im2col_calls(monkeypatch):
    calls = []
    apply = Im2colConv.apply
    monkeypatch.setattr(Im2colConv, "apply", lambda *a: calls.append(tuple(a[0].shape)) or apply(*a))
    return calls


def channels_last(shape, seed, dtype=torch.float64):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last)


@interpreted
def test_the_gathered_matrix_holds_each_pixels_zero_padded_neighbourhood():
    x = channels_last((2, 3, 4, 5), 0)
    columns = gather_neighbourhoods(x)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for n, h, w in [(0, 0, 0), (1, 3, 4), (1, 2, 1)]:
        row = columns[(n * 4 + h) * 5 + w].view(3, 3, 3)  # (i, j, c)
        torch.testing.assert_close(row, padded[n, :, h : h + 3, w : w + 3].permute(1, 2, 0), rtol=0, atol=0)


@interpreted
def test_folding_is_the_adjoint_of_gathering():
    x = channels_last((2, 70, 3, 5), 1)  # 70 channels: a partial channel block
    d = torch.randn(2 * 3 * 5, 9 * 70, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    folded = fold_neighbourhoods(d, x.shape, torch.float64)
    assert folded.is_contiguous(memory_format=torch.channels_last)
    # <gather(x), d> == <x, fold(d)>
    torch.testing.assert_close((gather_neighbourhoods(x) * d).sum(), (x * folded).sum(), rtol=1e-12, atol=1e-12)


@interpreted
@pytest.mark.parametrize(("shape", "bias"), [((8, 6, 5, 8), True), ((3, 70, 4, 7), False), ((1, 5, 1, 6), True)])
def test_the_convolution_and_its_input_gradient_match_conv2d(im2col_calls, shape, bias):
    weight = channels_last((9, shape[1], 3, 3), 1)
    b = torch.randn(9, dtype=torch.float64) if bias else None
    x = channels_last(shape, 2).requires_grad_(True)
    out = conv_keeping_no_input(x, weight, b, [1, 1], [1, 1], [1, 1], 1)
    grad_out = channels_last(tuple(out.shape), 3)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    reference_x = x.detach().requires_grad_(True)
    expected = torch.nn.functional.conv2d(reference_x, weight, b, padding=1)
    (expected_grad,) = torch.autograd.grad(expected, reference_x, grad_out)
    assert im2col_calls == [shape]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    for tensor in (out, grad):
        assert tensor.is_contiguous(memory_format=torch.channels_last)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        conv_keeping_no_input(x, weight, b, [1, 1], [1, 1], [1, 1], 1)
    assert saved == [weight.shape]  # the weight only


@interpreted
@pytest.mark.parametrize("case", ["many_rows", "stride_2", "no_padding", "contiguous_input", "contiguous_weight",
                                  "switched_off"])  # fmt: skip
def test_other_convolutions_stay_on_cudnn(im2col_calls, monkeypatch, case):
    shape = (8, 6, 10, 16) if case == "many_rows" else (2, 6, 5, 8)  # 1,280 rows against 80
    weight = channels_last((4, 6, 3, 3), 1)
    if case == "contiguous_weight":
        weight = weight.contiguous()
    x = channels_last(shape, 2)
    if case == "contiguous_input":
        x = x.contiguous()
    if case == "switched_off":
        monkeypatch.setattr(im2col_conv, "IM2COL_CONVS", False)
    stride, padding = (2 if case == "stride_2" else 1), (0 if case == "no_padding" else 1)
    out = conv_keeping_no_input(x, weight, None, [stride] * 2, [padding] * 2, [1, 1], 1)
    assert im2col_calls == []
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, None, stride, padding))


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import motion_adapters.im2col_conv as ic

blocks = {"BLOCK_R": ic.BLOCK_R, "BLOCK_C": ic.BLOCK_C}
taps = {**blocks, "TAPS": 3, "F64": False}
for kernel, meta, pointers in ((ic._gather, blocks, ("bf16", "bf16")),
                               (ic._fold, {**blocks, "F64": False}, ("fp32", "bf16")),
                               (ic._fold_taps, {**taps, "DIRECTION": 1, "HAS_B": True}, ("fp32", "bf16", "bf16")),
                               (ic._fold_taps, {**taps, "DIRECTION": -1, "HAS_B": False}, ("fp32", "bf16", "bf16"))):
    names = [n for n in kernel.arg_names if n.endswith("_ptr")]
    signature = {n: "constexpr" if n in meta else "i32" for n in kernel.arg_names}
    signature.update({n: f"*{dtype}" for n, dtype in zip(names, pointers)})
    triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
    print("compiled", kernel.__name__)
"""


@pytest.mark.skipif(im2col_conv.triton is None, reason="needs Triton")
def test_kernels_compile_for_a_hopper_gpu_without_one():
    """The interpreter runs code the compiler refuses: compile the kernels for sm_90 with the interpreter off (the
    frame taps' fold forward, with a bias, and backward)."""
    from hopper import compiled_for_hopper

    assert compiled_for_hopper(COMPILE_FOR_HOPPER).count("compiled ") == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_in, channels_out", [(1280, 1280), (2560, 1280), (960, 1280)])
def test_compiled_kernels_match_cudnn_in_bf16_at_show1_base_deepest_level(im2col_calls, channels_in, channels_out):
    """Show-1-base's 5 x 8 level on the GPU: output and input gradient against cuDNN's, both against float32."""
    from cudnn_reference import assert_as_close_as_cudnn

    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, device="cuda", generator=generator) * scale
        return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    x = randn(8, channels_in, 5, 8).requires_grad_(True)
    weight = randn(channels_out, channels_in, 3, 3, scale=(9 * channels_in) ** -0.5)
    bias = torch.randn(channels_out, device="cuda", generator=generator).to(torch.bfloat16)
    grad_out = randn(8, channels_out, 5, 8)
    out = conv_keeping_no_input(x, weight, bias, [1, 1], [1, 1], [1, 1], 1)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert im2col_calls == [tuple(x.shape)]
    assert_as_close_as_cudnn(out, grad, x, weight, bias, grad_out)
