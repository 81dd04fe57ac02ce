"""Regenerate the benchmark tables of benchmarks/README.md and docs/performance.md from benchmarks/results/*.json.

Each table sits between `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->`; everything else in
the two pages is prose written by hand. Run after copying new results in:

    python benchmarks/report.py          # rewrite the tables
    python benchmarks/report.py --check  # exit 1 when a page is out of date (for CI)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = (ROOT / "README.md", ROOT / "benchmarks" / "README.md", ROOT / "docs" / "performance.md")
TRAINING_ORDER = ("baseline", "baseline_rerun", "full_eager", "full_graph", "full_graph_conv", "full_graph_math",
                  "full_graph_fast", "full", "lora", "full_compile")


def _f(value, digits=3, suffix=""):
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}{suffix}"


def _algorithms(limit: int | None) -> str:
    """How many algorithms cuDNN times a shape under `torch.backends.cudnn.benchmark_limit` (None: PyTorch's 10)."""
    limit = 10 if limit is None else limit
    return "every algorithm" if limit == 0 else f"{limit} algorithm{'' if limit == 1 else 's'}"


def environment_line(data: dict) -> str:
    env = data.get("env", {})
    parts = [env.get("gpu", env.get("device", "?")), f"torch {env.get('torch')}", f"diffusers {env.get('diffusers')}",
             f"peft {env.get('peft')}", f"commit `{str(env.get('commit'))[:12]}`", env.get("date", "")]
    if env.get("cudnn_benchmark"):
        limit = env.get("cudnn_benchmark_limit")
        parts.append("cuDNN benchmark mode" + ("" if limit in (None, 10) else f" ({_algorithms(limit)} a shape)"))
    rate = data.get("matmul_bf16_tflops")
    if rate:
        parts.append(f"bf16 matmul {rate:.0f} TFLOP/s (8192³, measured in the run)")
    return "_" + ", ".join(str(p) for p in parts if p) + "_"


def training_tables(data: dict) -> str:
    runs = data.get("runs", {})
    flops = data.get("flops", {})
    lines = [environment_line(data), ""]
    if flops:
        lines.append(f"One step: {flops['forward'] / 1e12:.2f} TFLOP forward + {flops['backward'] / 1e12:.2f} TFLOP "
                     f"backward = {flops['step'] / 1e12:.2f} TFLOP (counted with `FlopCounterMode`).")
        if data.get("matmul_bf16_tflops"):
            floor = 400 * flops["step"] / 1e12 / data["matmul_bf16_tflops"]
            lines.append(f"At the measured bf16 matmul rate, 400 steps cannot take less than {floor:.1f} s.")
        lines.append("")
    lines += ["| run | s/step (median) | 400 steps, projected | 400 steps, measured | one-off (warm-up, capture) | "
              "peak GiB | allocated at start GiB | TFLOP/s | of matmul peak |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in TRAINING_ORDER if n in runs] + [n for n in runs if n not in TRAINING_ORDER]:
        r = runs[name]
        if "error" in r:
            lines.append(f"| `{name}` | failed: {r['error'][:80]} | | | | | | | |")
            continue
        share = r.get("fraction_of_matmul_peak")
        measured = r.get("measured_400_s")
        measured = _f(measured, 1, " s") if measured else f"({r['steps']} steps: {r['measured_s']:.1f} s)"
        lines.append(
            f"| `{name}` | {_f(r.get('s_per_step'), 4)} | {_f(r.get('projected_400_s'), 1, ' s')} | {measured} | "
            f"{_f(r.get('one_off_overhead_s'), 1, ' s')} | {_f(r.get('peak_gib'), 2)} | "
            f"{_f(r.get('weights_gib'), 2)} | "
            f"{_f(r.get('tflops_achieved'), 0)} | {_f(100 * share if share else None, 1, ' %')} |"
        )
    lines += ["", "| run | what it is |", "|---|---|"]
    for name, r in runs.items():
        lines.append(f"| `{name}` | {r.get('description', '')} |")
    agreement = data.get("loss_agreement", {})
    if agreement.get("baseline_vs_rerun_mean_abs_diff") is not None:
        lines += ["", "Loss trajectories, same seeds (same timesteps and noise every step):", "",
                  "| compared with `baseline` | steps | mean abs. per-step difference | ratio to noise | "
                  "worst window-mean difference | within noise |", "|---|---|---|---|---|---|",
                  f"| `baseline_rerun` (noise scale) | {len(runs.get('baseline_rerun', {}).get('losses', []))} | "
                  f"{_f(agreement['baseline_vs_rerun_mean_abs_diff'], 5)} | 1.00 | – | – |"]
        for name, entry in agreement.items():
            if isinstance(entry, dict):
                lines.append(f"| `{name}` | {entry['steps_compared']} | {_f(entry['mean_abs_diff'], 5)} | "
                             f"{_f(entry.get('ratio_to_noise'), 2)} | {_f(entry.get('worst_window_mean_diff'), 5)} | "
                             f"{_f(entry.get('within_noise'))} |")
    return "\n".join(lines)


def cascade_tables(data: dict) -> str:
    lines = [environment_line(data), ""]
    if data.get("error"):
        lines.append(f"The run failed: `{data['error'][:200]}`")
        return "\n".join(lines)
    text = data.get("text_encoder", {})
    floor = data.get("compute_floor", {}).get("stage_seconds_at_matmul_rate", {})
    lines += ["| phase | steps run | seconds measured | seconds at Show-1's steps | floor at the matmul rate | "
              "peak GiB |", "|---|---|---|---|---|---|"]
    if text.get("mode") == "stream":
        lines.append(f"| T5 XXL encode ({text['parameters_b']:.2f} B), streamed from the CPU block by block | – | "
                     f"{text['encode_seconds']:.2f} | {text['encode_seconds']:.2f} | – | "
                     f"{_f(text.get('peak_gib'), 2)} |")
    elif text:
        where = {"cpu": "move to CPU", "meta": "release"}.get(text.get("released_to", "cpu"), "release")
        lines.append(f"| T5 XXL encode ({text['parameters_b']:.2f} B) + {where} | – | "
                     f"{text['encode_seconds']:.2f} + {text['offload_seconds']:.2f} | "
                     f"{text['encode_seconds'] + text['offload_seconds']:.2f} | – | {_f(text.get('peak_gib'), 2)} |")
    for name, r in data.get("stages", {}).items():
        full = _f(r.get("seconds_full_steps"), 1) + (" (linear extrapolation)" if r.get("extrapolated") else "")
        lines.append(f"| {name} {'x'.join(map(str, r['output_shape'][2:]))} | {r.get('steps')} of "
                     f"{r.get('full_steps')} | {r['seconds']:.2f} | {full} | {_f(floor.get(name), 1, ' s')} | "
                     f"{_f(r.get('peak_gib'), 2)} |")
    if "end_to_end_seconds" in data:
        label = " (linear extrapolation)" if data.get("end_to_end_extrapolated") else ""
        total_floor = data.get("compute_floor", {}).get("seconds_at_matmul_rate")
        lines.append(f"| **end to end** | | {data.get('cascade_seconds', 0):.1f} (stages, steps run) | "
                     f"**{data['end_to_end_seconds']:.1f}{label}** | {_f(total_floor, 1, ' s')} | "
                     f"**{_f(data.get('peak_gib'), 2)}** |")
    if text.get("mode") == "stream":
        lines += ["", f"T5's setup, as loading weights is and not counted above: moved to the CPU in "
                  f"{text['to_cpu_seconds']:.1f} s (random weights built on the GPU), its blocks' copies pinned in "
                  f"{text['stream_setup_seconds']:.1f} s."]
    if data.get("resident_weights_gib"):
        lines += ["", f"Stage weights resident during stages 1-4: {data['resident_weights_gib']:.2f} GiB (bf16)."]
    if data.get("cold_stages"):
        cold = ", ".join(f"{name} {r['seconds']:.2f} s" for name, r in data["cold_stages"].items())
        lines += ["", f"Timed after a warm-up pass of 2 steps a stage at the same shapes, which took "
                  f"{data['cold_seconds_2_steps_each']:.1f} s ({cold}): one-off costs (cuDNN's algorithm search, "
                  "kernel loading, allocator growth) that a first call pays once."]
    return "\n".join(lines)


def stage_kernels_table(data: dict) -> str:
    """One UNet call per stage with each way of running it (``bench_stage_kernels.py``)."""
    lines = [environment_line(data), "",
             "| stage | input (B, C, F, H, W) | variant | s a call | s a video (calls) | speed-up | first call s | "
             "mean abs diff / mean abs output |", "|---|---|---|---|---|---|---|---|"]
    for name, record in data.get("stages", {}).items():
        for variant, r in record.items():
            if not isinstance(r, dict):
                continue
            lines.append(f"| {name} | {tuple(record['input'])} | {variant} | {r['seconds_per_call']:.3f} | "
                         f"{r['seconds_per_video']:.1f} ({record['calls_per_video']}) | "
                         f"{r['speedup_vs_library']:.2f}x | {_f(r.get('first_call_seconds'), 1)} | "
                         f"{_f(r.get('mean_abs_diff_vs_library'), 4)} / {r['mean_abs_output']:.3f} |")
    return "\n".join(lines)


def profile_table(data: dict, rows: int = 12) -> str:
    """The top CUDA operators of one eager ``train_motion`` step (``bench_training.py --profile``)."""
    profile = [row for row in data.get("profile", []) if "name" in row]
    kernels = next((row["kernels_per_step"] for row in data.get("profile", []) if "kernels_per_step" in row), None)
    lines = [environment_line(data), ""]
    if kernels:
        lines += [f"{kernels:,.0f} CUDA kernels a step. Operators nest (`aten::conv2d` contains "
                  "`aten::cudnn_convolution`), so the shares overlap and do not add up to 100 %.", ""]
    lines += ["| operator or kernel | CUDA ms a step | calls a step | share of the step's CUDA time |",
              "|---|---|---|---|"]
    for row in profile[:rows]:
        name = row["name"].replace("|", "/")
        lines.append(f"| `{name}` | {row['cuda_ms_per_step']:.1f} | {row['calls_per_step']:.0f} | "
                     f"{100 * row['share']:.1f} % |")
    copies = next((row["copies_by_line"] for row in data.get("profile", []) if "copies_by_line" in row), [])
    if copies:  # --profile-stacks
        lines += ["", "The copies of that step (`copy_`, `clone`, `contiguous`, `_to_copy`, each counted once, in its "
                  "outermost operator), by the innermost Python lines that made them (the autograd node for copies "
                  "of the backward pass):", "",
                  "| copy | made in | CUDA ms a step | calls a step |", "|---|---|---|---|"]
        for row in copies[:rows]:
            where = " < ".join(f"`{line}`" for line in row["lines"][:2]) or "(no Python frame)"
            lines.append(f"| `{row['op']}` | {where} | {row['cuda_ms_per_step']:.2f} | {row['calls_per_step']:.0f} |")
    return "\n".join(lines)


def stage_profile_tables(data: dict, rows: int = 12) -> str:
    """The top CUDA operators of a call of each stage (``bench_stage_kernels.py --profile VARIANT``)."""
    lines = [environment_line(data)]
    for stage, profile in data.get("profiles", {}).items():
        lines += ["", f"**{stage}**, `{profile['variant']}`: {profile['cuda_ms_per_call']:.1f} ms of CUDA kernels "
                  f"and {profile['kernels_per_call']:,.0f} kernels a call. Operators nest, so the shares overlap.", "",
                  "| operator or kernel | CUDA ms a call | calls a call | share of the call's kernel time |",
                  "|---|---|---|---|"]
        for row in profile["rows"][:rows]:
            name = row["name"].replace("|", "/")
            lines.append(f"| `{name}` | {row['cuda_ms_per_call']:.1f} | {row['calls_per_call']:.0f} | "
                         f"{100 * row['share']:.1f} % |")
    return "\n".join(lines)


def training_summary(data: dict) -> str:
    """Three rows for the project README: the reference loop against `train_motion`'s full and LoRA runs."""
    runs = data.get("runs", {})
    base = runs.get("baseline", {}).get("s_per_step")
    lines = [environment_line(data), "", "| VMC training, 400 steps of show-1-base | time | s/step | vs. reference | "
             "peak GiB |", "|---|---|---|---|---|"]
    # the default layout of `full`: recorded since the runs record it; before, "full_cl" ran beside a contiguous one
    # in training_cl_h200, and beside the defaults (channels-last there) in later runs
    full_format = runs.get("full", {}).get("memory_format_run")
    full = f"`train_motion`, full, {full_format.replace('_', '-')}" if full_format else (
        "`train_motion`, full, contiguous" if data.get("env", {}).get("commit") == "05819fa" and "full_cl" in runs
        else "`train_motion`, full (defaults)" if "full_cl" in runs else "`train_motion`, full")
    for name, label in (("baseline", "reference loop (fp32 + fp16 autocast)"), ("full", full),
                        ("full_cl", "`train_motion`, full, channels-last"), ("lora", "`train_motion`, LoRA r=16")):
        r = runs.get(name)
        if not r or "error" in r:
            continue
        time_s = r.get("measured_400_s") or r.get("projected_400_s")
        kind = "measured" if r.get("measured_400_s") else "projected"
        if r.get("measured_400_s_without_overhead") and r.get("one_off_overhead_s"):  # the steps, then the one-off
            time_s, kind = r["measured_400_s_without_overhead"], (
                f"measured, + {_f(r['one_off_overhead_s'], 1, ' s')} once: first-call compilation, warm-up, capture")
        ratio = base / r["s_per_step"] if base and r.get("s_per_step") else None
        lines.append(f"| {label} | {_f(time_s, 1, ' s')} ({kind}) | {_f(r.get('s_per_step'), 3)} | "
                     f"{_f(ratio, 2, 'x')} | {_f(r.get('peak_gib'), 1)} |")
    return "\n".join(lines)


def _activation_run_label(name: str) -> str:
    """`activation_memory.py`'s run name as the options it sets ("input_grad_only+recompute")."""
    convs, _, recompute = name.partition("+")
    return f"`frozen_convs='{convs}'`" + (" + `frozen_activations='recompute'`" if recompute else "")


def activation_memory_table(data: dict) -> str:
    """Bytes kept for the backward pass by module class, for each layer choice (`activation_memory.py`)."""
    runs = data.get("runs", {})
    names = list(runs)
    settings = data.get("settings", {})
    env = data.get("env", {})
    modules = sorted({m for r in runs.values() for m in r["by_module"]},
                     key=lambda m: (-max(r["by_module"].get(m, 0) for r in runs.values()), m))  # fmt: skip
    lines = [f"_CPU, {env.get('dtype')}, torch {env.get('torch')}, commit `{env.get('commit')}`; block_out_channels "
             f"{settings.get('block_out_channels')}, {settings.get('frames')} x {settings.get('height')} x "
             f"{settings.get('image_width')}_", "",
             "| kept by | " + " | ".join(f"MiB, {_activation_run_label(n)}" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for module in modules:
        cells = [f"{runs[n]['by_module'].get(module, 0) / 2**20:.0f}" for n in names]
        lines.append(f"| `{module}` | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{runs[n]['total_bytes'] / 2**20:.0f}**" for n in names) + " |")
    return "\n".join(lines)


def fused_norm_table(data: dict) -> str:
    """The fused norm kernels against PyTorch's chain at Show-1's shapes (``bench_fused_norm.py``)."""
    env = data.get("env", {})
    lines = [f"_{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, commit `{env.get('commit')}`, "
             f"{env.get('date')}; {data.get('dtype')}, SiLU; copy bandwidth {data.get('copy_bandwidth_gb_s')} GB/s "
             "(read + write, measured in the run)_", "",
             "| shape (groups 32) | scale, shift | forward ms: PyTorch / fused (chunks as chosen / 1024) / floor | "
             "speed-up | backward ms: PyTorch / fused (as chosen / 1024) / floor | speed-up | error vs float64: "
             "PyTorch / fused |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in data.get("rows", []):
        ms, floor, err = row["ms"], row["floor_ms"], row["relative_error_vs_float64"]
        policy = "fit" if "fused_forward_fit" in ms else "default"
        lines.append(
            f"| {row['name']} {tuple(row['shape'])} | {'yes' if row['scale_shift'] else 'no'} | "
            f"{ms['torch_forward']:.4f} / {ms[f'fused_forward_{policy}']:.4f} / {ms['fused_forward_fixed_1024']:.4f}"
            f" / {floor['forward']:.4f} | {row['speedup']['forward']:.2f}x | {ms['torch_backward']:.4f} / "
            f"{ms[f'fused_backward_{policy}']:.4f} / {ms['fused_backward_fixed_1024']:.4f} / {floor['backward']:.4f}"
            " | "
            f"{row['speedup']['backward']:.2f}x | {err['torch_forward']:.1e} / {err['fused_forward']:.1e} |"
        )
    return "\n".join(lines)


def fused_norm_layout_table(data: dict) -> str:
    """The fused kernels on channels-last inputs against the channel-row ones (``bench_fused_norm.py``)."""
    env = data.get("env", {})
    lines = [f"_{env.get('gpu')}, triton {env.get('triton')}, commit `{env.get('commit')}`, {env.get('date')}; "
             f"{data.get('dtype')}, SiLU; GPU ms of calls replayed from a CUDA graph (medians)_", "",
             "| shape (groups 32) | forward ms: contiguous / channels-last as chosen (other settings: values a "
             "tile, channels a tile, tiles a statistics program) / floor | backward ms: the same | error vs "
             "float64: contiguous / channels-last |", "|---|---|---|---|"]  # fmt: skip
    for row in data.get("rows", []):
        ms, floor, err = row["ms"], row["floor_ms"], row["relative_error_vs_float64"]
        if "fused_channels_last_forward" not in ms:
            continue
        cells = []
        for pass_ in ("forward", "backward"):
            key = f"fused_channels_last_{pass_}"
            others = [f"{k.removeprefix(key + '_').replace('_', ' ')}: {v:.4f}" for k, v in ms.items()
                      if k.startswith(key + "_")]
            cells.append(f"{ms[f'fused_{pass_}']:.4f} / {ms[key]:.4f} ({'; '.join(others)}) / {floor[pass_]:.4f}")
        lines.append(f"| {row['name']} {tuple(row['shape'])} | {cells[0]} | {cells[1]} | "
                     f"{err['fused_forward']:.1e} / {err['fused_channels_last_forward']:.1e} |")
    return "\n".join(lines)


def temporal_conv_table(data: dict) -> str:
    """The (3, 1, 1) temporal convolutions on cuDNN against the Triton kernel (``bench_temporal_conv.py``)."""
    env = data.get("env", {})
    lines = [f"_{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, commit `{env.get('commit')}`, "
             f"{env.get('date')}; {data.get('dtype')}; GPU ms of calls replayed from a CUDA graph (medians)_", "",
             "| shape (N, C, F, H, W) | forward ms: cuDNN conv3d / cuDNN (3, 1) conv2d / Triton | "
             "speed-up vs conv2d | input gradient ms: conv3d / conv2d / Triton | speed-up vs conv2d | Triton tile | "
             "relative error vs float32: cuDNN / Triton |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in data.get("rows", []):
        ms, tile = row["cudnn_ms"], tuple(row["default_tile"])
        ours = next((t for t in row["tiles"] if tuple(t["tile"]) == tile and "error" not in t), None)
        if ours is None:  # the benchmark records a tile the GPU could not run instead of stopping
            lines.append(f"| {row['name']} {tuple(row['shape'])} | the default tile {tile[:3]} failed | | | | | |")
            continue
        lines.append(
            f"| {row['name']} {tuple(row['shape'])} | {ms['cudnn_forward']:.4f} / {ms['cudnn_frames_forward']:.4f} / "
            f"{ours['forward_ms']:.4f} | {ms['cudnn_frames_forward'] / ours['forward_ms']:.2f}x | "
            f"{ms['cudnn_backward']:.4f} / {ms['cudnn_frames_backward']:.4f} / {ours['backward_ms']:.4f} | "
            f"{ms['cudnn_frames_backward'] / ours['backward_ms']:.2f}x | {tile[:3]} | "
            f"{row['cudnn_relative_error']['cudnn_forward']:.1e} / {ours['forward_error']:.1e} |"
        )
    return "\n".join(lines)


def frame_attention_table(data: dict) -> str:
    """The frame-attention kernels against PyTorch at Show-1's temporal-attention shapes (bench_frame_attention)."""
    env = data.get("env", {})
    rows = data.get("rows", [])
    labels = list(dict.fromkeys(k.removesuffix("_forward") for row in rows for k in row["ms"]
                                if k.endswith("_forward") and not k.endswith("_forward_backward")))  # fmt: skip
    defaults = data.get("defaults", {})
    if "pairs_split" in defaults:  # lanes: a pair's channels split over up to pairs_split threads
        lanes = (f"{defaults['pairs_block']} lanes a program, heads of at least "
                 f"{2 * defaults['pairs_split_channels']} channels over up to {defaults['pairs_split']} lanes a pair")
    if defaults.get("short_kernel", "pairs") != "pairs":  # the "dots" kernels the default at wider heads
        pairs = (f"`pairs`: {lanes}; the default: `{defaults['short_kernel']}` ({defaults['dots_rows']} rows a "
                 f"program) at heads of {defaults['dots_min_channels']} channels or more, `pairs` below")
    elif "pairs_split" in defaults:
        pairs = f"`pairs` = the default: {lanes}, {defaults['pairs_split_channels']} channels or more a lane"
    else:
        pairs = f"`pairs` = {defaults.get('pairs_block')} pairs a program, the default"
    lines = [f"_{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, commit `{env.get('commit')}`, "
             f"{env.get('date')}; {data.get('dtype')}, 64 heads; microseconds of GPU time, calls replayed from a CUDA "
             f"graph (medians); copy bandwidth {data.get('copy_bandwidth_gb_s')} GB/s (read + write, measured in the "
             f"run); {pairs}_", "",
             "| shape (N, frames, channels) | " + " | ".join(f"`{label}` fwd / bwd" for label in labels)
             + " | floor fwd / bwd | `pairs` against `tile` | largest error vs float64 |",
             "|---" * (len(labels) + 4) + "|"]  # fmt: skip
    for row in rows:
        ms, floor = row["ms"], row["floor_ms"]
        cells = [f"{ms[f'{label}_forward'] * 1e3:.0f} / {ms[f'{label}_backward'] * 1e3:.0f}"
                 if f"{label}_forward" in ms else "–" for label in labels]  # fmt: skip
        both = {label: ms[f"{label}_forward"] + ms[f"{label}_backward"] for label in ("pairs", "tile")
                if f"{label}_forward" in ms}  # fmt: skip
        ratio = f"{both['tile'] / both['pairs']:.1f}x" if len(both) == 2 else "–"
        worst = max(e for errs in row["relative_error_vs_float64"].values() for e in errs.values())
        lines.append(f"| {row['name']} {tuple(row['shape'])} | " + " | ".join(cells)
                     + f" | {floor['forward'] * 1e3:.0f} / {floor['backward'] * 1e3:.0f} | {ratio} | {worst:.1e} |")
    return "\n".join(lines)


def _profiled(data: dict, needle: str) -> tuple[float, int] | None:
    """Cumulative seconds and calls of the first profiled function whose name contains `needle`, or None."""
    for row in data.get("first_profile", {}).get("by_cumtime", []):
        if needle in row["function"]:
            return row["cumtime_s"], row["calls"]
    return None


def startup_table(data: dict) -> str:
    """A process's first `train_motion` call against its second: setup, first steps, steady step (bench_startup)."""
    settings = data.get("settings", {})
    lines = [environment_line(data), "",
             f"{settings.get('model')}, {settings.get('frames')} frames at {settings.get('height')} x "
             f"{settings.get('width')}, {settings.get('steps')} steps a call; the first call's setup and first step "
             "under cProfile.", "",
             "| call | setup | step 1 (eager) | step 2 (capture + replay) | later steps (median) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, label in (("first", "the process's first"), ("second", "second, same process")):
        run = data.get(name)
        if not run:
            continue
        steps = run["step_seconds"]
        later = sorted(steps[2:])[len(steps[2:]) // 2] if len(steps) > 2 else None
        lines.append(f"| {label} | {_f(run['setup_seconds'], 2, ' s')} | {_f(steps[0], 2, ' s')} | "
                     f"{_f(steps[1] if len(steps) > 1 else None, 2, ' s')} | {_f(later, 4, ' s')} |")
    parts = []
    for needle, what in (("(triton_key)", "Triton's hash of its own installation"),
                         ("(_do_compile)", "Triton's compiled kernels found and loaded")):
        found = _profiled(data, needle)
        if found:
            parts.append(f"{what}: {found[0]:.2f} s ({found[1]} call{'s' if found[1] != 1 else ''})")
    if parts:
        lines += ["", "In the first call's profile: " + "; ".join(parts) + "."]
    return "\n".join(lines)


def _span(values: list[float], digits: int) -> str:
    """The smallest and largest of `values` ("a to b"), or the one value."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low} to {high}"


def precision_table(data: dict) -> str:
    """One VMC step with the matrix products' inputs rounded to each format, against float32 (`bench_precision.py`)."""
    env, settings = data.get("env", {}), data.get("settings", {})
    draws = data.get("draws", [])
    names = [n for n in data.get("variants", {}) if n != "float32"]
    lines = [f"_CPU ({settings.get('threads')} threads), torch {env.get('torch')}, commit `{env.get('commit')}`, "
             f"{env.get('date')}; {settings.get('model')}, {settings.get('frames')} x {settings.get('height')} x "
             f"{settings.get('width')}, timesteps {', '.join(str(d['t']) for d in draws)}_", "",
             "| run | noise prediction's relative error | q/k/v gradient's relative error | its cosine | "
             "largest loss difference | gradient error / other dropout's |",
             "|---|---|---|---|---|---|"]
    for name in names:
        runs = [d["runs"][name] for d in draws if name in d["runs"]]
        if not runs:
            continue
        noise = [d["runs"].get("float32_other_dropout") for d in draws if name in d["runs"]]
        ratios = [r["grad_relative_error"] / n["grad_relative_error"] for r, n in zip(runs, noise)
                  if n and n["grad_relative_error"] > 0 and name != "float32_other_dropout"]  # fmt: skip
        cells = [_span([r[key] for r in runs], 4) for key in ("eps_relative_error", "grad_relative_error",
                                                              "grad_cosine")]  # fmt: skip
        cells.append(f"{max(abs(r['loss_difference']) for r in runs):.1e}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {_span(ratios, 2) if ratios else '–'} |")
    return "\n".join(lines)


def timing_pays(row: dict, steps: int) -> bool:
    """Whether timing a `--compare-timed` shape saves more in `steps` steps than its first call cost more."""
    saved = row["count"] * (row["call_ms"] - row["timed_call_ms"])
    return saved * steps > row["timed_first_call_ms"] - row["first_call_ms"]


def conv_timing_table(data: dict, steps: int = 400) -> str:
    """`bench_conv_shapes.py --compare-timed`: what cuDNN's timed algorithm choice saves and costs, shape by shape.

    A shape's timing pays in one run of `steps` steps where the time it saves (calls a step x `steps` x the steady
    difference) exceeds what its first call cost more than the heuristic choice's.
    """
    limit = data.get("timed_env", {}).get("cudnn_benchmark_limit")
    lines = [environment_line(data).rstrip("_") + f"; timed in a second process, {_algorithms(limit)} a shape_", "",
             "| kind | input | weight | calls a step | heuristic ms | timed ms | saved a step, ms | first call, ms "
             "(heuristic / timed) | timing costs, ms | pays in " + f"{steps} steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    saved_total = cost_total = 0.0
    for r in data.get("results", []):
        if "timed_call_ms" not in r:
            continue
        saved = r["count"] * (r["call_ms"] - r["timed_call_ms"])
        cost = r["timed_first_call_ms"] - r["first_call_ms"]
        saved_total, cost_total = saved_total + saved, cost_total + cost
        lines.append(f"| {r['kind']} | {'x'.join(map(str, r['x']))} | {'x'.join(map(str, r['w']))} | {r['count']} | "
                     f"{r['call_ms']:.4f} | {r['timed_call_ms']:.4f} | {saved:+.4f} | {r['first_call_ms']:.1f} / "
                     f"{r['timed_first_call_ms']:.1f} | {cost:.1f} | {'yes' if timing_pays(r, steps) else 'no'} |")
    lines += ["", f"All shapes: {saved_total:+.3f} ms saved a step, {cost_total / 1e3:.2f} s more on their first "
              f"calls ({steps} steps save {saved_total * steps / 1e3:+.2f} s)."]
    return "\n".join(lines)


def render() -> dict[str, str]:
    blocks = {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        kind = data.get("benchmark")
        if kind == "training":
            blocks[f"training:{path.stem}"] = training_tables(data)
            blocks[f"training_summary:{path.stem}"] = training_summary(data)
            if data.get("profile"):
                blocks[f"profile:{path.stem}"] = profile_table(data)
        elif kind == "cascade":
            blocks[f"cascade:{path.stem}"] = cascade_tables(data)
        elif kind == "activation_memory":
            blocks[f"activation_memory:{path.stem}"] = activation_memory_table(data)
        elif kind == "stage_kernels":
            blocks[f"stage_kernels:{path.stem}"] = stage_kernels_table(data)
            if data.get("profiles"):
                blocks[f"stage_profile:{path.stem}"] = stage_profile_tables(data)
        elif kind == "fused_norm":
            blocks[f"fused_norm:{path.stem}"] = fused_norm_table(data)
            if any("fused_channels_last_forward" in row["ms"] for row in data.get("rows", [])):
                blocks[f"fused_norm_layout:{path.stem}"] = fused_norm_layout_table(data)
        elif kind == "temporal_conv":
            blocks[f"temporal_conv:{path.stem}"] = temporal_conv_table(data)
        elif kind == "frame_attention":
            blocks[f"frame_attention:{path.stem}"] = frame_attention_table(data)
        elif kind == "conv_shapes" and data.get("timed_env"):
            blocks[f"conv_timing:{path.stem}"] = conv_timing_table(data)
        elif kind == "startup":
            blocks[f"startup:{path.stem}"] = startup_table(data)
        elif kind == "precision":
            blocks[f"precision:{path.stem}"] = precision_table(data)
    return blocks


def rewrite(page: Path, blocks: dict[str, str]) -> str:
    text = page.read_text()

    def fill(match: re.Match) -> str:
        name = match.group(1)
        body = blocks.get(name, f"_no results/{name.split(':', 1)[-1]}.json yet_")
        return f"<!-- BEGIN GENERATED: {name} -->\n{body}\n<!-- END GENERATED: {name} -->"

    return re.sub(r"<!-- BEGIN GENERATED: (\S+) -->.*?<!-- END GENERATED: \1 -->", fill, text, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the pages are up to date")
    args = parser.parse_args(argv)
    blocks = render()
    stale = []
    for page in PAGES:
        if not page.is_file():
            continue
        new = rewrite(page, blocks)
        if new != page.read_text():
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(str(p.relative_to(ROOT)) for p in (stale or PAGES)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
