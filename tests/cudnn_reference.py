"""A bf16 convolution's output and input gradient against cuDNN's, both against float32 (the GPU tests' check)."""

import torch


def assert_as_close_as_cudnn(out, grad, x, weight, bias, grad_out):
    """`out` and `grad` (of a 3 x 3 convolution of `x`, padding 1) no further from float32 than cuDNN's bf16 results.

    Within 1.5 times cuDNN's largest error plus 1e-3, for the output and for the input gradient alike.
    """
    reference_x = x.detach().float().requires_grad_(True)
    expected = torch.nn.functional.conv2d(reference_x, weight.float(), bias.float(), padding=1)
    (expected_grad,) = torch.autograd.grad(expected, reference_x, grad_out.float())
    cudnn_x = x.detach().requires_grad_(True)
    cudnn = torch.nn.functional.conv2d(cudnn_x, weight, bias, padding=1)
    (cudnn_grad,) = torch.autograd.grad(cudnn, cudnn_x, grad_out)
    for ours, theirs, exact in ((out, cudnn, expected), (grad, cudnn_grad, expected_grad)):
        error, cudnn_error = (ours.float() - exact).abs().max(), (theirs.float() - exact).abs().max()
        assert error <= 1.5 * cudnn_error + 1e-3, (error, cudnn_error)
