"""The input gradient of a frozen convolution keeping no input (`lean_backward._InputGradOnlyConv`)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from motion_adapters import lean_backward
from motion_adapters.lean_backward import _InputGradOnlyConv

CASES = {  # name: (input shape, weight shape, memory format, stride, padding, dilation, groups)
    "2d_channels_last": ((2, 6, 7, 5), (4, 6, 3, 3), torch.channels_last, 1, 1, 1, 1),
    "2d_contiguous": ((2, 6, 7, 5), (4, 6, 3, 3), torch.contiguous_format, 1, 1, 1, 1),
    "2d_strided_grouped": ((2, 6, 9, 8), (4, 3, 3, 3), torch.channels_last, 2, 1, 1, 2),
    "2d_dilated": ((1, 4, 9, 9), (4, 4, 3, 3), torch.channels_last, 1, 2, 2, 1),
    "3d_channels_last": ((1, 4, 3, 5, 6), (5, 4, 3, 1, 1), torch.channels_last_3d, 1, (1, 0, 0), 1, 1),
    "1d": ((2, 3, 11), (4, 3, 3), torch.contiguous_format, 1, 1, 1, 1),
}


def convolved(case, dtype=torch.float64):
    shape, wshape, memory_format, stride, padding, dilation, groups = CASES[case]
    dims = len(shape) - 2
    as_list = lambda v: list(v) if isinstance(v, tuple) else [v] * dims  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_(True)
    w = torch.randn(wshape, generator=g, dtype=dtype)
    if dims > 1:
        w = w.contiguous(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    args = (as_list(stride), as_list(padding), as_list(dilation), groups)
    return x, w, args


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_input_gradient_is_the_convolutions_in_its_layout(case):
    x, w, (stride, padding, dilation, groups) = convolved(case)
    out = _InputGradOnlyConv.apply(x, w, None, stride, padding, dilation, groups)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    reference = x.detach().requires_grad_(True)
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[w.dim() - 2]
    expected = conv(reference, w, None, stride, padding, dilation, groups)
    (expected_grad,) = torch.autograd.grad(expected, reference, grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert grad.dtype == x.dtype
    assert grad.stride() == expected_grad.stride()  # the layout the backend gives autograd's own convolution


@pytest.mark.parametrize("typed", [True, False])
def test_the_backward_pass_copies_no_activation(monkeypatch, typed):
    """The backend converts its input to the weight's dtype and layout: a stand-in already in them costs no copy
    (the expanded one-element stand-in before was materialised: two copies a convolution on an H200)."""
    monkeypatch.setattr(lean_backward, "TYPED_CONV_PLACEHOLDER", typed)
    x, w, (stride, padding, dilation, groups) = convolved("2d_channels_last", torch.bfloat16)
    out = _InputGradOnlyConv.apply(x, w, None, stride, padding, dilation, groups)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.autograd.grad(out, x, torch.ones_like(out))
    copies = {"aten::contiguous", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::expand"}
    made = [(e.name, e.input_shapes) for e in prof.events() if e.name in copies]
    activation_copies = [m for m in made if m[1] and list(m[1][0]) == list(x.shape)]
    assert (activation_copies == []) is typed, made  # the old stand-in shows what this test catches


def test_listed_shapes_have_their_algorithm_timed_and_the_others_keep_the_callers_setting(monkeypatch):
    """TIMED_CONV_SHAPES: cuDNN's timing is on for the listed (kind, input, weight) calls only, and restored."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Flags(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
                kind = "fwd" if func is torch.ops.aten.convolution.default else "dgrad"
                self.seen.append((kind, torch.backends.cudnn.benchmark))
            return func(*args, **(kwargs or {}))

    def run(case):
        x, w, args = convolved(case, torch.float32)
        out = _InputGradOnlyConv.apply(x, w, None, *args)
        out.sum().backward()
        return (tuple(x.shape), tuple(w.shape))

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    shape = run("2d_channels_last")
    for listed, expected in ((frozenset(), [("fwd", False), ("dgrad", False)]),
                             (frozenset({("fwd", *shape)}), [("fwd", True), ("dgrad", False)]),
                             (frozenset({("dgrad", *shape)}), [("fwd", False), ("dgrad", True)]),
                             (frozenset({("fwd", (9, 9, 9, 9), shape[1])}), [("fwd", False), ("dgrad", False)])):
        monkeypatch.setattr(lean_backward, "TIMED_CONV_SHAPES", listed)
        with Flags() as flags:
            run("2d_channels_last")
        assert flags.seen == expected, listed
        assert torch.backends.cudnn.benchmark is False  # the caller's setting, back after each call
