"""benchmarks/report.py: the generated tables match the committed JSON; the profile and stage-kernel tables render."""

import json


import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def report():
    return load_script("benchmarks/report.py")


def test_committed_pages_are_up_to_date_with_the_results(report):
    assert report.main(["--check"]) == 0


def test_profile_table_lists_the_top_operators_in_order(report):
    data = {
        "env": {"gpu": "GPU", "torch": "t", "diffusers": "d", "peft": "p", "commit": "abc", "date": "now"},
        "profile": [
            {"kernels_per_step": 1234.0},
            {"name": "aten::conv2d", "cuda_ms_per_step": 40.0, "calls_per_step": 10.0, "share": 0.4},
            {"name": "a|b", "cuda_ms_per_step": 5.5, "calls_per_step": 2.0, "share": 0.055},
        ],
    }
    table = report.profile_table(data, rows=5)
    assert "1,234 CUDA kernels a step" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == ["| `aten::conv2d` | 40.0 | 10 | 40.0 % |", "| `a/b` | 5.5 | 2 | 5.5 % |"]


def test_profile_table_lists_the_copies_by_the_lines_that_made_them(report):
    data = {
        "env": {"gpu": "GPU", "torch": "t", "diffusers": "d", "peft": "p", "commit": "abc", "date": "now"},
        "profile": [
            {"name": "aten::copy_", "cuda_ms_per_step": 4.0, "calls_per_step": 10.0, "share": 0.1},
            {"copies_by_line": [
                {"op": "aten::_to_copy", "lines": ["torch/nn/modules/linear.py(130): forward", "a.py(1): f", "b"],
                 "cuda_ms_per_step": 0.908, "calls_per_step": 263.0},
                {"op": "aten::clone", "lines": [], "cuda_ms_per_step": 0.01, "calls_per_step": 1.0},
            ]},
        ],
    }
    table = report.profile_table(data)
    assert "| `aten::_to_copy` | `torch/nn/modules/linear.py(130): forward` < `a.py(1): f` | 0.91 | 263 |" in table
    assert "| `aten::clone` | (no Python frame) | 0.01 | 1 |" in table
    assert table.index("aten::copy_") < table.index("aten::_to_copy")  # operators first, then the copies


def test_bench_stage_kernels_tiny_times_each_variant_and_the_outputs_agree(tmp_path):
    bench = load_script("benchmarks/bench_stage_kernels.py")
    out = tmp_path / "stage_kernels.json"
    data = bench.main(["--tiny", "--repeats", "1", "--rounds", "2", "--stages", "sr1", "--variants",
                       "fast,channels_last", "--out", str(out)])  # fmt: skip
    record = json.loads(out.read_text())["stages"]["sr1"]
    assert record == json.loads(json.dumps(data["stages"]["sr1"]))
    assert set(record) >= {"library", "fast", "channels_last"} and record["calls_per_video"] == 500
    for variant in ("fast", "channels_last"):  # the same function, run differently
        assert record[variant]["max_abs_diff_vs_library"] < 1e-4 * max(1.0, record[variant]["mean_abs_output"])
        assert record[variant]["seconds_per_call"] in record[variant]["seconds_per_call_rounds"]
        assert len(record[variant]["seconds_per_call_rounds"]) == 2  # timed in turn, twice
    assert "| sr1 | (2, 6, 3, 16, 16) | channels_last |" in load_script("benchmarks/report.py").stage_kernels_table(data)
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--variants", "turbo", "--out", str(out)])
    with pytest.raises(SystemExit):  # no CUDA graphs on the CPU
        bench.main(["--tiny", "--variants", "fast_graph", "--out", str(out)])


def test_bench_stage_kernels_variant_names_parse_into_kernels_norms_and_flags():
    parse = load_script("benchmarks/bench_stage_kernels.py").parse_variant
    assert parse("triton_attention_fused_norms_cl_graph") == ("triton_attention", "fused_norms", {"_cl", "_graph"})
    assert parse("fused_norms_nofold") == ("library", "fused_norms", {"_nofold"})
    assert parse("triton_attention_fused_norms_cl_nosum_graph") == ("triton_attention", "fused_norms",
                                                                    {"_cl", "_nosum", "_graph"})
    assert parse("math_attention") == ("math_attention", "", set())
    for bad in ("turbo", "compiled_cl", "triton_attention_fused"):
        with pytest.raises(ValueError, match="variant"):
            parse(bad)


def test_training_summary_gives_each_run_its_ratio_to_the_reference_loop(report):
    data = {
        "env": {"gpu": "GPU", "torch": "t", "diffusers": "d", "peft": "p", "commit": "abc", "date": "now"},
        "runs": {
            "baseline": {"s_per_step": 0.3, "projected_400_s": 120.0, "peak_gib": 18.0},
            "full": {"s_per_step": 0.1, "projected_400_s": 40.0, "measured_400_s": 41.0, "peak_gib": 10.0},
            "lora": {"error": "RuntimeError: out of memory"},
        },
    }
    rows = [line for line in report.training_summary(data).splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [
        "| reference loop (fp32 + fp16 autocast) | 120.0 s (projected) | 0.300 | 1.00x | 18.0 |",
        "| `train_motion`, full | 41.0 s (measured) | 0.100 | 3.00x | 10.0 |",
    ]
    # the full run's layout: as recorded; beside a channels-last run without a record, "defaults"
    data["runs"]["full_cl"] = {"s_per_step": 0.1, "projected_400_s": 40.0, "peak_gib": 10.0}
    assert "| `train_motion`, full (defaults) |" in report.training_summary(data)
    data["runs"]["full"]["memory_format_run"] = "channels_last"
    assert "| `train_motion`, full, channels-last |" in report.training_summary(data)
    # a measured run that records its one-off costs: the steps' time, and the one-off beside it
    data["runs"]["full"].update(measured_400_s_without_overhead=39.5, one_off_overhead_s=1.5)
    assert ("| `train_motion`, full, channels-last | 39.5 s (measured, + 1.5 s once: first-call compilation, "
            "warm-up, capture) | 0.100 | 3.00x | 10.0 |") in report.training_summary(data)


def test_environment_line_names_cudnn_timing_and_a_limit_other_than_pytorchs(report):
    env = {"gpu": "GPU", "torch": "t", "diffusers": "d", "peft": "p", "commit": "abc", "date": "now"}
    assert "cuDNN" not in report.environment_line({"env": env})
    assert report.environment_line({"env": {**env, "cudnn_benchmark": True}}).endswith(", cuDNN benchmark mode_")
    # results from before the limit was recorded, and PyTorch's default of 10, read the same
    assert report.environment_line({"env": {**env, "cudnn_benchmark": True, "cudnn_benchmark_limit": 10}}).endswith(
        ", cuDNN benchmark mode_")
    line = report.environment_line({"env": {**env, "cudnn_benchmark": True, "cudnn_benchmark_limit": 3}})
    assert line.endswith(", cuDNN benchmark mode (3 algorithms a shape)_")
    line = report.environment_line({"env": {**env, "cudnn_benchmark": True, "cudnn_benchmark_limit": 0}})
    assert line.endswith(", cuDNN benchmark mode (every algorithm a shape)_")
    line = report.environment_line({"env": {**env, "cudnn_benchmark": True, "cudnn_benchmark_limit": None}})
    assert line.endswith(", cuDNN benchmark mode_")  # a build without cuDNN reports no limit
    line = report.environment_line({"env": {**env, "cudnn_benchmark": True, "cudnn_benchmark_limit": 1}})
    assert line.endswith(", cuDNN benchmark mode (1 algorithm a shape)_")


def test_conv_timing_table_weighs_each_shapes_saving_against_its_timing_cost(report):
    env = {"gpu": "GPU", "torch": "t", "diffusers": "d", "peft": "p", "commit": "abc", "date": "now"}
    shape = {"kind": "fwd", "x": [8, 320, 40, 64], "w": [320, 320, 3, 3], "stride": [1, 1], "pad": [1, 1]}
    data = {"env": env, "timed_env": {**env, "cudnn_benchmark": True, "cudnn_benchmark_limit": 3}, "results": [
        # 10 calls a step, 0.01 ms saved each: 0.1 ms a step, 40 ms in 400 steps against 30 ms of timing
        {**shape, "count": 10, "call_ms": 0.07, "timed_call_ms": 0.06, "first_call_ms": 20.0,
         "timed_first_call_ms": 50.0},
        # saves 0.002 ms a step, 0.8 ms in 400 steps against 100 ms: does not pay
        {**shape, "kind": "dgrad", "count": 1, "call_ms": 0.052, "timed_call_ms": 0.05, "first_call_ms": 20.0,
         "timed_first_call_ms": 120.0},
        {**shape, "x": [1, 320, 8, 2560], "w": [320, 320, 3, 1, 1], "count": 20},  # temporal: not compared
    ]}  # fmt: skip
    lines = report.conv_timing_table(data).splitlines()
    assert lines[0].endswith("; timed in a second process, 3 algorithms a shape_")
    rows = [line for line in lines if line.startswith("| fwd") or line.startswith("| dgrad")]
    assert rows == [
        "| fwd | 8x320x40x64 | 320x320x3x3 | 10 | 0.0700 | 0.0600 | +0.1000 | 20.0 / 50.0 | 30.0 | yes |",
        "| dgrad | 8x320x40x64 | 320x320x3x3 | 1 | 0.0520 | 0.0500 | +0.0020 | 20.0 / 120.0 | 100.0 | no |",
    ]
    assert lines[-1] == "All shapes: +0.102 ms saved a step, 0.13 s more on their first calls (400 steps save +0.04 s)."


def test_cascade_table_shows_a_streamed_t5_without_an_offload_and_its_setup_apart(report):
    text = {"parameters_b": 4.76, "mode": "stream", "encode_seconds": 0.41, "offload_seconds": 0.0,
            "peak_gib": 1.02, "to_cpu_seconds": 8.1, "stream_setup_seconds": 8.2}
    table = report.cascade_tables({"env": {}, "text_encoder": text, "stages": {}})
    assert "| T5 XXL encode (4.76 B), streamed from the CPU block by block | – | 0.41 | 0.41 | – | 1.02 |" in table
    assert "moved to the CPU in 8.1 s" in table and "pinned in 8.2 s" in table


def test_bench_cascade_tiny_runs_the_pixel_stages_on_the_temporal_kernels_asked(tmp_path, capsys):
    bench = load_script("benchmarks/bench_cascade.py")
    data = bench.main(["--tiny", "--steps-scale", "0.02", "--no-warmup", "--temporal-kernels", "math_attention",
                       "--out", str(tmp_path / "c.json")])  # fmt: skip
    assert "error" not in data and data["settings"]["temporal_kernels"] == "math_attention"
    pixel_stages = {name: data["temporal_kernels"][name] for name in ("keyframes", "interpolation", "sr1")}
    assert pixel_stages == dict.fromkeys(pixel_stages, "math_attention")  # SR2 keeps its own choice
    assert json.loads((tmp_path / "c.json").read_text())["temporal_kernels"] == data["temporal_kernels"]
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--temporal-kernels", "cuda", "--out", str(tmp_path / "d.json")])
    assert "--temporal-kernels: invalid choice: 'cuda'" in capsys.readouterr().err


def test_activation_memory_counts_what_frozen_convolutions_no_longer_keep(report, tmp_path):
    bench = load_script("benchmarks/activation_memory.py")
    data = bench.main(["--frames", "2", "--height", "8", "--image-width", "8", "--out", str(tmp_path / "a.json")])
    full, lean = data["runs"]["autograd"], data["runs"]["input_grad_only"]
    assert full["by_module"]["Conv2d"] > 0 and "Conv2d" not in lean["by_module"]
    assert lean["total_bytes"] < full["total_bytes"] == sum(full["by_module"].values())
    assert json.loads((tmp_path / "a.json").read_text())["runs"] == data["runs"]
    recomputed = data["runs"]["input_grad_only+recompute"]
    assert "GEGLU" in lean["by_module"] and "GEGLU" not in recomputed["by_module"]
    assert lean["by_module"]["Dropout"] > 0 and "Dropout" not in recomputed["by_module"]  # bit masks: under Sequential
    assert recomputed["total_bytes"] < lean["total_bytes"]
    table = report.activation_memory_table(data)
    assert "| **total** |" in table and "`frozen_convs='input_grad_only'` + `frozen_activations='recompute'`" in table
    with pytest.raises(SystemExit, match="must keep whole heads"):
        bench.main(["--width", "0.3", "--out", str(tmp_path / "b.json")])


def test_top_cuda_events_rank_by_cuda_time_and_count_per_unit():
    """The profile ranking that bench_training's step profile and bench_stage_kernels' call profile share."""
    from types import SimpleNamespace

    def event(key, us, count, kind):
        return SimpleNamespace(key=key, device_time_total=us, count=count, device_type=SimpleNamespace(name=kind))

    events = [event("aten::conv2d", 600.0, 4, "CPU"), event("cudnn_kernel", 500.0, 4, "CUDA"),
              event("add_kernel", 100.0, 8, "CUDA"), event("aten::empty", 0.0, 10, "CPU")]  # fmt: skip
    top = load_script("benchmarks/bench_training.py").top_cuda_events(events, per=2, unit="call", rows=2)
    assert top["kernels_per_call"] == 6 and top["cuda_ms_per_call"] == 0.3  # kernels only: 600 us over 2 calls
    assert [r["name"] for r in top["rows"]] == ["aten::conv2d", "cudnn_kernel"]  # by time, operators included
    assert top["rows"][1] == {"name": "cudnn_kernel", "cuda_ms_per_call": 0.25, "calls_per_call": 2.0,
                              "share": 500 / 600}  # fmt: skip


def test_temporal_conv_table_names_a_default_tile_that_failed(report):
    row = {"name": "base 320", "shape": [1, 320, 8, 40, 64], "default_tile": [128, 128, 32, 8, 3],
           "cudnn_ms": {}, "tiles": [{"tile": [128, 128, 32, 8, 3], "error": "OutOfResources: shared memory"}]}
    table = report.temporal_conv_table({"env": {}, "rows": [row]})
    assert "| base 320 (1, 320, 8, 40, 64) | the default tile (128, 128, 32) failed |" in table


def test_fused_norm_layout_table_compares_the_channels_last_kernels(report):
    ms = {"fused_forward": 0.02, "fused_backward": 0.03, "fused_channels_last_forward": 0.01,
          "fused_channels_last_forward_tile_2048": 0.012, "fused_channels_last_forward_tile_8192": 0.011,
          "fused_channels_last_backward": 0.025, "fused_channels_last_backward_tile_2048": 0.026,
          "fused_channels_last_backward_tile_8192": 0.027, "fused_channels_last_backward_tile_2048_loop_4": 0.022}
    # fmt: skip
    row = {"name": "sr1 resnet", "shape": [16, 128, 160, 256], "ms": ms, "floor_ms": {"forward": 0.008,
           "backward": 0.02}, "relative_error_vs_float64": {"fused_forward": 1.7e-3,
                                                             "fused_channels_last_forward": 1.8e-3}}  # fmt: skip
    data = {"env": {"gpu": "GPU", "triton": "3", "commit": "abc", "date": "now"}, "dtype": "bfloat16",
            "rows": [row, {**row, "name": "older", "ms": {"fused_forward": 0.02}}]}  # fmt: skip
    lines = [line for line in report.fused_norm_layout_table(data).splitlines() if line.startswith("| sr1")]
    assert lines == ["| sr1 resnet (16, 128, 160, 256) | 0.0200 / 0.0100 (tile 2048: 0.0120; tile 8192: 0.0110) / "
                     "0.0080 | 0.0300 / 0.0250 (tile 2048: 0.0260; tile 8192: 0.0270; tile 2048 loop 4: 0.0220) / "
                     "0.0200 | 1.7e-03 / 1.8e-03 |"]  # fmt: skip
    assert "older" not in report.fused_norm_layout_table(data)  # rows measured before the kernels: left out


def test_frame_attention_table_compares_the_pairs_kernels_with_the_tile_kernels(report):
    ms = {"pairs_forward": 0.05, "pairs_backward": 0.15, "tile_forward": 0.4, "tile_backward": 0.8,
          "pairs_forward_backward": 0.2, "tile_forward_backward": 1.2}  # fmt: skip
    data = {
        "env": {"gpu": "GPU", "torch": "t", "triton": "3", "commit": "abc", "date": "now"},
        "dtype": "bfloat16", "copy_bandwidth_gb_s": 4000.0, "defaults": {"pairs_block": 64},
        "rows": [
            {"name": "base", "shape": [2560, 8, 320], "ms": ms, "floor_ms": {"forward": 0.013, "backward": 0.022},
             "relative_error_vs_float64": {"pairs": {"forward": 1e-3, "backward": 2e-3}, "tile": {"forward": 3e-3}}},
            {"name": "sr2", "shape": [5760, 29, 320], "ms": {"tile_forward": 0.3, "tile_backward": 0.6},
             "floor_ms": {"forward": 0.01, "backward": 0.02}, "relative_error_vs_float64": {"tile": {"forward": 1e-3}}},
        ],
    }  # fmt: skip
    lines = report.frame_attention_table(data).splitlines()
    assert lines[2] == "| shape (N, frames, channels) | `pairs` fwd / bwd | `tile` fwd / bwd | floor fwd / bwd | " \
                       "`pairs` against `tile` | largest error vs float64 |"
    assert lines[4] == "| base (2560, 8, 320) | 50 / 150 | 400 / 800 | 13 / 22 | 6.0x | 3.0e-03 |"
    assert lines[5] == "| sr2 (5760, 29, 320) | – | 300 / 600 | 10 / 20 | – | 1.0e-03 |"  # past 8 frames: tile only
    assert lines[0].endswith("run); `pairs` = 64 pairs a program, the default_")
    data["defaults"] = {"pairs_block": 64, "pairs_split": 4, "pairs_split_channels": 5, "short_kernel": "dots",
                        "dots_rows": 32, "dots_min_channels": 8}  # fmt: skip
    assert report.frame_attention_table(data).splitlines()[0].endswith(
        "run); `pairs`: 64 lanes a program, heads of at least 10 channels over up to 4 lanes a pair; the default: "
        "`dots` (32 rows a program) at heads of 8 channels or more, `pairs` below_")


def test_bench_conv_shapes_tiny_times_each_recorded_convolution(tmp_path):
    bench = load_script("benchmarks/bench_conv_shapes.py")
    out = tmp_path / "conv_shapes.json"
    data = bench.main(["--tiny", "--compare-timed", "--cudnn-benchmark-limit", "3", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(data["results"]))
    results = data["results"]
    kinds = {r["kind"] for r in results}
    assert kinds == {"fwd", "dgrad"} and all(r["count"] >= 1 and r["cudnn_ms"] > 0 for r in results)
    temporal = [r for r in results if len(r["w"]) == 5]
    assert temporal and all(r["frame_taps_ms"] > 0 and r["frame_taps_err"] < 3e-2 for r in temporal)
    assert all(r["rel_err"] < 2e-2 for r in results if r["rel_err"] is not None)  # the im2col product is the conv
    spatial = [r for r in results if len(r["w"]) == 4 and r["kind"] == "fwd"]
    assert all(r["frame_taps_ms"] is None for r in spatial)
    assert data["total_cudnn_ms"] == pytest.approx(sum(r["count"] * r["cudnn_ms"] for r in results))
    # --compare-timed: every spatial shape timed as training calls it, here and in a child with cuDNN's timing
    assert not data["env"]["cudnn_benchmark"]
    assert data["timed_env"]["cudnn_benchmark"] and data["timed_env"]["cudnn_benchmark_limit"] == 3
    compared = [r for r in results if "timed_call_ms" in r]
    on_cudnn = [r for r in results if len(r["w"]) == 4 and bench.runs_on_cudnn(
        (r["kind"], r["x"], r["w"], r["stride"], r["pad"], 1))]  # fmt: skip
    assert compared == on_cudnn and 0 < len(compared) < len([r for r in results if len(r["w"]) == 4])
    assert all(r[key] > 0 for r in compared
                            for key in ("first_call_ms", "call_ms", "timed_first_call_ms", "timed_call_ms"))
    assert not any("timed_call_ms" in r for r in temporal)
    assert data["total_timed_call_ms_a_step"] == pytest.approx(sum(r["count"] * r["timed_call_ms"] for r in compared))
    assert data["total_first_call_ms"] == pytest.approx(sum(r["first_call_ms"] for r in compared))


def test_precision_table_spans_the_draws_and_divides_by_the_dropout_noise(report):
    run = {"loss_difference": 0.001, "eps_relative_error": 0.02, "grad_relative_error": 0.3, "grad_cosine": 0.95}
    noise = {**run, "eps_relative_error": 0.6, "grad_relative_error": 1.5, "grad_cosine": 0.1}
    data = {"env": {"torch": "2.13.0+cpu", "commit": "abc", "date": "2026-12-05"},
            "settings": {"threads": 2, "model": "tiny", "frames": 8, "height": 16, "width": 16},
            "variants": {"float32": {}, "float32_other_dropout": {}, "bfloat16": {}},
            "draws": [{"t": 44, "runs": {"bfloat16": run, "float32_other_dropout": noise}},
                      {"t": 845, "runs": {"bfloat16": {**run, "grad_relative_error": 0.6},
                                          "float32_other_dropout": noise}}]}
    table = report.precision_table(data)
    assert "timesteps 44, 845" in table
    assert "| `bfloat16` | 0.0200 | 0.3000 to 0.6000 | 0.9500 | 1.0e-03 | 0.20 to 0.40 |" in table
    assert "| `float32_other_dropout` | 0.6000 | 1.5000 | 0.1000 | 1.0e-03 | – |" in table
