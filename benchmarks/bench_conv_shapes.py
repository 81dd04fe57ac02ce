"""Time every convolution shape of a VMC training step on cuDNN against the matrix product of the same size.

The shapes are recorded from one forward and backward pass of show-1-base on the meta device (8 frames at
40 x 64, batch 1): each forward convolution and each input gradient (`convolution_backward` asked for the input
alone, as a frozen convolution's backward pass runs it), with how often a step calls it. The (3, 1, 1) temporal
convolutions are timed as the (3, 1) `conv2d` over (frames, pixels) that training runs. For each shape, in bf16
with channels-last activations and weights:

- `cudnn_ms`: cuDNN's convolution with PyTorch's default algorithm choice (an input gradient of stride 1 is timed
  as the convolution it equals: the transposed, flipped weight);
- `gemm_only_ms`: one matrix product of the convolution's size, (pixels, k * in) @ (k * in, out), its im2col
  matrix already built: what an implicit GEMM could at best take;
- `im2col_ms`: building that matrix from shifted views (`torch.cat`) and the product;
- `frame_taps_ms` (temporal convolutions): one GEMM per tap over row-shifted views of the channels-last frames,
  accumulated in place (`motion_adapters.lean_backward._FrameTapsConv`, what training runs now).

(`results/conv_shapes_implicit_h200.json` also holds `implicit_ms`: a Triton implicit-GEMM kernel, slower than
cuDNN there and since taken out of the library; commit 353dbe6 has it.)

GPU times are means of 30 calls between CUDA events after 3 warm-ups; on the CPU (`--tiny`, a smoke test of the
code) wall-clock times. `rel_err` is the im2col product's largest difference from cuDNN's output, relative to the
output's largest value.

    python benchmarks/bench_conv_shapes.py --out benchmarks/results/conv_shapes_h200.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import TINY, environment, write  # noqa: E402

from motion_adapters.lean_backward import _taps_accumulated  # noqa: E402
from motion_adapters.models import Show1UNet3DConditionModel, show1_base_config  # noqa: E402


class _ConvCalls(TorchDispatchMode):
    """Counts (kind, input shape, weight shape, stride, padding, groups) of convolutions and input gradients."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.convolution.default:
            x, w = args[0], args[1]
            self.calls[("fwd", tuple(x.shape), tuple(w.shape), tuple(args[3]), tuple(args[4]), args[8])] += 1
        elif func is torch.ops.aten.convolution_backward.default and args[-1][0]:
            x, w = args[1], args[2]
            self.calls[("dgrad", tuple(x.shape), tuple(w.shape), tuple(args[4]), tuple(args[5]), args[9])] += 1
        return func(*args, **kwargs)


def conv_calls(unet_config: dict, frames: int, height: int, width: int) -> collections.Counter:
    """The convolutions of one training step (forward, and backward to the temporal q/k/v), counted on meta."""
    with torch.device("meta"):
        unet = Show1UNet3DConditionModel(**unet_config)
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if ".temp_attentions." in f".{name}." and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            module.weight.requires_grad_(True)
    unet.train()
    x = torch.randn(1, unet_config["in_channels"], frames, height, width, device="meta")
    text = torch.randn(1, 77, unet_config["encoder_hid_dim"], device="meta")
    recorder = _ConvCalls()
    with recorder:
        out = unet(x, torch.tensor([500], device="meta"), text).sample
        out.float().square().mean().backward()
    return recorder.calls


def timer(device: torch.device, n: int = 30):
    def time_ms(fn) -> float:
        for _ in range(3):
            fn()
        if device.type != "cuda":
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - start) * 1e3 / n
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / n

    return time_ms


def _im2col(x_rows: torch.Tensor, kh: int, kw: int, ph: int, pw: int, height: int, width: int) -> torch.Tensor:
    padded = F.pad(x_rows, (0, 0, pw, pw, ph, ph)) if (ph or pw) else x_rows
    cols = torch.cat([padded[:, i : i + height, j : j + width, :] for i in range(kh) for j in range(kw)], dim=-1)
    return cols.view(-1, cols.shape[-1])


def measure(call: tuple, count: int, device: torch.device, time_ms) -> dict:
    kind, x_shape, w_shape, stride, padding, groups = call
    entry = {"kind": kind, "x": list(x_shape), "w": list(w_shape), "stride": list(stride), "pad": list(padding),
             "count": count, "frame_taps_ms": None}  # fmt: skip
    temporal = len(w_shape) == 5
    if temporal:  # the (3, 1, 1) convolution as the (3, 1) conv2d over (frames, pixels) that training runs
        b, c, f, h, w = x_shape
        x_shape, w_shape, stride, padding = (b, c, f, h * w), (*w_shape[:3], 1), (1, 1), (padding[0], 0)
    out_c, in_c = (w_shape[1], w_shape[0]) if kind == "dgrad" else (w_shape[0], w_shape[1])
    n, _, height, width = x_shape
    kh, kw = w_shape[2], w_shape[3]
    dtype = torch.bfloat16
    gen = torch.Generator(device).manual_seed(0)
    if tuple(stride) != (1, 1) or groups != 1:  # not an ordinary stride-1 convolution: cuDNN's own call only
        cl = torch.channels_last
        weight = torch.randn(w_shape, device=device, generator=gen).to(dtype).contiguous(memory_format=cl)
        x = torch.randn(x_shape, device=device, generator=gen).to(dtype).contiguous(memory_format=cl)
        y = F.conv2d(x, weight, None, stride, padding, 1, groups)
        grad = torch.randn_like(y)
        if kind == "dgrad":
            entry["cudnn_ms"] = time_ms(lambda: torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, [1, 1], False, [0, 0], groups, (True, False, False)))
        else:
            entry["cudnn_ms"] = time_ms(lambda: F.conv2d(x, weight, None, stride, padding, 1, groups))
        entry.update(gemm_only_ms=None, im2col_ms=None, rel_err=None)
        return entry
    weight = torch.randn(out_c, in_c, kh, kw, device=device, generator=gen) / (in_c * kh * kw) ** 0.5
    weight = weight.to(dtype).contiguous(memory_format=torch.channels_last)
    x = torch.randn(n, in_c, height, width, device=device, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    entry["cudnn_ms"] = time_ms(lambda: F.conv2d(x, weight, None, 1, padding))
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous
    matrix = weight.permute(2, 3, 1, 0).reshape(kh * kw * in_c, out_c).contiguous()
    ph, pw = padding
    out_h, out_w = height + 2 * ph - kh + 1, width + 2 * pw - kw + 1
    expected = F.conv2d(x, weight, None, 1, padding).permute(0, 2, 3, 1).reshape(-1, out_c).float()
    got = _im2col(rows, kh, kw, ph, pw, out_h, out_w) @ matrix
    entry["rel_err"] = ((got.float() - expected).abs().max() / expected.abs().max()).item()
    entry["im2col_ms"] = time_ms(lambda: _im2col(rows, kh, kw, ph, pw, out_h, out_w) @ matrix)
    cols = _im2col(rows, kh, kw, ph, pw, out_h, out_w)
    entry["gemm_only_ms"] = time_ms(lambda: cols @ matrix)
    if temporal and n == 1 and kw == 1 and ph == kh // 2:  # frames on H, pixels on W: one GEMM per tap
        pixels = width
        flat = rows.reshape(height * width, in_c)
        taps = [weight[:, :, t, 0].t() for t in range(kh)]
        taps_out = _taps_accumulated(flat, taps, None, pixels, reverse=False)
        entry["frame_taps_err"] = ((taps_out.float() - expected).abs().max() / expected.abs().max()).item()
        entry["frame_taps_ms"] = time_ms(lambda: _taps_accumulated(flat, taps, None, pixels, reverse=False))
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv_shapes_h200.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny Show-1 UNet: a CPU smoke test of the code")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet_config = {**show1_base_config(), **(TINY if args.tiny else {})}
    frames, height, width = 8, (16 if args.tiny else 40), (16 if args.tiny else 64)
    calls = conv_calls(unet_config, frames, height, width)
    time_ms = timer(device, n=2 if args.tiny else 30)
    results = []
    for call, count in sorted(calls.items(), key=lambda item: -item[1]):
        results.append(measure(call, count, device, time_ms))
        print(results[-1], flush=True)

    def total(key: str) -> float:
        return sum(r["count"] * (r[key] if r.get(key) is not None else r["cudnn_ms"]) for r in results)

    data = {
        "benchmark": "conv_shapes",
        "env": environment(device, args.commit),
        "settings": {"model": "tiny" if args.tiny else "show-1-base (random weights)", "frames": frames,
                     "height": height, "width": width, "dtype": "bfloat16", "memory_format": "channels_last"},
        "results": results,
        "total_cudnn_ms": total("cudnn_ms"),
        "total_gemm_only_ms": total("gemm_only_ms"),
        "total_frame_taps_ms": total("frame_taps_ms"),
    }
    write(args.out, data)
    print({k: v for k, v in data.items() if k.startswith("total")}, flush=True)
    return data


if __name__ == "__main__":
    main()
