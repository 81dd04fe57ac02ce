"""The channels-last 2x resampling kernels: compiled on a GPU, else in Triton's interpreter (conftest.py)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D

from motion_adapters import lean_backward, resample
from motion_adapters.fused_norm import fused_norm_available

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def kernels_run():
    if not fused_norm_available(torch.empty(0, device=DEVICE)):
        pytest.fail("the kernels cannot run here: TRITON_INTERPRET=1 must be set before triton is imported")


def channels_last(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` as a kernel's store rounds: to nearest even on a GPU; Triton's CPU interpreter truncates to bf16."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 70, 3, 5), (1, 8, 1, 1), (3, 16, 9, 12)])  # 70: a partial channel tile
def test_kernels_give_pytorchs_values_and_keep_channels_last(shape, dtype):
    x = channels_last(shape, dtype)
    with torch.no_grad():
        up = resample.upsample_nearest2x(x)
        assert torch.equal(up, F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert up.is_contiguous(memory_format=torch.channels_last)
        even = channels_last((shape[0], shape[1], 2 * shape[2], 2 * shape[3]), dtype, seed=1)
        pooled = resample.average_pool2x(even)
        # float32 sums in PyTorch's order, divided by four, one rounding: the same values as PyTorch's CUDA kernel
        # (the CPU's bf16 pooling rounds otherwise, so the sums are written out here)
        w = even.float().unflatten(2, (-1, 2)).unflatten(4, (-1, 2))
        expected = (((w[:, :, :, 0, :, 0] + w[:, :, :, 0, :, 1]) + w[:, :, :, 1, :, 0]) + w[:, :, :, 1, :, 1]) / 4
        assert torch.equal(pooled, rounded(expected, dtype))
        if dtype == torch.float32:
            assert torch.equal(pooled, F.avg_pool2d(even, 2, 2))
        assert pooled.is_contiguous(memory_format=torch.channels_last)


def test_kernels_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="channels-last .* call F.interpolate"):
        resample.upsample_nearest2x(torch.randn(1, 4, 3, 3, device=DEVICE))  # contiguous
    with pytest.raises(ValueError, match="even H and W .* call F.avg_pool2d"):
        resample.average_pool2x(channels_last((1, 4, 3, 4)))
    with pytest.raises(ValueError, match="without gradients"):
        resample.upsample_nearest2x(channels_last((1, 4, 3, 3)).requires_grad_(True))


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    for name in ("upsample_nearest2x", "average_pool2x"):
        function = getattr(resample, name)
        monkeypatch.setattr(resample, name, lambda x, f=function, n=name: calls.append(n) or f(x))
    return calls


def test_resample_runs_plain_diffusers_samplers_on_the_kernels_and_anything_else_as_written(kernel_calls):
    up, down = Upsample2D(8, use_conv=False).to(DEVICE), Downsample2D(8, use_conv=False, padding=1).to(DEVICE)
    x = channels_last((2, 8, 4, 6))
    with torch.no_grad():
        assert torch.equal(resample.resample(up, x), up(x))
        assert torch.equal(resample.resample(down, x), down(x))
        assert kernel_calls == ["upsample_nearest2x", "average_pool2x"]
        convolving = Upsample2D(8, use_conv=True).to(DEVICE)
        for module, y in [(convolving, x), (up, x.contiguous()), (down, channels_last((2, 8, 5, 6)))]:
            assert torch.equal(resample.resample(module, y), module(y))
    assert torch.equal(resample.resample(up, x), up(x))  # gradients on: as written
    assert kernel_calls == ["upsample_nearest2x", "average_pool2x"]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_sampling_resnets_resample_on_the_kernels_at_any_batch(kernel_calls, direction):
    """Batch 64: diffusers makes the input contiguous before upsampling; the kernels keep channels-last."""
    torch.manual_seed(0)
    resnet = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=12, groups=4, output_scale_factor=1.4142,
                           up=direction == "up", down=direction == "down").to(DEVICE).eval()  # fmt: skip
    x, temb = channels_last((64, 8, 4, 4)), torch.randn(64, 12, device=DEVICE)
    with torch.no_grad():
        expected = resnet(x, temb)
        with lean_backward.fused_norm_activations(resnet):
            sampled = resnet(x, temb)
    name = "upsample_nearest2x" if direction == "up" else "average_pool2x"
    assert kernel_calls == [name, name]  # the block's input and its first norm's output
    assert sampled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-4)


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import motion_adapters.resample as r

for kernel in (r._upsample_nearest2x, r._average_pool2x):
    constexprs = {"BLOCK_P": r.BLOCK_P, "BLOCK_C": r.BLOCK_C}
    signature = {n: "constexpr" if n in constexprs else "*bf16" if n.endswith("_ptr") else "i32"
                 for n in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    print("compiled", kernel.__name__)
"""


def test_kernels_compile_for_a_hopper_gpu_without_one():
    from hopper import compiled_for_hopper

    assert compiled_for_hopper(COMPILE_FOR_HOPPER).count("compiled ") == 2
