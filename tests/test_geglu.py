"""The GELU-gated product of the frozen feed-forwards as Triton kernels (`fused_norm.geglu`, `geglu_backward`)."""

import pytest
import torch

from motion_adapters import lean_backward
from motion_adapters.fused_norm import geglu, geglu_backward
from motion_adapters.lean_backward import _GEGLUFeedForward


def reference(projection: torch.Tensor) -> torch.Tensor:
    hidden, gate = projection.chunk(2, dim=-1)
    return hidden * torch.nn.functional.gelu(gate)


@pytest.mark.parametrize(("shape", "dtype"), [((3, 37, 2 * 45), torch.float32), ((2, 5, 2 * 640), torch.bfloat16)])
def test_the_kernels_give_geglu_and_its_gradient(shape, dtype):
    g = torch.Generator().manual_seed(0)
    projection = (3 * torch.randn(shape, generator=g)).to(dtype)
    grad = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype)
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
    projection = torch.randn(4, 10)
    with pytest.raises(ValueError, match="contiguous projection"):
        geglu(projection.t())
    with pytest.raises(ValueError, match="even last dimension"):
        geglu(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"grad has shape \(4, 4\)"):
        geglu_backward(torch.randn(4, 4), projection)
