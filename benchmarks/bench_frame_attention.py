"""Time the Triton frame-attention kernels against PyTorch's attention at Show-1's temporal-attention shapes, on a GPU.

For each shape, (N sequences, F frames, heads * d channels) with Show-1's 64 heads: the "pairs" kernels (one
(sequence, head) pair a thread, a loop over its channels; the default up to 8 frames) at several block sizes, the
"dots" kernels (a block of pairs as one block-diagonal attention on tensor cores; 64 rows a program in 4 warps, or
in 2, or 32 or 128 rows; tf32 products of the probabilities, or bf16 ones), the
"tile" kernels (a block of pairs a program as (pairs, frames, frames, padded channels) products; the first kernels,
and the only ones past 8 frames) and PyTorch (heads split, `scaled_dot_product_attention` on `CHUNK` sequences a call,
heads merged), forward and backward, in bf16. Medians of `triton.testing.do_bench_cudagraph` (GPU time, replayed
from a CUDA graph as the training step and the stage calls run them); several input sets rotated so that no run reads
a cached tensor; every output checked against float64 first. The backward pass is timed as forward and backward
captured together, less the forward. Bytes: q, k, v read and the output written forward; q, k, v and the output's
gradient read and three gradients written backward: the floor at the measured copy bandwidth.

    python benchmarks/bench_frame_attention.py --out benchmarks/results/frame_attention_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_norm import copy_bandwidth  # noqa: E402
from bench_training import GIB, environment, module_settings, write  # noqa: E402

from motion_adapters import frame_attention as fa  # noqa: E402

HEADS = 64
#: name -> (N, frames, channels). show-1-base trains at 1 x 8 x 40 x 64 (its four levels: 320, 640, 960 and 1280
#: channels at 40x64 to 5x8, temporal attention at the lower three; the 1280 @ 10x16 row is of earlier runs);
#: interpolation samples 14 windows of 5 frames at 40 x 64; SR1 2 x 8 frames at 160 x 256
#: (128 to 768 channels: heads of 2, 4, 8 and 12).
SHAPES = {
    "base 320 @ 40x64, 8 frames": (2560, 8, 320),
    "base 640 @ 20x32, 8 frames": (640, 8, 640),
    "base 1280 @ 10x16, 8 frames": (160, 8, 1280),
    "base 960 @ 10x16, 8 frames": (160, 8, 960),
    "base 1280 @ 5x8, 8 frames": (40, 8, 1280),
    "interpolation 320 @ 14x40x64, 5 frames": (35840, 5, 320),
    "interpolation 1280 @ 14x10x16, 5 frames": (2240, 5, 1280),
    "sr1 128 @ 2x160x256, 8 frames": (81920, 8, 128),
    "sr1 256 @ 2x80x128, 8 frames": (20480, 8, 256),
    "sr1 512 @ 2x40x64, 8 frames": (5120, 8, 512),
    "sr1 768 @ 2x20x32, 8 frames": (1280, 8, 768),
}
#: label -> `fa._launch` overrides (kernel, pairs a program, warps, lanes a pair[, channels unrolled]); None: PyTorch
VARIANTS = {
    "pairs": ("pairs", None, None, None),
    "pairs_split1": ("pairs", None, None, 1),
    "pairs_split2": ("pairs", None, None, 2),
    "pairs_split4": ("pairs", None, None, 4),
    "pairs_split4_block64": ("pairs", 64, None, 4),
    "pairs_rolled": ("pairs", None, None, None, 1),
    "pairs_unrolled2": ("pairs", None, None, None, 2),
    "pairs_128": ("pairs", 128, 4, None),
    "pairs_256": ("pairs", 256, 8, None),
    "pairs_128_2warps": ("pairs", 128, 2, None),
    "pairs_dv_first": ("pairs", None, None, None),
    "pairs_dv_last": ("pairs", None, None, None),
    "pairs_int32": ("pairs", None, None, None),
    "pairs_rolled_int32": ("pairs", None, None, None, 1),
    "dots": ("dots", 8, None, None),  # 64 rows at 5 to 8 frames
    "dots_32": ("dots", 4, None, None),
    "dots_128": ("dots", 16, None, None),
    "dots_half_p": ("dots", None, None, None),
    "dots_2warps": ("dots", 8, 2, None),
    "tile": ("tile", None, None, None),
    "torch": None,
}
#: label -> `frame_attention` module constants it runs with (restored afterwards)
MODULE_SETTINGS = {"pairs_dv_first": {"PAIRS_DV": "first"},
                   "pairs_dv_last": {"PAIRS_DV": "last"},
                   "pairs_int32": {"PAIRS_INT32_OFFSETS": True},
                   "pairs_rolled_int32": {"PAIRS_INT32_OFFSETS": True, "PAIRS_DV": "first"},
                   "dots_half_p": {"DOTS_HALF_PROBABILITIES": True}}


#: sequences a `scaled_dot_product_attention` call takes: PyTorch's CUDA kernels failed with an illegal memory access
#: on the H200 at 35,840 sequences of 64 heads (interpolation's top level), so PyTorch's rows run in chunks of this
CHUNK = 8192


def torch_attention(q, k, v, heads):
    """Heads split, `scaled_dot_product_attention`, heads merged, `CHUNK` sequences a call."""
    outs = []
    for chunk in zip(*(t.split(CHUNK) for t in (q, k, v))):
        split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in chunk]
        outs.append(torch.nn.functional.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2))
    return torch.cat(outs)


def _measure_variant(label, launch, channels, sets, grad, want, want_grads, n_sets, ms, errors, counter) -> None:
    """Check one variant against float64 into `errors` and time it into `ms`."""
    import triton.testing

    def rel(got, ref):
        return float((got.detach().double() - ref.detach()).norm() / ref.detach().norm())

    def forward(q, k, v, launch=launch):
        if launch is None:
            return torch_attention(q, k, v, HEADS)
        return fa._FrameAttention.apply(q, k, v, HEADS, 1.0 / (channels // HEADS) ** 0.5, launch)

    leaves = [[t.detach().requires_grad_(True) for t in s[:3]] + [s[3]] for s in sets]
    out = forward(*leaves[0][:3])
    got_grads = torch.autograd.grad(out, leaves[0][:3], grad)
    errors[label] = {"forward": rel(out, want),
                     "backward": max(rel(a, b) for a, b in zip(got_grads, want_grads))}  # fmt: skip
    del out, got_grads

    def forward_only(forward=forward):
        counter["i"] = (counter["i"] + 1) % n_sets
        with torch.no_grad():
            return forward(*sets[counter["i"]][:3])

    def forward_backward(forward=forward, leaves=leaves):
        # captured whole, as the training step is; the backward's time is this less the forward's
        counter["i"] = (counter["i"] + 1) % n_sets
        q, k, v, grad = leaves[counter["i"]]
        return torch.autograd.grad(forward(q, k, v), (q, k, v), grad)

    for key, fn in (("forward", forward_only), ("forward_backward", forward_backward)):
        fn()
        torch.cuda.synchronize()
        ms[f"{label}_{key}"] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    ms[f"{label}_backward"] = ms[f"{label}_forward_backward"] - ms[f"{label}_forward"]


def measure(name, n, frames, channels, n_sets, bandwidth, device, labels=None) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    sets = [[torch.randn(n, frames, channels, generator=g, device=device, dtype=torch.bfloat16) for _ in range(4)]
            for _ in range(n_sets)]  # fmt: skip
    q, k, v, grad = sets[0]
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    want = torch_attention(*exact, HEADS)
    want_grads = torch.autograd.grad(want, exact, grad.double())

    ms, errors, counter = {}, {}, {"i": 0}
    for label, launch in VARIANTS.items():
        if labels is not None and label not in labels:
            continue
        if launch is not None and launch[0] == "pairs" and fa._padded(frames) > fa.PAIRS_FRAMES:
            continue
        if launch is not None and launch[0] == "pairs" and (launch[3] or 1) > fa._padded(channels // HEADS):
            continue  # more lanes than the head has channels (rounded up to a power of two)
        with module_settings(*[(fa, attr, value) for attr, value in MODULE_SETTINGS.get(label, {}).items()]):
            _measure_variant(label, launch, channels, sets, grad, want, want_grads, n_sets, ms, errors, counter)
    nbytes = n * frames * channels * 2
    floor = {"forward": 4 * nbytes / bandwidth * 1e3, "backward": 7 * nbytes / bandwidth * 1e3}
    row = {"name": name, "shape": [n, frames, channels], "heads": HEADS,
           "ms": {key: round(value, 4) for key, value in ms.items()},
           "floor_ms": {key: round(value, 4) for key, value in floor.items()},
           "relative_error_vs_float64": {label: {d: float(f"{e:.3g}") for d, e in err.items()}
                                         for label, err in errors.items()}}  # fmt: skip
    parts = [f"{label} {ms[f'{label}_forward'] * 1e3:.0f}/{ms[f'{label}_backward'] * 1e3:.0f}" for label in errors]
    print(f"{name:42s} us fwd/bwd: {', '.join(parts)}; floor {floor['forward'] * 1e3:.0f}/"
          f"{floor['backward'] * 1e3:.0f}; errors {row['relative_error_vs_float64']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/frame_attention_h200.json"))
    parser.add_argument("--commit", default=None)
    parser.add_argument("--sets", type=int, default=4, help="input sets rotated between timed calls")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--shapes", default=None, help="comma-separated prefixes of the shape names (e.g. base)")
    args = parser.parse_args()
    labels = None if args.variants is None else args.variants.split(",")
    unknown = sorted(set(labels or []) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    shapes = {name: shape for name, shape in SHAPES.items()
              if args.shapes is None or name.startswith(tuple(args.shapes.split(",")))}  # fmt: skip
    import triton

    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = [measure(name, *shape, args.sets, bandwidth, device, labels) for name, shape in shapes.items()]
    env = {**environment(device, args.commit), "triton": triton.__version__}
    result = {"benchmark": "frame_attention", "env": env,
              "dtype": "bfloat16", "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
              "defaults": {"pairs_frames": fa.PAIRS_FRAMES, "pairs_block": fa.PAIRS_BLOCK, "tile": fa.TILE,
                           "pairs_split": fa.PAIRS_SPLIT, "pairs_split_channels": fa.PAIRS_SPLIT_CHANNELS,
                           "pairs_unroll": fa.PAIRS_UNROLL, "short_kernel": fa.SHORT_KERNEL,
                           "dots_rows": fa.DOTS_ROWS, "dots_min_channels": fa.DOTS_MIN_CHANNELS},
              "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2), "rows": rows}  # fmt: skip
    write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
