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

With `--compare-timed`, the spatial convolutions that training runs on cuDNN (`runs_on_cudnn`) are also timed
as training calls them (the forward `conv2d`, the input gradient as `convolution_backward` asked for the input
alone) before anything else runs at their shapes, twice: in this process with PyTorch's default algorithm choice
(`call_ms`, and `first_call_ms`: the first call's wall time, which includes choosing the algorithm), and in a
child process with `torch.backends.cudnn.benchmark` set (`timed_call_ms`, `timed_first_call_ms`: cuDNN times its
candidates there, at most `--cudnn-benchmark-limit` of them). PyTorch caches the chosen algorithm for the process
with a key that does not hold the flag, hence the second process. The difference of the first calls is what
timing a shape costs once; the difference of the steady times, what it saves a call.

GPU times are means of 30 calls between CUDA events after 3 warm-ups; on the CPU (`--tiny`, a smoke test of the
code) wall-clock times. `rel_err` is the im2col product's largest difference from cuDNN's output, relative to the
output's largest value.

    python benchmarks/bench_conv_shapes.py --out benchmarks/results/conv_shapes_h200.json
    python benchmarks/bench_conv_shapes.py --compare-timed --cudnn-benchmark-limit 3 --out ...
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import TINY, cudnn_benchmark_option, environment, write  # noqa: E402

from motion_adapters import im2col_conv, lean_backward  # noqa: E402
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_call(call: tuple, device: torch.device, time_ms) -> dict:
    """First-call wall time and steady time of a spatial convolution as training runs it (see the module's doc).

    Run before anything else touches the shape, so the first call is where the process chooses its algorithm.
    """
    kind, x_shape, w_shape, stride, padding, groups = call
    dtype, cl = torch.bfloat16, torch.channels_last
    gen = torch.Generator(device).manual_seed(0)
    weight = torch.randn(w_shape, device=device, generator=gen).to(dtype).contiguous(memory_format=cl)
    x = torch.randn(x_shape, device=device, generator=gen).to(dtype).contiguous(memory_format=cl)
    if kind == "dgrad":
        out_shape = F.conv2d(torch.empty(x_shape, device="meta"), torch.empty(w_shape, device="meta"), None, stride,
                             padding, 1, groups).shape
        grad = torch.randn(out_shape, device=device, generator=gen).to(dtype).contiguous(memory_format=cl)

        def fn():
            return torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, [1, 1], False, [0, 0],
                                                       groups, (True, False, False))
    else:

        def fn():
            return F.conv2d(x, weight, None, stride, padding, 1, groups)

    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return {"first_call_ms": (time.perf_counter() - start) * 1e3, "call_ms": time_ms(fn)}


def runs_on_cudnn(call: tuple) -> bool:
    """Whether training sends this spatial convolution to cuDNN, by the layer swaps' shape rules on a GPU.

    The 1 x 1 convolutions run as one GEMM (`lean_backward._PointwiseConv`), the 3 x 3 ones of at most
    `im2col_conv.MAX_ROWS` channels-last rows as a gather and one GEMM (`im2col_conv.Im2colConv`).
    """
    _, x_shape, w_shape, stride, padding, groups = call
    plain = tuple(stride) == (1, 1) and groups == 1
    if lean_backward.POINTWISE_CONV_GEMMS and plain and tuple(w_shape[2:]) == (1, 1) and tuple(padding) == (0, 0):
        return False
    small = x_shape[0] * x_shape[2] * x_shape[3] <= im2col_conv.MAX_ROWS
    return not (im2col_conv.IM2COL_CONVS and plain and tuple(w_shape[2:]) == (3, 3) and tuple(padding) == (1, 1)
                and small)


def _key(entry_or_call) -> tuple:
    if isinstance(entry_or_call, dict):
        e = entry_or_call
        return (e["kind"], tuple(e["x"]), tuple(e["w"]), tuple(e["stride"]), tuple(e["pad"]))
    return tuple(entry_or_call[:5])


def _timed_in_child(args: argparse.Namespace) -> dict:
    """The training calls' times in a child process with `torch.backends.cudnn.benchmark` set."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timed.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--training-calls-only", "--cudnn-benchmark",
                   "--out", str(out)] + (["--tiny"] if args.tiny else []) + (
                   ["--cudnn-benchmark-limit", str(args.cudnn_benchmark_limit)]
                   if args.cudnn_benchmark_limit is not None else [])  # fmt: skip
        subprocess.run(command, check=True)
        child = json.loads(out.read_text())
    return {"env": child["env"], "by_key": {_key(r): r for r in child["results"]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv_shapes_h200.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny Show-1 UNet: a CPU smoke test of the code")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--compare-timed", action="store_true",
                        help="time the spatial convolutions as training calls them, here and in a child process "
                             "with cuDNN's timed algorithm choice")
    parser.add_argument("--training-calls-only", action="store_true", help=argparse.SUPPRESS)  # the child's part
    cudnn_benchmark_option(parser)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet_config = {**show1_base_config(), **(TINY if args.tiny else {})}
    frames, height, width = 8, (16 if args.tiny else 40), (16 if args.tiny else 64)
    calls = conv_calls(unet_config, frames, height, width)
    time_ms = timer(device, n=2 if args.tiny else 30)
    ordered = sorted(calls.items(), key=lambda item: -item[1])
    spatial = [call for call, _ in ordered if len(call[2]) == 4 and runs_on_cudnn(call)]
    first = {}  # before anything else runs at these shapes
    if args.compare_timed or args.training_calls_only:
        first = {_key(call): training_call(call, device, time_ms) for call in spatial}
    if args.training_calls_only:
        results = [{"kind": c[0], "x": list(c[1]), "w": list(c[2]), "stride": list(c[3]), "pad": list(c[4]),
                    "count": calls[c], **first[_key(c)]} for c in spatial]  # fmt: skip
        data = {"benchmark": "conv_shapes_training_calls", "env": environment(device, args.commit),
                "results": results}
        write(args.out, data)
        return data
    timed = _timed_in_child(args) if args.compare_timed else None
    results = []
    for call, count in ordered:
        results.append(measure(call, count, device, time_ms))
        if _key(call) in first:
            results[-1].update(first[_key(call)])
            child = timed["by_key"][_key(call)]
            results[-1].update(timed_first_call_ms=child["first_call_ms"], timed_call_ms=child["call_ms"])
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
    if timed:
        data["timed_env"] = timed["env"]
        for key in ("first_call_ms", "call_ms", "timed_first_call_ms", "timed_call_ms"):
            total_key = "total_" + key if "first" in key else "total_" + key + "_a_step"
            data[total_key] = sum(r[key] * (1 if "first" in key else r["count"]) for r in results if key in r)
    write(args.out, data)
    print({k: v for k, v in data.items() if k.startswith("total")}, flush=True)
    return data


if __name__ == "__main__":
    main()
