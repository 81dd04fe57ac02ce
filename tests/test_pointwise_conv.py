"""Frozen 1 x 1 convolutions of channels-last activations as GEMMs over their rows (`lean_backward._PointwiseConv`)."""

import pytest
import torch
from scripts import load_script

from motion_adapters import lean_backward
from motion_adapters.lean_backward import conv_keeping_no_input


@pytest.fixture
def pointwise_calls(monkeypatch):
    monkeypatch.setattr(lean_backward, "POINTWISE_CONV_GEMMS", True)
    calls = []
    apply = lean_backward._PointwiseConv.apply
    monkeypatch.setattr(lean_backward._PointwiseConv, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    return calls


def channels_last(shape, seed, dtype=torch.float64):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)


@pytest.mark.parametrize(("shape", "bias"), [((8, 6, 5, 7), True), ((8, 6, 5, 7), False), ((1, 4, 3, 2, 5), True)])
def test_pointwise_gemms_give_the_convolution_and_a_channels_last_input_gradient(pointwise_calls, shape, bias):
    dims = len(shape) - 2
    weight = channels_last((10, shape[1], *[1] * dims), 1)
    b = torch.randn(10, dtype=torch.float64) if bias else None
    x = channels_last(shape, 2).requires_grad_(True)
    out = conv_keeping_no_input(x, weight, b, [1] * dims, [0] * dims, [1] * dims, 1)
    grad_out = channels_last(tuple(out.shape), 3)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    reference_x = x.detach().requires_grad_(True)
    conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv3d
    expected = conv(reference_x, weight, b)
    (expected_grad,) = torch.autograd.grad(expected, reference_x, grad_out)
    assert pointwise_calls == [x.shape]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert out.is_contiguous(memory_format=memory_format) and grad.is_contiguous(memory_format=memory_format)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        conv_keeping_no_input(x, weight, b, [1] * dims, [0] * dims, [1] * dims, 1)
    assert saved == [weight.shape]  # the weight only, as `_InputGradOnlyConv` keeps


@pytest.mark.parametrize("case", ["kernel_3", "stride_2", "padding", "contiguous_input"])
def test_other_convolutions_stay_on_the_convolution_kernels(pointwise_calls, case):
    k = 3 if case == "kernel_3" else 1
    weight = channels_last((10, 6, k, k), 1)
    x = channels_last((2, 6, 6, 6), 2)
    if case == "contiguous_input":
        x = x.contiguous()
    stride, padding = (2 if case == "stride_2" else 1), (1 if case in ("padding", "kernel_3") else 0)
    out = conv_keeping_no_input(x, weight, None, [stride] * 2, [padding] * 2, [1, 1], 1)
    assert pointwise_calls == []
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, None, stride, padding))


@pytest.mark.slow  # over 30 s on a 2-core CPU (Triton's interpreter): run with -m slow
def test_every_gradient_of_a_channels_last_step_is_channels_last(tmp_path):
    """The ResNets' 1 x 1 shortcuts on cuDNN gave NCHW input gradients (see `_PointwiseConv`); as GEMMs, none."""
    assert lean_backward.POINTWISE_CONV_GEMMS is True  # the default
    trace = load_script("benchmarks/trace_layouts.py")
    data = trace.main(["--tiny", "--out", str(tmp_path / "layouts.json")])
    traced = [r for r in data["modules"].values() if "input_grad" in r]
    assert len(traced) >= 20  # every block module after the first trainable layer, in the backward pass
    assert {r["input_grad"] for r in traced} == {"channels_last/bfloat16"}
    assert all(r["output"] == "channels_last/bfloat16" for r in data["modules"].values())
