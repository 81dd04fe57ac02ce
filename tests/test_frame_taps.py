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


@pytest.mark.parametrize(("k", "frames", "bias"), [(3, 6, True), (3, 1, True), (5, 4, False), (3, 2, False)])
def test_frame_taps_give_the_convolution_and_its_input_gradient(taps_calls, k, frames, bias):
    conv, wrapped = frame_conv(5, 7, k=k, bias=bias)
    x = clip((1, 5, frames, 3, 4))
    expected = conv(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    with frozen_convs_keep_no_input(wrapped, True):
        out = wrapped(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert taps_calls == [x.shape]
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


def test_frame_taps_run_in_the_autocast_dtype(taps_calls):
    conv, wrapped = frame_conv(8, 8, dtype=torch.float32)
    x = clip((1, 8, 4, 3, 3), dtype=torch.float32)
    expected = conv(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    wrapped[0].weight.data = conv.weight.data.bfloat16()  # bf16 frozen weights (shared), as train_motion keeps them
    with torch.autocast("cpu", dtype=torch.bfloat16), frozen_convs_keep_no_input(wrapped, True):
        out = wrapped(x)
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    assert taps_calls == [x.shape] and out.dtype == torch.bfloat16 and grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)  # bf16 inputs, three roundings
    torch.testing.assert_close(grad, expected_grad, rtol=5e-2, atol=5e-2)
