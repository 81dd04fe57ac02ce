"""A UNet's 2x resampling on channels-last activations in Triton, for sampling: nearest upsampling, 2x2 averages.

Diffusers' `ResnetBlock2D(up=True)` upsamples with `F.interpolate(scale_factor=2, mode="nearest")` and its
`down=True` twin averages 2x2 windows (`nn.AvgPool2d(2, 2)`), each on both the block's input and its first norm's
output. On channels-last activations PyTorch runs both on kernels of one thread per output value; in an SR1 call
on an H200 (`benchmarks/results/stage_profile_sr1_pairs_h200.json`) the 8 upsamplings took 3.65 ms and the 8
poolings 1.81 ms, about ten times what the 1.5 and 0.8 GB they move take at the memory's rate. Here a program
copies (or averages) a tile of pixels by channels with vector loads along the channels; the results are the
same values as PyTorch's (the upsampling copies, the pooling sums the window in float32 in PyTorch's order and
divides by four). At batch 64 and above diffusers makes the input contiguous first (a workaround for PyTorch's
channels-last kernel); these kernels index in 64 bits and keep the layout.

`resample(module, x)` runs a diffusers `Upsample2D` or `Downsample2D` of that plain kind on the kernels where
gradients are off, `x` is dense channels-last with even height and width for pooling, and the kernels can run on
its device (CUDA, or the interpreter on CPU tensors with `TRITON_INTERPRET=1`); anywhere else it calls `module(x)`.
"""

from __future__ import annotations

import torch
from torch import nn

from motion_adapters.fused_norm import _on_device, fused_norm_available, tl, triton

#: Pixels by channels a program takes: 64 by 64 (4096 values, eight bf16 values a thread in four warps).
BLOCK_P, BLOCK_C = 64, 64
#: Whether `resample` runs the kernels; benchmarks/bench_stage_kernels.py switches it off ("_noresample") to
#: measure what they save against PyTorch's.
RESAMPLE_KERNEL = True

if triton is not None:

    @triton.jit
    def _upsample_nearest2x(x_ptr, out_ptr, pixels, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Input pixel (n, h, w) of (N, H, W, C) memory to output pixels (n, 2h + i, 2w + j) of (N, 2H, 2W, C)."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # n * H * W + h * W + w
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p < pixels)[:, None] & (c < C)[None, :]
        values = tl.load(x_ptr + p[:, None] * C + c[None, :], mask=mask)
        # (n * 2H + 2h) * 2W + 2w, as n * 2H + 2h = 2 (n * H + h)
        at = ((p // W) * 4 * W + 2 * (p % W))[:, None] * C + c[None, :]
        tl.store(out_ptr + at, values, mask=mask)
        tl.store(out_ptr + at + C, values, mask=mask)
        tl.store(out_ptr + at + 2 * W * C, values, mask=mask)
        tl.store(out_ptr + at + 2 * W * C + C, values, mask=mask)

    @triton.jit
    def _average_pool2x(x_ptr, out_ptr, pixels, W_out, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Output pixel (n, h, w) of (N, H / 2, W / 2, C) memory: the mean of the input's (2h + i, 2w + j)."""
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # n * H/2 * W/2 + h * W/2 + w
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p < pixels)[:, None] & (c < C)[None, :]
        at = ((p // W_out) * 4 * W_out + 2 * (p % W_out))[:, None] * C + c[None, :]
        total = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(x_ptr + at + C, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(x_ptr + at + 2 * W_out * C, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(x_ptr + at + 2 * W_out * C + C, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + p[:, None] * C + c[None, :], (total * 0.25).to(out_ptr.dtype.element_ty), mask=mask)


def plain_upsampler(module: nn.Module) -> bool:
    """A diffusers `Upsample2D` that only interpolates, nearest, by 2 (no convolution, no norm)."""
    from diffusers.models.upsampling import Upsample2D

    return (type(module) is Upsample2D and module.interpolate and not module.use_conv
            and not module.use_conv_transpose and module.norm is None and "forward" not in vars(module))  # fmt: skip


def _plain_downsampler(module: nn.Module) -> bool:
    """A diffusers `Downsample2D` that only averages 2x2 windows with stride 2 (no convolution, no norm)."""
    from diffusers.models.downsampling import Downsample2D

    if type(module) is not Downsample2D or module.use_conv or module.norm is not None or "forward" in vars(module):
        return False
    pool = module.conv
    return (type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and not pool.ceil_mode and pool.divisor_override is None)  # fmt: skip


def _runs_kernel(x: torch.Tensor) -> bool:
    return (RESAMPLE_KERNEL and not (torch.is_grad_enabled() and x.requires_grad) and x.ndim == 4
            and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > 0
            and fused_norm_available(x))  # fmt: skip


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """`F.interpolate(x, scale_factor=2, mode="nearest")` for a dense channels-last (N, C, H, W) `x`, as a copy.

    Example:
        >>> y = upsample_nearest2x(x.to(memory_format=torch.channels_last))  # doctest: +SKIP
    """
    if not _runs_kernel(x):
        raise ValueError("upsample_nearest2x takes a dense channels-last (N, C, H, W) tensor without gradients, on "
                         "a device its kernel runs on; call F.interpolate(x, scale_factor=2, mode='nearest').")
    n, c, h, w = x.shape
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    with _on_device(x):
        _upsample_nearest2x[(triton.cdiv(n * h * w, BLOCK_P), triton.cdiv(c, BLOCK_C))](
            x, out, n * h * w, w, c, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)  # fmt: skip
    return out


def average_pool2x(x: torch.Tensor) -> torch.Tensor:
    """`F.avg_pool2d(x, 2, 2)` for a dense channels-last (N, C, H, W) `x` of even height and width.

    Example:
        >>> y = average_pool2x(x.to(memory_format=torch.channels_last))  # doctest: +SKIP
    """
    if not _runs_kernel(x) or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError("average_pool2x takes a dense channels-last (N, C, H, W) tensor of even H and W without "
                         "gradients, on a device its kernel runs on; call F.avg_pool2d(x, 2, 2).")
    n, c, h, w = x.shape
    out = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    pixels = n * (h // 2) * (w // 2)
    with _on_device(x):
        _average_pool2x[(triton.cdiv(pixels, BLOCK_P), triton.cdiv(c, BLOCK_C))](
            x, out, pixels, w // 2, c, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)  # fmt: skip
    return out


def resample(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a ResNet's upsampler or downsampler, on the kernels above where they apply (see the module).

    Example:
        >>> with torch.no_grad():  # doctest: +SKIP
        ...     hidden_states = resample(resnet.upsample, hidden_states)
    """
    if _runs_kernel(x) and not torch.is_grad_enabled():
        if plain_upsampler(module):
            return upsample_nearest2x(x)
        if _plain_downsampler(module) and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
            return average_pool2x(x)
    return module(x)


__all__ = ["average_pool2x", "plain_upsampler", "resample", "upsample_nearest2x"]
