"""Frozen temporal convolutions of one channels-last clip as one GEMM per tap (`lean_backward._FrameTapsConv`)."""

import pytest
import torch

from motion_adapters import lean_backward
from motion_adapters.lean_backward import frozen_convs_keep_no_input
from motion_adapters.training_step import FrameConv


def frame_conv(channels, out_channels, k=3, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv3d(channels, out_channels, (k, 1, 1), padding=(k // 2, 0, 0), bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=dtype) / channels**0.5)
        if bias:
            conv.bias.copy_(torch.randn(out_channels, generator=g, dtype=dtype))
    conv.requires_grad_(False)
    wrapped = torch.nn.Sequential(FrameConv(conv))
    wrapped[0].weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)  # as layout.py does
    return conv, wrapped


def clip(shape, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    return x.requires_grad_(True)


@pytest.fixture
def taps_calls(monkeypatch):
    monkeypatch.setattr(lean_backward, "FRAME_CONV_GEMMS", True)
    calls = []
    apply = lean_backward._FrameTapsConv.apply
    monkeypatch.setattr(lean_backward._FrameTapsConv, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    return calls


@pytest.fixture(params=[False, True], ids=["accumulated", "folded"])
def folded(request, monkeypatch):
    """Each tap's GEMM accumulated in turn, or (FRAME_TAPS_FOLDED_MAX_ROWS) one GEMM of all taps and a fold; the
    list of the folds' (rows, columns) shapes."""
    folds = []
    monkeypatch.setattr(lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 10**6 if request.param else 0)
    if request.param:
        fold = lean_backward.fold_frame_taps
        monkeypatch.setattr(lean_backward, "fold_frame_taps", lambda z, *a, **kw: folds.append(z.shape) or
                            fold(z, *a, **kw))  # fmt: skip
    return request.param, folds


@pytest.mark.parametrize(("k", "frames", "bias"), [(3, 6, True), (3, 1, True), (5, 4, False), (3, 2, False)])
def test_frame_taps_give_the_convolution_and_its_input_gradient(taps_calls, folded, k, frames, bias):
    conv, wrapped = frame_conv(5, 7, k=k, bias=bias)
    x = clip((1, 5, frames, 3, 4))
    expected = conv(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    with frozen_convs_keep_no_input(wrapped, True):
        out = wrapped(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert taps_calls == [x.shape]
    # folded: the forward pass's (rows, out * k) products, then the input gradient's (rows, k * in)
    assert folded[1] == ([(frames * 12, 7 * k), (frames * 12, k * 5)] if folded[0] else [])
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert grad.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_frame_taps_keep_only_the_weight_for_the_backward_pass(taps_calls):
    conv, wrapped = frame_conv(4, 4)
    x = clip((1, 4, 5, 2, 3))
    saved = []
    with frozen_convs_keep_no_input(wrapped, True), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):  # fmt: skip
        wrapped(x)
    assert taps_calls and saved == [conv.weight.shape]


@pytest.mark.parametrize("case", ["two_clips", "contiguous_clip", "contiguous_weight"])
def test_frame_taps_leave_other_layouts_to_cudnn_with_the_same_values(taps_calls, case):
    conv, wrapped = frame_conv(4, 6)
    x = clip((2 if case == "two_clips" else 1, 4, 5, 2, 3))
    if case == "contiguous_clip":
        x = x.detach().contiguous().requires_grad_(True)
    if case == "contiguous_weight":
        wrapped[0].weight.data = conv.weight.data.contiguous()
    with frozen_convs_keep_no_input(wrapped, True):
        out = wrapped(x)
    assert taps_calls == []
    torch.testing.assert_close(out, conv(x), rtol=1e-12, atol=1e-12)


def test_frame_taps_run_in_the_autocast_dtype(taps_calls, folded):
    conv, wrapped = frame_conv(8, 8, dtype=torch.float32)
    x = clip((1, 8, 4, 3, 3), dtype=torch.float32)
    expected = conv(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    wrapped[0].weight.data = conv.weight.data.bfloat16()  # bf16 frozen weights (shared), as train_motion keeps them
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_convs_keep_no_input(wrapped, True):
        out = wrapped(x)
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    assert taps_calls == [x.shape] and out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    assert len(folded[1]) == (2 if folded[0] else 0)
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)  # bf16 inputs, three roundings
    torch.testing.assert_close(grad, expected_grad, rtol=5e-2, atol=5e-2)


def test_folded_taps_only_up_to_their_rows(taps_calls, monkeypatch):
    """FRAME_TAPS_FOLDED_MAX_ROWS: a clip of more rows keeps the accumulated taps; bf16 output either way within a
    rounding or two of the float64 convolution of the same bf16 values (Triton's interpreter truncates to bf16
    where the GPU rounds to nearest, so the fold's one rounding is not compared here)."""
    folds = []
    fold = lean_backward.fold_frame_taps
    monkeypatch.setattr(lean_backward, "fold_frame_taps", lambda *a, **kw: folds.append(1) or fold(*a, **kw))
    _, wrapped = frame_conv(64, 64)
    x = clip((1, 64, 4, 3, 3)).detach().bfloat16()
    weight, bias = wrapped[0].weight.data.bfloat16(), wrapped[0].bias.data.bfloat16()
    exact = torch.nn.functional.conv3d(x.double(), weight.double(), bias.double(), padding=(1, 0, 0))
    for rows in (4 * 9, 4 * 9 - 1):
        monkeypatch.setattr(lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", rows)
        bf16 = torch.nn.Sequential(FrameConv(torch.nn.Conv3d(64, 64, (3, 1, 1), padding=(1, 0, 0))))
        bf16[0].weight.data, bf16[0].bias.data = weight, bias
        with frozen_convs_keep_no_input(bf16.requires_grad_(False), True):
            out = bf16(x)
        torch.testing.assert_close(out.double(), exact, rtol=2**-7, atol=2**-7)
    assert len(taps_calls) == 2 and len(folds) == 1  # the 36 rows folded, the 35 not


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("channels", "height", "width"), [(1280, 5, 8), (960, 10, 16)])
def test_folded_taps_are_as_close_to_float32_as_cudnn_at_show1_base_lower_levels(taps_calls, monkeypatch, channels,
                                                                                   height, width):  # fmt: skip
    """bf16 on the GPU, folded (one GEMM with a float32 output, then the fold): the output and input gradient no
    further from float32 than cuDNN's bf16 convolution's, within 1.5 times its largest error plus 1e-3."""
    monkeypatch.setattr(lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 8 * height * width)
    conv, wrapped = frame_conv(channels, channels, dtype=torch.float32)
    conv, wrapped = conv.cuda(), wrapped.cuda()
    wrapped[0].weight.data = wrapped[0].weight.data.bfloat16()
    wrapped[0].bias.data = conv.bias.data.bfloat16()
    x = clip((1, channels, 8, height, width), dtype=torch.float32).detach().cuda().bfloat16().requires_grad_(True)
    grad_out = torch.randn_like(x)
    with frozen_convs_keep_no_input(wrapped, True):
        out = wrapped(x)
        (grad,) = torch.autograd.grad(out, x, grad_out)
    assert taps_calls == [x.shape]
    weight, bias = wrapped[0].weight.data, wrapped[0].bias.data
    reference_x = x.detach().float().requires_grad_(True)
    expected = torch.nn.functional.conv3d(reference_x, weight.float(), bias.float(), padding=(1, 0, 0))
    (expected_grad,) = torch.autograd.grad(expected, reference_x, grad_out.float())
    cudnn_x = x.detach().requires_grad_(True)
    cudnn = torch.nn.functional.conv3d(cudnn_x, weight, bias, padding=(1, 0, 0))
    (cudnn_grad,) = torch.autograd.grad(cudnn, cudnn_x, grad_out)
    for ours, theirs, exact in ((out, cudnn, expected), (grad, cudnn_grad, expected_grad)):
        error, cudnn_error = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
        assert error <= 1.5 * cudnn_error + 1e-3, (error, cudnn_error)
