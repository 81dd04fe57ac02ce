"""The GELU-gated product of the frozen feed-forwards as Triton kernels (`fused_norm.geglu`, `geglu_backward`)."""

import pytest
import torch

from motion_adapters import lean_backward
from motion_adapters.fused_norm import geglu, geglu_backward
from motion_adapters.lean_backward import _GEGLUFeedForward

#: the kernels' device: CUDA where there is one, else the CPU in Triton's interpreter (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(projection: torch.Tensor) -> torch.Tensor:
    hidden, gate = projection.chunk(2, dim=-1)
    return hidden * torch.nn.functional.gelu(gate)


@pytest.mark.parametrize(("shape", "dtype"), [((3, 37, 2 * 45), torch.float32), ((2, 5, 2 * 640), torch.bfloat16)])
def test_the_kernels_give_geglu_and_its_gradient(shape, dtype):
    g = torch.Generator().manual_seed(0)
    projection = (3 * torch.randn(shape, generator=g)).to(DEVICE, dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(DEVICE, dtype)
    exact = projection.double().requires_grad_(True)
    expected = reference(exact)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad.double())
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    out, grad_projection = geglu(projection), geglu_backward(grad, projection)
    assert out.dtype == grad_projection.dtype == dtype and grad_projection.shape == projection.shape
    torch.testing.assert_close(out.double(), expected, **tolerance)  # one rounding, from float32
    torch.testing.assert_close(grad_projection.double(), expected_grad, **tolerance)


def test_the_frozen_feed_forward_gives_the_same_gradients_with_and_without_the_kernels(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    w1, b1 = torch.randn(2 * 40, 16, generator=g) / 4, torch.randn(2 * 40, generator=g)
    w2, b2 = torch.randn(16, 40, generator=g) / 6, torch.randn(16, generator=g)
    grad_out = torch.randn(2, 9, 16, generator=g)
    results = {}
    for kernels in (True, False):
        monkeypatch.setattr(lean_backward, "GEGLU_KERNELS", kernels)
        out = _GEGLUFeedForward.apply(x, w1, b1, w2, b2)
        results[kernels] = (out, *torch.autograd.grad(out, x, grad_out))
    expected = torch.nn.functional.linear(reference(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(results[False][0], expected)
    for ours, theirs in zip(results[True], results[False]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    projection = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous projection"):
        geglu(projection.t())
    with pytest.raises(ValueError, match="even last dimension"):
        geglu(torch.randn(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"grad has shape \(4, 4\)"):
        geglu_backward(torch.randn(4, 4, device=DEVICE), projection)


@pytest.mark.parametrize("keep_bytes", [0, 2**20])
def test_the_projection_is_kept_up_to_the_limit_else_recomputed(monkeypatch, keep_bytes):
    monkeypatch.setattr(lean_backward, "GEGLU_KEEP_PROJECTION_BYTES", keep_bytes)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    w1, b1, w2, b2 = torch.randn(24, 8, generator=g), torch.randn(24, generator=g), torch.randn(8, 12), None
    saved, linears = [], []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: linears.append(a[1].shape) or linear(*a))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = _GEGLUFeedForward.apply(x, w1, b1, w2, b2)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    kept = (3, 5, 24) if keep_bytes else tuple(x.shape)
    assert tuple(saved[0]) == kept and [tuple(s) for s in saved[1:]] == [(24, 8), (24,), (8, 12)]
    assert linears == [w1.shape, w2.shape] + ([] if keep_bytes else [w1.shape])  # recomputed in the backward
    reference_x = x.detach().requires_grad_(True)
    expected = linear(reference(linear(reference_x, w1, b1)), w2, b2)
    (expected_grad,) = torch.autograd.grad(expected, reference_x, torch.ones_like(expected))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)
