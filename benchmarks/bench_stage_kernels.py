"""Do the training step's temporal kernels also speed up the cascade's denoising calls? One UNet call per stage.

For each Show-1 stage UNet at its real size and batch (random weights, bf16, classifier-free guidance doubling the
batch), time one forward pass with the library's layers and inside `motion_adapters.training_step.temporal_kernels`
("math_attention": temporal attention on the math SDPA kernel; "fast": that plus the (3, 1, 1) temporal
convolutions as 2D convolutions; "triton_attention", "triton_conv" and "triton": the Triton kernels for temporal
attention, for the temporal convolutions, for both), with the fused norm kernels, with channels-last weights or
channels-last activations through the whole UNet, and through `torch.compile`, after warm-up, in the same
process, and check the outputs agree.

    python benchmarks/bench_stage_kernels.py --out benchmarks/results/stage_kernels_h100.json
    python benchmarks/bench_stage_kernels.py --tiny --out /tmp/stage_kernels.json  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import UNet3DConditionModel

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

from bench_training import GIB, cudnn_benchmark_option, environment, top_cuda_events, write  # noqa: E402

from motion_adapters import fused_norm, lean_backward, resample  # noqa: E402
from motion_adapters.layout import channels_last_sampling  # noqa: E402
from motion_adapters.lean_backward import fused_norm_activations  # noqa: E402
from motion_adapters.models import (  # noqa: E402
    Show1UNet3DConditionModel,
    show1_base_config,
    show1_interpolation_config,
    show1_sr1_config,
)
from motion_adapters.pipelines._graph import GraphedCall  # noqa: E402
from motion_adapters.training_step import temporal_kernels  # noqa: E402


def sr2_config() -> dict:
    """show-1-sr2's UNet (ZeroScope-like): diffusers' `UNet3DConditionModel` with its defaults (OpenCLIP-H text)."""
    return {"in_channels": 4, "cross_attention_dim": 1024}


#: stage -> (config factory, (frames, height, width), batch with guidance, calls a video makes: steps x windows);
#: SR2 denoises 29 latent frames of 40 x 72 for 40 steps (50 at strength 0.8)
STAGES = {
    "keyframes": (show1_base_config, (8, 40, 64), 2, 75),
    "interpolation": (show1_interpolation_config, (5, 40, 64), 14, 75),
    "sr1": (show1_sr1_config, (8, 160, 256), 2, 125 * 4),
    "sr2": (sr2_config, (29, 40, 72), 2, 40),
}
KERNELS = ("library", "math_attention", "fast", "triton_attention", "triton_conv", "triton")
#: other ways to run the same call: the library's layers with channels-last weights, or through torch.compile, or
#: with the group norm -> activation pairs on the fused Triton kernels (alone, or with math-kernel or Triton temporal
#: attention); "_cl": and with channels-last activations through the UNet (`layout.channels_last_sampling`);
#: "_nofold": the fused norms without the convolution biases folded into them (`lean_backward.FOLD_CONV_BIASES`)
OTHERS = ("channels_last", "compiled", "fused_norms", "math_attention_fused_norms", "triton_attention_fused_norms",
          "triton_conv_fused_norms", "triton_fused_norms", "fused_norms_cl", "math_attention_fused_norms_cl",
          "triton_attention_fused_norms_cl", "math_attention_fused_norms_nofold",
          "triton_attention_fused_norms_nofold")


#: Suffixes a variant may end with, after its kernels: "_fused_norms" (the fused norms), then any of "_cl"
#: (channels-last activations), "_nofold" (no folded biases), "_nosum" (the residual additions on PyTorch's
#: operators, not `fused_norm.residual_sum`'s kernel), "_noresample" (the ResNets' 2x resampling on PyTorch's
#: operators, not `motion_adapters.resample`'s kernels), "_graph" (the call replayed from a CUDA graph, as the
#: stage pipelines run it: `pipelines._graph.GraphedCall`)
FLAGS = ("_cl", "_nofold", "_nosum", "_noresample", "_graph")


def parse_variant(variant: str) -> tuple[str, str, set[str]]:
    """(temporal kernels, "fused_norms" or "", flags) of a variant name; raises ValueError for an unknown one.

    Example:
        >>> kernels, norms, flags = parse_variant("triton_attention_fused_norms_cl_graph")
        >>> kernels, norms, sorted(flags)
        ('triton_attention', 'fused_norms', ['_cl', '_graph'])
    """
    base, flags = variant, set()
    while any(base.endswith(flag) for flag in FLAGS):
        flag = next(flag for flag in FLAGS if base.endswith(flag))
        base, flags = base.removesuffix(flag), flags | {flag}
    norms = "fused_norms" if base == "fused_norms" or base.endswith("_fused_norms") else ""
    kernels = base.removesuffix("_fused_norms") if base != "fused_norms" else "library"
    if variant not in OTHERS and kernels not in KERNELS + ("channels_last", "compiled"):
        raise ValueError(f"unknown variant {variant!r}")
    if (flags or norms) and kernels in ("channels_last", "compiled"):
        raise ValueError(f"variant {variant!r}: {kernels} takes no suffix")
    return kernels, norms, flags


@contextmanager
def variant_kernels(unet: torch.nn.Module, variant: str) -> Iterator[None]:
    """Run `unet` the way `variant` names: temporal kernels, fused norms, channels-last, folding (see FLAGS)."""
    kernels, norms, flags = parse_variant(variant)
    lean_backward.FOLD_CONV_BIASES = "_nofold" not in flags
    fused_norm.RESIDUAL_SUM_KERNEL = "_nosum" not in flags
    resample.RESAMPLE_KERNEL = "_noresample" not in flags
    try:
        with temporal_kernels(unet, kernels if kernels in KERNELS else "library"), \
                fused_norm_activations(unet, norms == "fused_norms"), \
                channels_last_sampling(unet, "_cl" in flags):
            yield
    finally:
        lean_backward.FOLD_CONV_BIASES = fused_norm.RESIDUAL_SUM_KERNEL = resample.RESAMPLE_KERNEL = True


class GraphedUNet:
    """`unet(**inputs)` with its calls replayed from a CUDA graph, as the stage pipelines replay theirs."""

    def __init__(self, unet):
        self.call = GraphedCall(lambda sample, timestep, text, labels: unet(
            sample, timestep, encoder_hidden_states=text, class_labels=labels, return_dict=False)[0], strict=True)

    def __call__(self, sample, timestep, encoder_hidden_states, class_labels=None):
        return SimpleNamespace(sample=self.call(sample, timestep, encoder_hidden_states, class_labels))


def time_calls(unet, inputs, repeats: int, device, first: list | None = None) -> float:
    """Median seconds of one call, after two warm-up calls (the first call's seconds go into ``first``)."""
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            unet(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - began)
        elif i == 0 and first is not None:
            first.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def conv2d_format(unet: torch.nn.Module, memory_format: torch.memory_format) -> None:
    """Store every Conv2d weight in ``memory_format`` (the temporal Conv3d weights are 5D and stay as they are)."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.to(memory_format=memory_format)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stage_kernels_h100.json"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: a smoke test of the code")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--variants", default=",".join(KERNELS + OTHERS), help="comma-separated, of "
                        f"{KERNELS + OTHERS}; 'library' always runs (the baseline)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {tuple(STAGES)}")
    parser.add_argument("--profile", default=None, metavar="VARIANT",
                        help="also record the top CUDA operators of two calls of each stage with VARIANT")
    parser.add_argument("--rounds", type=int, default=1, help="time every variant this many times, in turn, and "
                        "report the median of the rounds' medians (the host drifts within a process: variants "
                        "timed later ran faster on the H200)")
    cudnn_benchmark_option(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = {"benchmark": "stage_kernels", "env": environment(device, args.commit), "dtype": str(dtype), "stages": {}}
    variants = ["library"] + [v for v in args.variants.split(",") if v != "library"]
    unknown = sorted(set(args.stages.split(",")) - set(STAGES))
    for variant in variants + ([args.profile] if args.profile else []):
        try:
            parse_variant(variant)
        except ValueError:
            unknown.append(variant)
    if args.profile in ("compiled", "channels_last") or (args.profile and "_graph" in parse_variant(args.profile)[2]):
        parser.error(f"--profile {args.profile} is not supported: profile a kernels or fused-norms variant.")
    if unknown:
        parser.error(f"unknown variants or stages {unknown}")
    if device.type != "cuda" and any("_graph" in parse_variant(v)[2] for v in variants):
        parser.error("'_graph' variants need a CUDA device.")
    for name in args.stages.split(","):
        make_config, (frames, height, width), batch, calls = STAGES[name]
        config = make_config()
        model_class = UNet3DConditionModel if name == "sr2" else Show1UNet3DConditionModel
        if args.tiny and name == "sr2":
            config.update(block_out_channels=[32] * 4, attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32)
            frames, height, width, batch = 3, 16, 16, 2
        elif args.tiny:
            config.update(block_out_channels=[32] * len(config["block_out_channels"]), attention_head_dim=16,
                          norm_num_groups=8, encoder_hid_dim=32, cross_attention_dim=32,
                          addition_embed_type_num_heads=2)  # fmt: skip
            frames, height, width, batch = 3, 16, 16, 2
        torch.manual_seed(0)
        unet = model_class(**config).to(device, dtype).eval()
        generator = torch.Generator(device).manual_seed(0)
        inputs = {
            "sample": torch.randn(batch, config["in_channels"], frames, height, width, generator=generator,
                                  device=device, dtype=dtype),
            "timestep": torch.full((batch,), 500, device=device),
            "encoder_hidden_states": torch.randn(batch, 77, config.get("encoder_hid_dim") or
                                                 config["cross_attention_dim"], generator=generator,
                                                 device=device, dtype=dtype),
        }  # fmt: skip
        if config.get("class_embed_type") == "timestep":
            inputs["class_labels"] = torch.full((batch,), 250, device=device)
        record = {"input": [batch, config["in_channels"], frames, height, width], "calls_per_video": calls}
        outputs, rounds = {}, {variant: [] for variant in variants}
        compiled = torch.compile(unet, dynamic=False) if "compiled" in variants else None
        for round_ in range(args.rounds):
            for variant in variants:
                first: list[float] = []
                if variant == "channels_last":
                    conv2d_format(unet, torch.channels_last)
                with variant_kernels(unet, variant):
                    model = compiled if variant == "compiled" else unet
                    if "_graph" in parse_variant(variant)[2]:
                        model = GraphedUNet(unet)
                    if device.type == "cuda" and round_ == 0:
                        torch.cuda.reset_peak_memory_stats(device)
                    rounds[variant].append(time_calls(model, inputs, args.repeats, device, first))
                    if round_ == 0:
                        with torch.no_grad():
                            outputs[variant] = model(**inputs).sample.float()
                        record[variant] = {"first_call_seconds": first[0]}
                        if device.type == "cuda":
                            record[variant]["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
                    model = None
                if variant == "channels_last":
                    conv2d_format(unet, torch.contiguous_format)
        for variant in variants:
            seconds = sorted(rounds[variant])[len(rounds[variant]) // 2]
            record[variant].update(seconds_per_call=seconds, seconds_per_video=seconds * calls,
                                   seconds_per_call_rounds=rounds[variant])  # fmt: skip
            diff = (outputs[variant] - outputs["library"]).abs()
            record[variant]["max_abs_diff_vs_library"] = diff.max().item()
            record[variant]["mean_abs_diff_vs_library"] = diff.mean().item()
            record[variant]["mean_abs_output"] = outputs["library"].abs().mean().item()
        for variant in variants:
            record[variant]["speedup_vs_library"] = record["library"]["seconds_per_call"] / \
                record[variant]["seconds_per_call"]
            print(name, variant, json.dumps(record[variant]), flush=True)
        data["stages"][name] = record
        if args.profile and device.type == "cuda":
            data.setdefault("profiles", {})[name] = {"variant": args.profile,
                                                     **profile_calls(unet, inputs, args.profile)}  # fmt: skip
        write(args.out, data)  # after every stage: a run cut off by a time limit keeps what it measured
        del unet, outputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write(args.out, data)
    return data


def profile_calls(unet, inputs, variant: str, calls: int = 2, rows: int = 30) -> dict:
    """The top CUDA operators and kernels of `calls` UNet calls with `variant` (where a stage's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with variant_kernels(unet, variant), torch.no_grad():
        unet(**inputs)  # warm: the first call's compilation and algorithm search stay out of the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                unet(**inputs)
            torch.cuda.synchronize()
    result = top_cuda_events(prof.key_averages(), per=calls, unit="call", rows=rows)
    for row in result["rows"][:15]:
        print(row, flush=True)
    return result


if __name__ == "__main__":
    main()
