"""The (3, 1, 1) temporal-convolution Triton kernel: compiled on a GPU, else in Triton's interpreter (conftest.py)."""

import pytest
import torch

from motion_adapters import temporal_conv as tc
from motion_adapters.fused_norm import fused_norm_available
from motion_adapters.training_step import FrameConv, temporal_kernels

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILE = (16, 16, 16, 4, 3)  # several tiles a dimension at test sizes


@pytest.fixture(autouse=True)
def _kernels_run_here(monkeypatch):
    if not fused_norm_available(torch.empty(0, device=DEVICE)):
        pytest.fail("the kernels cannot run here: TRITON_INTERPRET=1 must be set before triton is imported")
    # float32 references on a GPU in float32, not TF32 (cuDNN's default), so that 1e-5 tolerances mean something
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def conv_and_input(shape, out_channels, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv3d(shape[1], out_channels, (3, 1, 1), padding=(1, 0, 0), bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) / shape[1] ** 0.5)
        if bias:
            conv.bias.copy_(torch.randn(out_channels, generator=g, dtype=torch.float64))
    return conv.to(DEVICE), torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)


@pytest.mark.parametrize(
    ("shape", "out_channels", "bias", "tile"),
    [
        ((2, 8, 5, 3, 7), 12, True, SMALL_TILE),  # partial tiles in every dimension, two clips
        ((1, 40, 3, 2, 30), 24, False, SMALL_TILE),  # channels over several tiles, no bias
        ((1, 3, 1, 1, 5), 3, True, SMALL_TILE),  # one frame: only the middle tap
        ((1, 16, 4, 4, 8), 16, True, None),  # the default tile
        ((3, 8, 2, 1, 3), 8, True, SMALL_TILE),  # flat: a tile spans frames and clips
        ((2, 8, 3, 16, 20), 16, True, SMALL_TILE),  # frames of 320 pixels: a tile within a frame
    ],
)
def test_forward_and_input_gradient_match_float64_conv3d(shape, out_channels, bias, tile):
    conv, x = conv_and_input(shape, out_channels, bias)
    x.requires_grad_(True)
    expected = conv(x)
    grad_out = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)

    weight, b = conv.weight.float(), None if conv.bias is None else conv.bias.float()
    out = tc.temporal_conv_forward(x.detach().float(), weight, b, tile)
    grad = tc.temporal_conv_input_grad(grad_out.float(), weight, tile)
    assert out.dtype == grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: Triton's interpreter runs a "
                    "bf16 tl.dot on the raw bits")
def test_bf16_output_is_within_one_rounding_of_the_exact_value():
    conv, x = conv_and_input((1, 32, 4, 4, 8), 32)
    exact = conv(x)
    out = tc.temporal_conv_forward(x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16())
    assert out.dtype == torch.bfloat16
    # inputs rounded to bf16 (relative 2^-9 each), float32 sums, one rounding at the output
    reference = torch.nn.functional.conv3d(x.bfloat16().double(), conv.weight.bfloat16().double(),
                                           conv.bias.bfloat16().double(), padding=(1, 0, 0))  # fmt: skip
    torch.testing.assert_close(out.double(), reference, rtol=2**-8, atol=1e-3)
    assert float((out.double() - exact).norm() / exact.norm()) < 1e-2


def test_supported_weights_are_three_taps_with_padding_one():
    assert tc.temporal_conv_supported(torch.zeros(8, 4, 3, 1, 1), 1)
    assert tc.temporal_conv_supported(torch.zeros(8, 4, 3, 1), 1)  # a FrameConv's squeezed view
    assert not tc.temporal_conv_supported(torch.zeros(8, 4, 3, 1, 1), 0)
    assert not tc.temporal_conv_supported(torch.zeros(8, 4, 5, 1, 1), 2)
    assert not tc.temporal_conv_supported(torch.zeros(8, 4, 3, 3, 3), 1)


def test_frozen_frame_conv_runs_the_kernel_and_passes_gradients_to_its_input_only(monkeypatch):
    calls = []
    kernel = tc._launch
    monkeypatch.setattr(tc, "_launch", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    conv, x = conv_and_input((2, 8, 4, 3, 5), 8)
    conv = conv.float().requires_grad_(False)
    x = x.float().requires_grad_(True)
    expected = conv(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)

    frame_conv = FrameConv(conv, kernel="triton")
    out = frame_conv(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert calls == [(2, 8, 4, 3, 5), (2, 8, 4, 3, 5)]  # forward, then the input gradient
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_frame_conv_with_a_trainable_weight_stays_on_cudnn_and_trains(monkeypatch):
    monkeypatch.setattr(tc, "_launch", lambda *a, **k: pytest.fail("a trainable weight must not run the kernel"))
    conv, x = conv_and_input((1, 4, 3, 2, 2), 4)
    conv = conv.float()
    FrameConv(conv, kernel="triton")(x.float()).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_frame_conv_samples_on_the_kernel_though_its_weight_requires_grad(monkeypatch):
    """Pipelines load UNets whose parameters require grad; sampling runs without gradients, so on the kernel."""
    calls = []
    kernel = tc._launch
    monkeypatch.setattr(tc, "_launch", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    conv, x = conv_and_input((1, 4, 3, 2, 2), 4)
    conv, x = conv.float(), x.float()
    with torch.no_grad():
        out = FrameConv(conv, kernel="triton")(x)
        expected = conv(x)
    assert conv.weight.requires_grad and calls == [1]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_frame_conv_names_a_bad_kernel():
    with pytest.raises(ValueError, match="kernel must be 'cudnn' or 'triton', got 'cuda'"):
        FrameConv(torch.nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0)), kernel="cuda")


@pytest.mark.parametrize("choice", ["triton_conv", "triton"])
def test_show1_unet_with_triton_temporal_kernels_matches_the_library(choice, monkeypatch):
    from test_training_speed import embeds, tiny_show1

    from motion_adapters.lean_backward import frozen_convs_keep_no_input

    calls = []
    kernel = tc._launch
    monkeypatch.setattr(tc, "_launch", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    unet = tiny_show1().to(DEVICE).eval()
    for name, p in unet.named_parameters():
        p.requires_grad_(".temp_attentions." in name and name.endswith("to_q.weight"))
    x = torch.randn(1, 3, 4, 8, 8, device=DEVICE)
    t, text = torch.tensor([10], device=DEVICE), embeds(64).to(DEVICE)

    def run():
        out = unet(x, t, text).sample
        grads = torch.autograd.grad(out.square().mean(), [p for p in unet.parameters() if p.requires_grad])
        return [out, *grads]

    expected = run()
    temporal_convs = sum(1 for m in unet.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 1, 1))
    with temporal_kernels(unet, choice), frozen_convs_keep_no_input(unet, True):
        assert sum(1 for m in unet.modules() if isinstance(m, FrameConv) and m.kernel == "triton") == temporal_convs
        got = run()
    assert temporal_convs > 0 and len(calls) >= temporal_convs  # every forward on the kernel, gradients too
    assert all(type(m) is not FrameConv for m in unet.modules())  # restored
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import motion_adapters.temporal_conv as tc

kernel = tc._temporal_conv
tiles = ((tc.default_tile(320, 20480, 2560), False, True), (tc.default_tile(1280, 320, 40), True, False))
for (block_co, block_p, block_ci, _, _), flat, has_b in tiles:  # both tiles, both layouts
    for dtype, ieee in (("bf16", False), ("fp32", True)):
        meta = {"HAS_B": has_b, "FLAT": flat, "BLOCK_CO": block_co, "BLOCK_P": block_p, "BLOCK_CI": block_ci,
                "IEEE": ieee}
        signature = {n: "constexpr" if n in meta else f"*{dtype}" if n.endswith("_ptr") else "i32"
                     for n in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
        print("compiled", dtype, has_b)
"""


def test_kernel_compiles_for_a_hopper_gpu_without_one():
    """The interpreter runs code the compiler refuses: compile the kernel for sm_90 with the interpreter off."""
    from hopper import compiled_for_hopper

    assert compiled_for_hopper(COMPILE_FOR_HOPPER).count("compiled ") == 4
