"""Time the (3, 1, 1) temporal convolutions on cuDNN against `motion_adapters.temporal_conv`'s Triton kernel.

For each of Show-1's temporal-convolution shapes (the SR1 UNet's levels as it samples, the base UNet's as it
trains, the interpolation UNet's), in bf16: cuDNN's `conv3d` with its bias, and its input gradient alone
(`convolution_backward`, as a frozen convolution's backward pass runs it), both also as the (3, 1) `conv2d` over
(frames, pixels) that the "conv2d" temporal kernels (`FrameConv`) run, against the Triton kernel forward (the
bias added in the kernel) and its input gradient, for each tile in `TILES`. GPU times are medians of
`triton.testing.do_bench_cudagraph`; outputs are checked against a float32 cuDNN reference first.

    python benchmarks/bench_temporal_conv.py --out benchmarks/results/temporal_conv_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import GIB, environment, write  # noqa: E402

from motion_adapters import temporal_conv as tc  # noqa: E402

#: name -> (N, C, F, H, W): SR1 samples 2 x 8 frames (guidance) at 160 x 256, channels [128, 256, 512, 768, 768];
#: show-1-base trains 1 x 8 frames at 40 x 64, channels [320, 640, 960, 1280]; interpolation samples 14 x 5.
SHAPES = {
    "sr1 128 @ 8x160x256": (2, 128, 8, 160, 256),
    "sr1 256 @ 8x80x128": (2, 256, 8, 80, 128),
    "sr1 512 @ 8x40x64": (2, 512, 8, 40, 64),
    "sr1 768 @ 8x20x32": (2, 768, 8, 20, 32),
    "sr1 768 @ 8x10x16": (2, 768, 8, 10, 16),
    "base 320 @ 8x40x64": (1, 320, 8, 40, 64),
    "base 640 @ 8x20x32": (1, 640, 8, 20, 32),
    "base 960 @ 8x10x16": (1, 960, 8, 10, 16),
    "base 1280 @ 8x5x8": (1, 1280, 8, 5, 8),
    "interpolation 320 @ 5x40x64": (14, 320, 5, 40, 64),
    "interpolation 1280 @ 5x5x8": (14, 1280, 5, 5, 8),
}
#: (BLOCK_CO, BLOCK_P, BLOCK_CI, warps, stages); the first and the last are `default_tile`'s two choices
TILES = [
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 64, 32, 4, 4),
]


def measure(name, shape, device) -> dict:
    import triton.testing

    n, c, f, h, w = shape
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=gen).bfloat16()
    dy = torch.randn(shape, device=device, generator=gen).bfloat16()
    weight = (torch.randn(c, c, 3, 1, 1, device=device, generator=gen) / (3 * c) ** 0.5).bfloat16()
    bias = torch.randn(c, device=device, generator=gen).bfloat16()
    ref = torch.nn.functional.conv3d(x.float(), weight.float(), bias.float(), padding=(1, 0, 0))
    placeholder = x.new_empty(1).expand(shape)
    ref_dx = torch.ops.aten.convolution_backward(dy.float(), placeholder.float(), weight.float(), None, [1, 1, 1],
                                                 [1, 0, 0], [1, 1, 1], False, [0, 0, 0], 1,
                                                 (True, False, False))[0]  # fmt: skip

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    def cudnn_forward():
        return torch.nn.functional.conv3d(x, weight, bias, padding=(1, 0, 0))

    frames_x, frames_dy, weight_2d = x.reshape(n, c, f, h * w), dy.reshape(n, c, f, h * w), weight.squeeze(-1)
    frames_placeholder = placeholder.reshape(n, c, f, h * w)

    def cudnn_frames_forward():  # the library's FrameConv ("conv2d" temporal kernels): a (3, 1) Conv2d
        return torch.nn.functional.conv2d(frames_x, weight_2d, bias, padding=(1, 0))

    def cudnn_frames_backward():
        return torch.ops.aten.convolution_backward(frames_dy, frames_placeholder, weight_2d, None, [1, 1], [1, 0],
                                                   [1, 1], False, [0, 0], 1, (True, False, False))[0]  # fmt: skip

    def cudnn_backward():
        return torch.ops.aten.convolution_backward(dy, placeholder, weight, None, [1, 1, 1], [1, 0, 0], [1, 1, 1],
                                                   False, [0, 0, 0], 1, (True, False, False))[0]  # fmt: skip

    baselines = {"cudnn_forward": cudnn_forward, "cudnn_backward": cudnn_backward,
                 "cudnn_frames_forward": cudnn_frames_forward, "cudnn_frames_backward": cudnn_frames_backward}
    errors = {k: rel(fn().reshape(shape), ref if k.endswith("forward") else ref_dx) for k, fn in baselines.items()}
    ms = {k: triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") for k, fn in baselines.items()}
    tiles = []
    for tile in TILES:
        try:
            y = tc.temporal_conv_forward(x, weight, bias, tile)
            dx = tc.temporal_conv_input_grad(dy, weight, tile)
            torch.cuda.synchronize()
        except Exception as error:  # a tile the GPU cannot hold (shared memory): recorded, not fatal
            tiles.append({"tile": list(tile), "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue

        def forward(tile=tile):
            return tc.temporal_conv_forward(x, weight, bias, tile)

        def backward(tile=tile):
            return tc.temporal_conv_input_grad(dy, weight, tile)

        row = {"tile": list(tile), "forward_error": rel(y, ref), "backward_error": rel(dx, ref_dx),
               "forward_ms": triton.testing.do_bench_cudagraph(forward, rep=100, return_mode="median"),
               "backward_ms": triton.testing.do_bench_cudagraph(backward, rep=100, return_mode="median")}
        tiles.append(row)
    ok = [t for t in tiles if "error" not in t]
    default_tile = tc.default_tile(c, n * f * h * w, h * w)
    default = next((t for t in ok if tuple(t["tile"]) == default_tile), None)
    best_f = min(ok, key=lambda t: t["forward_ms"])
    best_b = min(ok, key=lambda t: t["backward_ms"])
    result = {"name": name, "shape": list(shape), "cudnn_ms": {k: round(v, 4) for k, v in ms.items()},
              "cudnn_relative_error": errors, "tiles": tiles,
              "default_tile": list(default_tile),
              "speedup_default": None if default is None else
              {"forward": round(ms["cudnn_forward"] / default["forward_ms"], 2),
               "backward": round(ms["cudnn_backward"] / default["backward_ms"], 2),
               "forward_vs_frames": round(ms["cudnn_frames_forward"] / default["forward_ms"], 2),
               "backward_vs_frames": round(ms["cudnn_frames_backward"] / default["backward_ms"], 2)},
              "best_forward": {"tile": best_f["tile"], "ms": round(best_f["forward_ms"], 4),
                               "speedup": round(ms["cudnn_forward"] / best_f["forward_ms"], 2)},
              "best_backward": {"tile": best_b["tile"], "ms": round(best_b["backward_ms"], 4),
                                "speedup": round(ms["cudnn_backward"] / best_b["backward_ms"], 2)}}  # fmt: skip
    print(f"{name:28s} fwd cudnn {ms['cudnn_forward']:.4f} frames {ms['cudnn_frames_forward']:.4f} "
          f"best {best_f['forward_ms']:.4f} {best_f['tile']}  bwd cudnn {ms['cudnn_backward']:.4f} "
          f"frames {ms['cudnn_frames_backward']:.4f} best {best_b['backward_ms']:.4f} {best_b['tile']}  "
          f"default {result['speedup_default']}  err {best_f['forward_error']:.1e}/{best_b['backward_error']:.1e} "
          f"cudnn {errors['cudnn_forward']:.1e}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/temporal_conv_h200.json"))
    parser.add_argument("--commit", default=None)
    parser.add_argument("--shapes", default=None, help="comma-separated prefixes of SHAPES' names")
    args = parser.parse_args()
    device = torch.device("cuda")
    names = [k for k in SHAPES if args.shapes is None or any(k.startswith(p) for p in args.shapes.split(","))]
    import triton

    result = {"benchmark": "temporal_conv", "env": {**environment(device, args.commit), "triton": triton.__version__},
              "dtype": "bfloat16", "rows": []}
    for name in names:  # written after every shape: a run cut off by a time limit keeps what it measured
        result["rows"].append(measure(name, SHAPES[name], device))
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
