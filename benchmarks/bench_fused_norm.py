"""Time the fused group norm -> scale/shift -> SiLU kernels against PyTorch's chain at Show-1's shapes, on a GPU.

For each shape: PyTorch's forward (`group_norm`, then `* factor + shift` for a ResNet's second pair, then `silu`)
and its backward as `train_motion`'s recompute runs it (`native_group_norm` again, `silu_backward`,
`native_group_norm_backward`), against `motion_adapters.fused_norm`'s forward and backward (with its chunk sizes
as `block_for` picks them, and with 1024 throughout), in bf16. Medians of `triton.testing.do_bench_cudagraph`
(GPU time, replayed from a CUDA graph as the training step runs) and of `do_bench` (eager, launched from
Python); several input sets rotated so that no run reads a cached tensor; the outputs checked against a float64
reference first.
The channels-last kernels run on the same values stored channels-last, at three tile sizes and with twice the
channels a tile.
Bytes: one read of x and one write of y forward; two reads of x and dy and one write of dx backward: the floor at
the measured copy bandwidth.

    python benchmarks/bench_fused_norm.py --out benchmarks/results/fused_norm_h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import GIB, environment, write  # noqa: E402

from motion_adapters import fused_norm as fused_module  # noqa: E402
from motion_adapters.fused_norm import group_norm_act_backward, group_norm_act_forward  # noqa: E402

#: name -> (shape, groups, with the time embedding's scale and shift). Show-1 base trains at 8 x 40 x 64 (frames
#: folded into the batch for ResNets; (1, C, F, H, W) for the temporal convolutions); SR1 samples 2 x 8 frames at
#: 160 x 256.
SHAPES = {
    "base resnet 320 @ 40x64": ((8, 320, 40, 64), 32, True),
    "base resnet 640 @ 20x32": ((8, 640, 20, 32), 32, True),
    "base resnet 1280 @ 5x8": ((8, 1280, 5, 8), 32, True),
    "base temporal 320 @ 8x40x64": ((1, 320, 8, 40, 64), 32, False),
    "base temporal 960 @ 8x10x16": ((1, 960, 8, 10, 16), 32, False),
    "sr1 resnet 128 @ 160x256": ((16, 128, 160, 256), 32, True),
    "sr1 temporal 256 @ 8x80x128": ((2, 256, 8, 80, 128), 32, False),
}


def torch_chain(x, weight, bias, factor, shift, groups):
    y = torch.nn.functional.group_norm(x, groups, weight, bias, 1e-5)
    if factor is not None:
        y = y * factor + shift
    return torch.nn.functional.silu(y)


def torch_backward(grad, x, weight, bias, factor, shift, mean, rstd, groups):
    """The backward pass of lean_backward's `_GroupNormAct` on PyTorch's kernels (the recompute included)."""
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    y = torch.ops.aten.native_group_norm(x, weight, bias, n, c, hw, groups, 1e-5)[0].view(x.shape)
    pre = y if factor is None else y * factor + shift
    grad_pre = torch.ops.aten.silu_backward(grad, pre)
    grad_y = grad_pre if factor is None else grad_pre * factor
    return torch.ops.aten.native_group_norm_backward(grad_y.contiguous(), x, mean, rstd, weight, n, c, hw, groups,
                                                     [True, False, False])[0]  # fmt: skip


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second of a large device-to-device copy."""
    import triton.testing

    a = torch.empty(2**28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=200, return_mode="median")
    return 2 * a.numel() / (ms / 1e3)


def kernel_times(fn, calls: int = 20) -> dict:
    """GPU milliseconds a call of each kernel `fn` launches (torch.profiler, the mean over `calls` calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            times[event.key[:60]] = round(event.device_time_total / 1e3 / calls, 4)
    return times


def measure(name, shape, groups, scale_shift, n_sets, bandwidth, device) -> dict:
    """Check, then time, PyTorch's chain and the fused kernels at one shape."""
    import triton.testing

    n, c = shape[:2]
    gen = torch.Generator(device).manual_seed(0)
    sets = []
    for _ in range(n_sets):
        x = (torch.randn(shape, device=device, generator=gen) * 2 + 1).bfloat16()
        grad = torch.randn(shape, device=device, generator=gen).bfloat16()
        weight = torch.randn(c, device=device, generator=gen).bfloat16()
        bias = torch.randn(c, device=device, generator=gen).bfloat16()
        if scale_shift:
            temb = torch.randn(n, 2 * c, *[1] * (len(shape) - 2), device=device, generator=gen).bfloat16()
            factor, shift = 1 + 0.3 * temb[:, :c], temb[:, c:]
        else:
            factor = shift = None
        sets.append((x, grad, weight, bias, factor, shift))
    x, grad, weight, bias, factor, shift = sets[0]
    x64 = x.double().requires_grad_(True)
    ref = torch_chain(x64, weight.double(), bias.double(), None if factor is None else factor.double(),
                      None if shift is None else shift.double(), groups)  # fmt: skip
    (ref_dx,) = torch.autograd.grad(ref, x64, grad.double())
    ref = ref.detach()
    y, mean, rstd = group_norm_act_forward(x, weight, bias, factor, shift, groups, 1e-5, "silu")
    dx = group_norm_act_backward(grad, x, weight, bias, factor, shift, mean, rstd, groups, "silu")
    torch_y = torch_chain(x, weight, bias, factor, shift, groups)
    native = torch.ops.aten.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c), groups, 1e-5)
    torch_dx = torch_backward(grad, x, weight, bias, factor, shift, native[1], native[2], groups)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm().detach())

    errors = {"fused_forward": rel(y, ref), "torch_forward": rel(torch_y, ref),
              "fused_backward": rel(dx, ref_dx), "torch_backward": rel(torch_dx, ref_dx)}  # fmt: skip
    saved = [(s, torch.ops.aten.native_group_norm(s[0], s[2], s[3], n, c, s[0].numel() // (n * c), groups, 1e-5),
              group_norm_act_forward(s[0], s[2], s[3], s[4], s[5], groups, 1e-5, "silu")) for s in sets]  # fmt: skip
    counter = {"i": 0}

    def rotating(fn, inputs=saved):
        def call():
            counter["i"] = (counter["i"] + 1) % len(inputs)
            return fn(*inputs[counter["i"]])

        return call

    timings = {
        "torch_forward": rotating(lambda s, nat, fus: torch_chain(s[0], s[2], s[3], s[4], s[5], groups)),
        "fused_forward": rotating(lambda s, nat, fus: group_norm_act_forward(s[0], s[2], s[3], s[4], s[5], groups,
                                                                              1e-5, "silu")),  # fmt: skip
        "torch_backward": rotating(lambda s, nat, fus: torch_backward(s[1], s[0], s[2], s[3], s[4], s[5], nat[1],
                                                                       nat[2], groups)),  # fmt: skip
        "fused_backward": rotating(lambda s, nat, fus: group_norm_act_backward(s[1], s[0], s[2], s[3], s[4], s[5],
                                                                                fus[1], fus[2], groups, "silu")),
    }  # fmt: skip
    # GPU time: the calls replayed from a CUDA graph (as train_motion's step runs them), so that Python's launch
    # cost does not hide the kernels; eager: launched from Python, as an uncaptured call runs
    ms, eager_ms = {}, {}
    for key, fn in timings.items():
        policies = {"default": fused_module.block_for, "fixed_1024": lambda s: 1024}
        for policy, choose in policies.items() if key.startswith("fused") else [("", None)]:
            label = f"{key}_{policy}" if policy else key
            if choose is not None:
                fused_module.block_for = choose
            fn()
            torch.cuda.synchronize()
            ms[label] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            eager_ms[label] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        fused_module.block_for = policies["default"]
    ms["fused_forward"], ms["fused_backward"] = ms["fused_forward_default"], ms["fused_backward_default"]
    # The channels-last kernels on the same values stored channels-last (the layout `layout.channels_last_sampling`
    # keeps through a UNet)
    memory_format = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    cl_saved = []
    for s, nat, _ in saved:
        xc, gc = s[0].contiguous(memory_format=memory_format), s[1].contiguous(memory_format=memory_format)
        cl_saved.append(((xc, gc, *s[2:]), nat, group_norm_act_forward(xc, *s[2:], groups, 1e-5, "silu")))
    (xc, gc, *_), _, cl_fus = cl_saved[0]
    errors["fused_channels_last_forward"] = rel(cl_fus[0], ref)
    errors["fused_channels_last_backward"] = rel(
        group_norm_act_backward(gc, xc, weight, bias, factor, shift, cl_fus[1], cl_fus[2], groups, "silu"), ref_dx)

    cl_calls = {
        "fused_channels_last_forward": rotating(lambda s, nat, fus: group_norm_act_forward(
            s[0], s[2], s[3], s[4], s[5], groups, 1e-5, "silu"), cl_saved),
        "fused_channels_last_backward": rotating(lambda s, nat, fus: group_norm_act_backward(
            s[1], s[0], s[2], s[3], s[4], s[5], fus[1], fus[2], groups, "silu"), cl_saved),
    }  # fmt: skip
    # each direction's tile and statistics loop as chosen (CL_TILE, CL_LOOP), then varied one at a time
    default = (dict(fused_module.CL_TILE), fused_module.CL_BLOCK_C, dict(fused_module.CL_LOOP))
    kernel_ms = {}
    for key, fn in cl_calls.items():
        direction = "forward" if key.endswith("forward") else "backward"
        tile, channels, loop = default[0][direction], default[1], default[2][direction]
        for label, (t, ch, lo) in (
            (key, (tile, channels, loop)),
            (f"{key}_tile_{tile // 2}", (tile // 2, channels, loop)),
            (f"{key}_tile_{tile * 2}", (tile * 2, channels, loop)),
            (f"{key}_channels_{channels * 2}", (tile, channels * 2, loop)),
            (f"{key}_loop_2", (tile, channels, 2)),
            (f"{key}_loop_4", (tile, channels, 4)),
            (f"{key}_tile_{tile // 2}_loop_4", (tile // 2, channels, 4)),
        ):
            fused_module.CL_TILE = {**default[0], direction: t}
            fused_module.CL_BLOCK_C = ch
            fused_module.CL_LOOP = {**default[2], direction: lo}
            fn()
            torch.cuda.synchronize()
            ms[label] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            eager_ms[label] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            if label == key:
                kernel_ms[key] = kernel_times(fn)
        fused_module.CL_TILE, fused_module.CL_BLOCK_C, fused_module.CL_LOOP = dict(default[0]), default[1], dict(
            default[2])
    kernel_ms["fused_forward"] = kernel_times(timings["fused_forward"])
    kernel_ms["fused_backward"] = kernel_times(timings["fused_backward"])
    nbytes = x.numel() * x.element_size()
    floor = {"forward": 2 * nbytes / bandwidth * 1e3, "backward": 5 * nbytes / bandwidth * 1e3}
    row = {"name": name, "shape": list(shape), "groups": groups, "scale_shift": scale_shift,
           "ms": {k: round(v, 4) for k, v in ms.items()}, "eager_ms": {k: round(v, 4) for k, v in eager_ms.items()},
           "floor_ms": {k: round(v, 4) for k, v in floor.items()}, "kernel_ms": kernel_ms,
           "speedup": {"forward": round(ms["torch_forward"] / ms["fused_forward"], 2),
                       "backward": round(ms["torch_backward"] / ms["fused_backward"], 2)},
           "relative_error_vs_float64": {k: float(f"{v:.3g}") for k, v in errors.items()}}  # fmt: skip
    print(f"{name:30s} fwd {ms['torch_forward']:.4f} -> {ms['fused_forward']:.4f} ms "
          f"({row['speedup']['forward']}x; 1024: {ms['fused_forward_fixed_1024']:.4f}; floor {floor['forward']:.4f})"
          f"  bwd {ms['torch_backward']:.4f} -> {ms['fused_backward']:.4f} ms ({row['speedup']['backward']}x; "
          f"1024: {ms['fused_backward_fixed_1024']:.4f}; floor {floor['backward']:.4f})  eager fwd "
          f"{eager_ms['torch_forward']:.4f} -> {eager_ms['fused_forward_default']:.4f}  err fused "
          f"{errors['fused_forward']:.1e}/{errors['fused_backward']:.1e} torch {errors['torch_forward']:.1e}/"
          f"{errors['torch_backward']:.1e}; channels-last fwd {ms['fused_channels_last_forward']:.4f} bwd "
          f"{ms['fused_channels_last_backward']:.4f}", flush=True)  # fmt: skip
    return row


def main() -> None:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_norm_h200.json"))
    parser.add_argument("--commit", default=None)
    parser.add_argument("--sets", type=int, default=4, help="input sets rotated between timed calls")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = [measure(name, *spec, args.sets, bandwidth, device) for name, spec in SHAPES.items()]
    import triton

    result = {"benchmark": "fused_norm", "env": {**environment(device, args.commit), "triton": triton.__version__},
              "dtype": "bfloat16", "activation": "silu", "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
              "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2), "rows": rows}  # fmt: skip
    write(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
