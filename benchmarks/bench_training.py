"""How fast and lean is one VMC training run? The reference loop against `train_motion`, in one process.

Runs, on one GPU, with random weights of the real show-1-base architecture and the same seeds:

- `baseline`: the reference VMC step written out here (float32 weights, fp16 autocast, GradScaler, the released
  loss on the first 3 of 6 output channels, torch AdamW lr 1e-4 on the 132 temporal q/k/v weights, clipping at 1.0,
  batch 1, 8 frames at 40x64, uniform t, squaredcos_cap_v2 noise, random (1, 77, 4096) text embeddings).
- `baseline_rerun`: the same loop, same timesteps and noise, other dropout masks: the run-to-run noise scale.
- `full`, `lora`: `motion_adapters.train_motion` (bf16 frozen weights, fp32 masters, fused AdamW, compile and
  whole-step CUDA graph as configured), and variants without compile or without the graph.

For each: seconds per step (median after warm-up), projected and measured 400-step time, the one-off
compile/capture overhead, peak memory (`torch.cuda.max_memory_allocated`, reset per run), achieved TFLOP/s and
the fraction of the bf16 matmul rate measured in the same process (8192^3). Losses of every step are kept.

    python benchmarks/bench_training.py --out benchmarks/results/training_h100.json
    python benchmarks/bench_training.py --tiny --variants baseline,full_eager  # CPU smoke test of the code paths
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers import DDPMScheduler  # noqa: E402
from diffusers.models.resnet import TemporalConvLayer  # noqa: E402
from report import timing_pays  # noqa: E402

from motion_adapters import (  # noqa: E402
    frame_attention,
    fused_norm,
    im2col_conv,
    layout,
    lean_backward,
    training,
    training_step,
)
from motion_adapters.config import MEMORY_FORMATS, TEMPORAL_KERNELS, MotionDistillationConfig  # noqa: E402
from motion_adapters.models import Show1UNet3DConditionModel, show1_base_config  # noqa: E402
from motion_adapters.training import _temporal_kernels, train_motion  # noqa: E402

TEMPORAL_QKV = re.compile(r"temp_attentions\.\d+\.transformer_blocks\.0\.attn[12]\.to_[qkv]$")
TINY = dict(
    sample_size=16,
    down_block_types=["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D", "SimpleCrossAttnDownBlock3D"],
    up_block_types=["SimpleCrossAttnUpBlock3D", "SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    block_out_channels=[32, 64, 64],
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=64,
    encoder_hid_dim=64,
    attention_head_dim=64,
)
GIB = 2**30
#: The layer options as they were before `norm_dtype`, `frozen_convs` and `frozen_activations` (the earlier variants
#: keep measuring that).
EARLIER_LAYERS = {"norm_dtype": "float32", "frozen_convs": "autograd", "frozen_activations": "autograd"}
#: the overrides of `full` with the fastest temporal kernels: the variants that change module settings only
#: (`MODULE_SETTINGS`) run with these
AS_FULL = {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "best"}

#: name -> (description, train_motion overrides); "baseline*" runs are the reference loop.
VARIANTS = {
    "baseline": ("reference loop: fp32 weights, fp16 autocast, GradScaler, torch AdamW", None),
    "baseline_rerun": ("reference loop again, same draws, other dropout masks (noise scale)", None),
    "full_eager": ("train_motion full: bf16 frozen weights, fp32 masters, fused AdamW, fast temporal kernels; "
                   "no CUDA graph",
                   {"mode": "full", "cuda_graph": "no", "temporal_kernels": "best", **EARLIER_LAYERS}),
    "full_graph": ("train_motion full: bf16 frozen weights, fp32 masters, fused AdamW, whole-step CUDA graph; "
                   "library temporal kernels",
                   {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "library", **EARLIER_LAYERS}),
    "full_graph_math": ("as full_graph, temporal attention on the math SDPA kernel",
                        {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "math_attention", **EARLIER_LAYERS}),
    "full_graph_conv": ("as full_graph, temporal convolutions as Conv2d",
                        {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "conv2d", **EARLIER_LAYERS}),
    "full_graph_fast": ("as full_graph, both (temporal_kernels='fast')",
                        {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast", **EARLIER_LAYERS}),
    "full_graph_regional": ("as full_graph_fast, with every ResNet and temporal-convolution layer compiled on its own "
                            "(compile='regional')",
                            {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast", "compile": "regional",
                             **EARLIER_LAYERS}),
    "full_graph_norms": ("as full_graph_fast, group and layer norms in bf16 (norm_dtype='compute')",
                         {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast", "norm_dtype": "compute",
                          "frozen_convs": "autograd", "frozen_activations": "autograd"}),
    "full_graph_convs": ("as full_graph_norms, frozen convolutions keep no input (frozen_convs='input_grad_only')",
                         {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast", "norm_dtype": "compute",
                          "frozen_convs": "input_grad_only", "frozen_activations": "autograd"}),
    "full_graph_recompute": ("as full_graph_convs, frozen norm -> activation pairs and GEGLU feed-forwards keep "
                             "only their inputs, dropout masks as bits (frozen_activations='recompute')",
                             {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast", "norm_dtype": "compute",
                              "frozen_convs": "input_grad_only", "frozen_activations": "recompute",
                              "norm_kernels": "torch"}),
    "full_graph_triton": ("as full_graph_recompute, the recomputed norm -> activation pairs on fused Triton kernels "
                          "(norm_kernels='triton')",
                          {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast", "norm_dtype": "compute",
                           "frozen_convs": "input_grad_only", "frozen_activations": "recompute",
                           "norm_kernels": "triton"}),
    "full": ("train_motion full, 400 steps, the defaults: bf16 frozen weights and norms, frozen convolutions "
             "keeping no input, frozen activations recomputed on fused Triton norm kernels, fp32 masters, fused "
             "AdamW, whole-step CUDA graph, the default temporal kernels (temporal_kernels='auto') and memory "
             "format (memory_format='auto')",
             AS_FULL),
    "full_cudnn_benchmark": ("as full, cudnn_benchmark=True (cuDNN times its convolution algorithms; in a process "
                             "of its own, as PyTorch's cache of the choices does not tell the two settings apart)",
                             {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "best",
                              "cudnn_benchmark": True}),
    "lora": ("train_motion LoRA r=16: as full", {"mode": "lora", "cuda_graph": "yes", "temporal_kernels": "best"}),
    "full_contiguous": ("as full, memory_format='contiguous' (the default before the channels-last layout)",
                        {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "best",
                         "memory_format": "contiguous"}),
    "full_fast": ("as full, temporal_kernels='fast' (math-kernel SDPA temporal attention, the default before "
                  "the Triton frame-attention kernels)",
                  {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "fast"}),
    "lora_fast": ("as lora, temporal_kernels='fast'",
                  {"mode": "lora", "cuda_graph": "yes", "temporal_kernels": "fast"}),
    "full_triton": ("as full, temporal_kernels='triton' (the (3, 1, 1) temporal convolutions on the Triton kernel "
                    "of motion_adapters.temporal_conv, temporal attention on the Triton frame-attention kernels)",
                    {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "triton"}),
    "lora_triton": ("as lora, temporal_kernels='triton'", {"mode": "lora", "cuda_graph": "yes",
                                                          "temporal_kernels": "triton"}),
    "full_cl": ("as full, memory_format='channels_last' (activations NHWC through the UNet: frozen convolution "
                "weights channels-last, the group norms on the channels-last Triton kernels; the default since "
                "training_cl_h200.json)",
                {"mode": "full", "cuda_graph": "yes", "temporal_kernels": "best", "memory_format": "channels_last"}),
    "lora_cl": ("as lora, memory_format='channels_last'",
                {"mode": "lora", "cuda_graph": "yes", "temporal_kernels": "best", "memory_format": "channels_last"}),
    "full_tile_attention": ("as full, temporal attention on the frame-attention 'tile' kernels (the kernels before "
                            "the 'pairs' kernels, frame_attention_h200.json)",
                            AS_FULL),
    "full_unpacked_dropout": ("as full, dropout's backward pass unpacking its bit mask and running PyTorch's "
                              "native_dropout_backward (before fused_norm.bit_masked_scale)",
                              AS_FULL),
    "full_fp32_upsampling": ("as full, the ResNets' nearest upsampling in float32 under CUDA's autocast (the default "
                             "before lean_backward.UPSAMPLE_IN_INPUT_DTYPE: the block's output, the next skip "
                             "concatenation and ResNet then float32)",
                             AS_FULL),
    "full_frames_last_tokens": ("as full, the temporal transformers on frames-last sequences as diffusers has them "
                                "(the default before layout.TOKEN_ROWS: copies into the sequences and back)",
                                AS_FULL),
    "full_cudnn_frame_convs": ("as full, the frozen temporal convolutions on cuDNN's (3, 1) convolution (the default "
                               "before lean_backward.FRAME_CONV_GEMMS: one GEMM per tap over row-shifted views of "
                               "the channels-last frames)",
                               AS_FULL),
    "full_cudnn_pointwise_convs": ("as full, the frozen 1 x 1 convolutions (the ResNets' shortcuts) on cuDNN (the "
                                   "default before lean_backward.POINTWISE_CONV_GEMMS: their input gradients came "
                                   "NCHW and sent NCHW gradients up the UNet)",
                                   AS_FULL),
    "full_expanded_placeholder": ("as full, the frozen convolutions' backward passing cuDNN an expanded one-element "
                                  "stand-in for the input, which it copied twice into the weight's dtype and layout "
                                  "(the default before lean_backward.TYPED_CONV_PLACEHOLDER)",
                                  AS_FULL),
    "full_unfused_geglu": ("as full, the temporal transformers' GELU-gated products and their gradients on PyTorch's "
                           "operators (the default before lean_backward.GEGLU_KERNELS: five element-wise passes and "
                           "a concatenation where the kernels make two passes)",
                           AS_FULL),
    "full_recomputed_geglu": ("as full, every GEGLU projection recomputed in the backward pass (the default before "
                              "lean_backward.GEGLU_KEEP_PROJECTION_BYTES kept those of at most 64 MiB)",
                              AS_FULL),
    "full_separate_qkv": ("as full, the temporal self-attention's q, k and v projected by three linear layers (the "
                          "default before layout.FUSED_QKV: three GEMMs each way, the input's three gradients "
                          "added, each weight cast on its own)",
                          AS_FULL),
    "full_unsplit_attention": ("as full, every temporal-attention pair on one thread of the 'pairs' kernels (the "
                               "default before frame_attention.PAIRS_SPLIT split heads of 10 and 20 channels over "
                               "2 and 4 lanes)",
                               AS_FULL),
    "full_cast_weight_grads": ("as full, the stacked q/k/v weight gradient rounded to bf16 by its GEMM and cast to "
                               "float32 in a pass of its own (the default before "
                               "frame_attention.WEIGHT_GRAD_OUT_DTYPE)",
                               AS_FULL),
    "full_split_3": ("as full, frame_attention.PAIRS_SPLIT_CHANNELS = 3: heads of 5 channels over 2 lanes (3 and 2 "
                     "channels) and heads of 10 over 4 (3, 3, 3 and 1), heads of 20 over 4 as by default",
                     AS_FULL),
    "full_unstacked_joint_qkv": ("as full, the spatial joint attention on diffusers' AttnAddedKVProcessor2_0 "
                                 "(training_step.STACKED_JOINT_QKV off: three frozen pixel projections each way)",
                                 AS_FULL),
    "full_stacked_joint_qkv": ("as full, the spatial joint attention's frozen pixel q/k/v as one GEMM each way "
                               "(training_step.STACKED_JOINT_QKV on)",
                               AS_FULL),
    "full_rolled_attention": ("as full, the 'pairs' kernels' loops over a lane's channels rolled (the default "
                              "before frame_attention.PAIRS_UNROLL unrolled them)",
                              AS_FULL),
    "full_unfolded_norms": ("as full, every channels-last norm's group statistics combined in launches of their "
                            "own (fused_norm.CL_FOLD_MAX_K = 0; the default again since training_unroll_final_h200)",
                            AS_FULL),
    "full_folded_norms": ("as full, the lower levels' channels-last group statistics combined in the element-wise "
                          "kernels (fused_norm.CL_FOLD_MAX_K = 128)",
                          AS_FULL),
    "full_unfolded_biases": ("as full, the ResNets' frozen convolution biases and time embeddings added in passes "
                             "of their own, the residual added and scaled by PyTorch's operators (the default "
                             "before lean_backward.FOLD_CONV_BIASES_TRAINING)",
                             AS_FULL),
    "full_separate_clip": ("as full, the gradients clipped by clip_grad_norm_ in a pass of their own before AdamW "
                           "(the default before training_step.CLIP_IN_OPTIMIZER)",
                           AS_FULL),
    "full_cudnn_small_convs": ("as full, the frozen 3 x 3 convolutions of at most 512 pixels a call on cuDNN "
                               "(the default before im2col_conv.IM2COL_CONVS)",
                               AS_FULL),
    "full_im2col_1280": ("as full, the frozen 3 x 3 convolutions of up to 1,280 pixels a call (the 10 x 16 level too) "
                         "as a gather and a GEMM (im2col_conv.MAX_ROWS = 1280)",
                         AS_FULL),
    "full_flash_joint": ("as full, the spatial attention on PyTorch's flash-attention kernels (training_step."
                         "JOINT_SDPA_BACKEND = 'flash'; PyTorch picks cuDNN's)",
                         AS_FULL),
    "full_efficient_joint": ("as full, the spatial attention on PyTorch's memory-efficient kernels (training_step."
                             "JOINT_SDPA_BACKEND = 'efficient')",
                             AS_FULL),
    "full_head_joined_kv": ("as full, the spatial attention's text and pixel keys and values joined per head, "
                            "(B, heads, T + N, d) contiguous, q a view of its projection (the default before "
                            "training_step.JOINT_KV_TOKEN_ROWS)",
                            AS_FULL),
    "full_warmup_3": ("as full, three eager warm-up steps before the CUDA graph is captured (the default before: "
                      "training_step.GRAPH_WARMUP_STEPS = 3)",
                      AS_FULL),
    "full_draws_between_steps": ("as full, each step's timestep and noise drawn between steps, the GPU idle, "
                                 "instead of during the step before (training.DRAW_AHEAD off)",
                                 AS_FULL),
    "full_joint_head_copies": ("as full, the spatial attention's q, k and v split into heads by diffusers' "
                               "head_to_batch_dim (the default before training_step.JOINT_HEAD_VIEWS)",
                               AS_FULL),
    "full_memo_text_kv": ("as full, the spatial attention's text keys and values computed once for the run "
                          "(training_step.MEMO_TEXT_KV on)",
                          AS_FULL),
    "full_text_kv_each_step": ("as full, the spatial attention's text keys and values computed at every step "
                               "(training_step.MEMO_TEXT_KV off)",
                               AS_FULL),
    "full_no_pdl": ("as full, the Triton kernels launched in turn, each after the one before has finished (the "
                    "default before fused_norm.PDL: programmatic dependent launches)",
                    AS_FULL),
    "full_torch_pack_bits": ("as full, dropout's mask packed into bits by PyTorch's multiply, shift and cast over an "
                             "int64 view (the default before lean_backward.PACK_BITS_KERNEL)",
                             AS_FULL),
    "full_torch_layer_norms": ("as full, the temporal transformers' residual additions and layer norms on PyTorch's "
                               "operators (the default before lean_backward.FUSED_LAYER_NORMS)",
                               AS_FULL),
    "full_prefix_in_step": ("as full, each step computing its own frozen prefix (the layers before the first "
                            "temporal attention) in turn (the default before training_step.OVERLAP_FROZEN_PREFIX: "
                            "the next step's prefix beside the backward pass)",
                            AS_FULL),
    "full_dv_first": ("as full, the frame attention's backward kernel writing dv in its first loop, beside the "
                      "probabilities' gradient (frame_attention.PAIRS_DV = 'first')",
                      AS_FULL),
    "full_dv_last": ("as full, the frame attention's backward kernel loading the output gradient's channel for dv "
                     "after writing dq and dk (frame_attention.PAIRS_DV = 'last')",
                     AS_FULL),
    "full_int32_attention": ("as full, the frame attention's kernels on 32-bit offsets "
                             "(frame_attention.PAIRS_INT32_OFFSETS)",
                             AS_FULL),
    "full_rolled_int32_attention": ("as full, the 'pairs' kernels' loops rolled (frame_attention.PAIRS_UNROLL = 1) "
                                    "and on 32-bit offsets, dv written in the first loop",
                                    AS_FULL),
    "full_dots_attention": ("as full, the frame attention on the 'dots' kernels: a block of 8 pairs a program as "
                            "one block-diagonal attention of 64 rows on tensor cores (frame_attention.SHORT_KERNEL)",
                            AS_FULL),
    "full_dots32_attention": ("as full_dots_attention, 4 pairs (32 rows, 2 warps) a program "
                              "(frame_attention.DOTS_ROWS = 32)",
                              AS_FULL),
    "full_dots32_wide_attention": ("as full_dots32_attention, heads of 8 channels or more only, the narrower ones "
                                   "(show-1-base's 40 x 64 level) left on 'pairs' (frame_attention.DOTS_MIN_CHANNELS)",
                                   AS_FULL),
    "full_pairs_attention": ("as full, the frame attention on the 'pairs' kernels at every head width "
                             "(frame_attention.SHORT_KERNEL = 'pairs'; the default before the 'dots' kernels)",
                             AS_FULL),
    "full_dots_half_p_attention": ("as full_dots_attention, the probabilities and their gradients rounded to bf16 "
                                   "for their products (frame_attention.DOTS_HALF_PROBABILITIES)",
                                   AS_FULL),
    "full_cl_min_programs_132": ("as full, channels-last norms whose statistics kernel would run fewer than 132 "
                                 "programs taking one tile a program, then smaller tiles "
                                 "(fused_norm.CL_MIN_PROGRAMS = 132)",
                                 AS_FULL),
    "full_cl_min_programs_264": ("as full_cl_min_programs_132, with 264 (fused_norm.CL_MIN_PROGRAMS = 264)",
                                 AS_FULL),
    "full_cl132_dv_first": ("as full, full_cl_min_programs_132 and full_dv_first together", AS_FULL),
    "full_skip_grads": ("as full, each ResNet's and temporal convolution layer's residual gradient added inside "
                        "the input-gradient kernel of the norm that starts its branch, not by autograd in a pass "
                        "of its own (lean_backward.SKIP_GRADS_IN_NORMS)", AS_FULL),
    "full_padded_heads": ("as full, the frame attention's heads narrower than 8 channels on the 'pairs' kernels "
                          "(show-1-base's 40 x 64 level, heads of 5) padded to 8 in the q/k/v projection, so the "
                          "kernels load and store a pair's frame as one 16-byte access "
                          "(frame_attention.PAIRS_PADDED_HEADS)", AS_FULL),
    "full_skip_grads_padded_heads": ("as full, full_skip_grads and full_padded_heads together", AS_FULL),
    "full_folded_taps_320": ("as full, the temporal convolutions of at most 320 rows (the 5 x 8 level) as one GEMM "
                             "of the rows by all three taps and one fold, not three GEMMs in turn "
                             "(lean_backward.FRAME_TAPS_FOLDED_MAX_ROWS = 320)", AS_FULL),
    "full_folded_taps_1280": ("as full_folded_taps_320, up to 1,280 rows (the 5 x 8 and 10 x 16 levels)", AS_FULL),
    "full_overlap_optimizer": ("as full, each step's AdamW update applied at the next step's start on a side stream "
                               "beside its forward pass, each attention layer waiting for its own weights "
                               "(training_step.OVERLAP_OPTIMIZER)", AS_FULL),
    "full_overlap_recompute_qkv": ("as full_overlap_optimizer, the q/k/v projections computed again in the backward "
                                   "pass instead of kept, for the memory the gradient buffers take "
                                   "(frame_attention.RECOMPUTE_PROJECTION)", AS_FULL),
    "full_all_untimed": ("as full, full_skip_padded_folded and full_overlap_optimizer together", AS_FULL),
    "full_skip_padded_folded": ("as full, full_skip_grads, full_padded_heads and full_folded_taps_320 together",
                                AS_FULL),
    "full_timed_convs": ("as full, cuDNN timing its algorithms for the convolutions whose saving in --other-steps "
                         "steps exceeds the timing's cost in --timed-conv-shapes (lean_backward.TIMED_CONV_SHAPES); "
                         "the first bf16 run of its process, so no choice is cached before it", AS_FULL),
    "full_cl_min_programs_0": ("as full, the channels-last norms' statistics kernels on CL_LOOP tiles a program "
                               "however few programs that makes (fused_norm.CL_MIN_PROGRAMS = 0; the default before "
                               "132)",
                               AS_FULL),
    "full_cublaslt": ("as full, PyTorch's matrix products through cuBLASLt "
                      "(torch.backends.cuda.preferred_blas_library('cublaslt'); PyTorch's default is cuBLAS)",
                      AS_FULL),
    "full_regional": ("as full, every ResNet and temporal-convolution layer compiled on its own (compile='regional'; "
                      "its fusions around the fused norms and the custom convolutions' autograd functions)",
                      {**AS_FULL, "compile": "regional"}),
    "full_compile": ("train_motion full: + torch.compile (default mode)",
                     {"mode": "full", "compile": "default", "cuda_graph": "yes", "temporal_kernels": "best"}),
    "full_budget": ("train_motion full: compile + graph, activation_memory_budget 0.5",
                    {"mode": "full", "compile": "default", "cuda_graph": "yes", "activation_memory_budget": 0.5,
                     "temporal_kernels": "best"}),
}


def git_commit(repo: Path) -> str | None:
    """The checked-out commit, from git or from .git/HEAD when git is not installed."""
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=repo, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        head = repo / ".git" / "HEAD"
        if not head.is_file():
            return None
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            target = repo / ".git" / ref[5:]
            return target.read_text().strip() if target.is_file() else None
        return ref


class _CudnnBenchmark(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        torch.backends.cudnn.benchmark = True
        setattr(namespace, self.dest, True)


def _benchmark_limit(text: str) -> int:
    """Parse `--cudnn-benchmark-limit` and set `torch.backends.cudnn.benchmark_limit` for the process."""
    limit = int(text)
    if limit < 0:
        raise argparse.ArgumentTypeError(f"--cudnn-benchmark-limit {limit}: give 0 (time every algorithm) or more")
    torch.backends.cudnn.benchmark_limit = limit
    return limit


def cudnn_benchmark_option(parser: argparse.ArgumentParser) -> None:
    """`--cudnn-benchmark`: cuDNN times its algorithms for each convolution shape (recorded in the JSON's env).

    Parsing the flag sets `torch.backends.cudnn.benchmark` for the process.
    """
    parser.add_argument("--cudnn-benchmark", action=_CudnnBenchmark, nargs=0, default=False,
                        help="set torch.backends.cudnn.benchmark: cuDNN picks each convolution's algorithm by "
                             "timing the candidates at its first call, instead of by its heuristics")
    parser.add_argument("--cudnn-benchmark-limit", type=_benchmark_limit, default=None, metavar="N",
                        help="set torch.backends.cudnn.benchmark_limit: how many algorithms cuDNN times for each "
                             "shape with --cudnn-benchmark (0: all; PyTorch's default 10)")


def environment(device: torch.device, commit: str | None) -> dict:
    import diffusers
    import peft

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or git_commit(Path(__file__).resolve().parents[1]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_benchmark_limit": torch.backends.cudnn.benchmark_limit,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)
    return env


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float | None:
    """Measured bf16 matmul rate (median of `repeats` timed n^3 products after 3 warm-ups), TFLOP/s."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n**3 / statistics.median(times) / 1e12


def step_flops(unet_config: dict, frames: int, height: int, width: int, text_len: int) -> dict:
    """FLOPs of one training step, counted on the meta device: forward, and backward to the trainable q/k/v."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = Show1UNet3DConditionModel(**unet_config)
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if TEMPORAL_QKV.search(name):
            module.weight.requires_grad_(True)
    unet.train()
    x = torch.randn(1, unet_config["in_channels"], frames, height, width, device="meta")
    text = torch.randn(1, text_len, unet_config["encoder_hid_dim"], device="meta")
    with FlopCounterMode(display=False) as forward:
        out = unet(x, torch.tensor([500], device="meta"), text).sample
    with FlopCounterMode(display=False) as backward:
        out[:, :3].float().abs().mean().backward()
    return {"forward": forward.get_total_flops(), "backward": backward.get_total_flops(),
            "step": forward.get_total_flops() + backward.get_total_flops()}


def sdpa_backends(unet_config: dict, frames: int, height: int, width: int, text_len: int, device) -> dict:
    """Which fused SDPA kernel PyTorch picks for each attention shape of the UNet (bf16)."""
    if device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend

    names = {int(getattr(SDPBackend, n)): n for n in dir(SDPBackend) if n.isupper()}
    heads_t = unet_config["attention_head_dim"]
    out = {}
    channels = unet_config["block_out_channels"]
    for level, c in enumerate(channels):
        pixels = (height >> level) * (width >> level)
        shapes = {
            "temporal": (pixels, heads_t, frames, c // heads_t),
            "spatial_joint": (frames, c // 64, pixels + text_len, 64),
        }
        for kind, shape in shapes.items():
            q = torch.randn(*shape, device=device, dtype=torch.bfloat16)
            out[f"level{level}_{kind}_{'x'.join(map(str, shape))}"] = names.get(int(torch._fused_sdp_choice(q, q, q)))
    return out


def build_unet(unet_config: dict, seed: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights, the same for a seed, built directly on the device (fast for 1.7 B parameters).

    The temporal convolutions' last layer, zero-initialised by the constructor, gets default random weights as a
    trained checkpoint has non-zero ones: otherwise the temporal convolutions (and their dropout) do nothing.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        unet = Show1UNet3DConditionModel(**unet_config)
        for module in unet.modules():
            if isinstance(module, TemporalConvLayer):
                module.conv4[-1].reset_parameters()
    return unet.to(dtype)


def inputs(frames: int, height: int, width: int, text_len: int, text_dim: int, device: torch.device):
    """A square moving right over 8 frames in [-1, 1], and random T5-sized text embeddings."""
    video = -torch.ones(1, 3, frames, height, width)
    side = max(2, height // 4)
    for f in range(frames):
        left = (f * width // (2 * frames)) % max(1, width - side)
        video[:, :, f, height // 3 : height // 3 + side, left : left + side] = 1.0
    embeds = torch.randn(1, text_len, text_dim, generator=torch.Generator().manual_seed(1234))
    return video.to(device), embeds.to(device)


def temporal_qkv_trainable(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze `unet` but for its temporal attention's q/k/v weights (VMC's trained parameters); return those."""
    unet.requires_grad_(False)
    params = []
    for name, module in unet.named_modules():
        if TEMPORAL_QKV.search(name):
            module.weight.requires_grad_(True)
            params.append(module.weight)
    return params


def draw(scheduler, shape: tuple, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s timestep and noise for `seed`: the draws `train_motion` makes, on the CPU."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
    return t, torch.randn(shape, generator=generator, dtype=torch.float32)


def released_loss(eps_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The released code's loss: 1 - cosine of consecutive frames' absolute noise differences, predicted and true."""
    d_pred = (eps_pred[:, :, 1:] - eps_pred[:, :, :-1]).abs()
    d_true = (noise[:, :, 1:] - noise[:, :, :-1]).abs()
    return 1 - F.cosine_similarity(d_pred, d_true, dim=2).mean()


def reference_loop(unet, video, embeds, scheduler, steps: int, seed: int, device, timer) -> list[float]:
    """The reference VMC training loop, as the released code runs it (fp32 weights, fp16 autocast, GradScaler)."""
    params = temporal_qkv_trainable(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    unet.train()
    losses = []
    for step in range(steps):
        timer.tick()
        t, noise = draw(scheduler, video.shape, seed, step)  # the same draws as train_motion
        t, noise = t.to(device), noise.to(device)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        noisy = abar.sqrt() * video + (1 - abar).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            out = unet(noisy, t, encoder_hidden_states=embeds).sample
        loss = released_loss(out[:, :3].float(), noise)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        timer.tock()
    return losses


class Timer:
    """Wall time of each step; each step ends with a host read of the loss, so it is synchronised."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t = 0.0

    def tick(self):
        self._t = time.perf_counter()

    def tock(self):
        self.seconds.append(time.perf_counter() - self._t)


def summarize(seconds: list[float], warmup: int, flops: float, peak_tflops: float | None, total_steps=400) -> dict:
    timed = seconds[warmup:] or seconds
    median = statistics.median(timed)
    overhead = max(0.0, sum(seconds[:warmup]) - warmup * median)
    out = {
        "steps": len(seconds),
        "warmup_steps": warmup,
        "s_per_step": median,
        "s_per_step_p10": sorted(timed)[len(timed) // 10],
        "s_per_step_p90": sorted(timed)[(len(timed) * 9) // 10],
        "projected_400_s": total_steps * median,
        "measured_s": sum(seconds),
        "one_off_overhead_s": overhead,
        "tflops_achieved": flops / median / 1e12,
    }
    if len(seconds) >= total_steps:
        out["measured_400_s"] = sum(seconds[:total_steps])
        out["measured_400_s_without_overhead"] = sum(seconds[:total_steps]) - overhead
    if peak_tflops:
        out["fraction_of_matmul_peak"] = flops / median / 1e12 / peak_tflops
    return out


def loss_agreement(runs: dict, window: int = 25) -> dict:
    """Same-seed agreement of loss trajectories, against the baseline's own run-to-run noise.

    "Within noise" means: the mean absolute per-step difference between `full` and `baseline` (same timesteps
    and noise, other kernels and dropout masks) is not larger than the one between `baseline` and
    `baseline_rerun` (same code, other dropout masks) by more than a factor 1.5, and the window means differ by
    less than 2 standard errors of the baseline's per-step differences over a window.
    """
    base = runs.get("baseline", {}).get("losses")
    if not base:
        return {}
    out = {"window": window}
    rerun = runs.get("baseline_rerun", {}).get("losses")
    n_noise = None
    if rerun:
        n = min(len(base), len(rerun))
        diffs = [a - b for a, b in zip(base[:n], rerun[:n])]
        n_noise = statistics.mean(abs(d) for d in diffs)
        out["baseline_vs_rerun_mean_abs_diff"] = n_noise
        out["baseline_vs_rerun_diff_std"] = statistics.pstdev(diffs)
    for name in [n for n in runs if not n.startswith(("baseline", "lora"))]:
        ours = runs.get(name, {}).get("losses")
        if not ours:
            continue
        n = min(len(base), len(ours))
        diffs = [a - b for a, b in zip(ours[:n], base[:n])]
        entry = {
            "steps_compared": n,
            "mean_abs_diff": statistics.mean(abs(d) for d in diffs),
            "mean_diff": statistics.mean(diffs),
            "window_means_ours": [statistics.mean(ours[i : i + window]) for i in range(0, n - window + 1, window)],
            "window_means_baseline": [statistics.mean(base[i : i + window]) for i in range(0, n - window + 1, window)],
        }
        if n_noise:
            entry["ratio_to_noise"] = entry["mean_abs_diff"] / n_noise
            se = out["baseline_vs_rerun_diff_std"] / window**0.5
            worst = max((abs(a - b) for a, b in zip(entry["window_means_ours"], entry["window_means_baseline"])),
                        default=0.0)
            entry["worst_window_mean_diff"] = worst
            entry["within_noise"] = entry["ratio_to_noise"] <= 1.5 and worst <= 2 * se + 1e-12
        out[name] = entry
    return out


def paying_conv_shapes(path: Path, steps: int) -> frozenset:
    """The (kind, input shape, weight shape) of a `--compare-timed` result whose timing pays within `steps` steps."""
    data = json.loads(path.read_text())
    if not data.get("timed_env"):
        raise SystemExit(f"--timed-conv-shapes {path}: not a `bench_conv_shapes.py --compare-timed` result")
    return frozenset((r["kind"], tuple(r["x"]), tuple(r["w"])) for r in data["results"]
                     if "timed_call_ms" in r and timing_pays(r, steps))


#: variant -> module constants it runs with (restored afterwards): kernel choices that are not configuration
MODULE_SETTINGS = {"full_tile_attention": [(frame_attention, "PAIRS_FRAMES", 0)],
                   "full_unpacked_dropout": [(lean_backward, "DROPOUT_BACKWARD_KERNEL", False)],
                   "full_fp32_upsampling": [(lean_backward, "UPSAMPLE_IN_INPUT_DTYPE", False)],
                   "full_frames_last_tokens": [(layout, "TOKEN_ROWS", False)],
                   "full_cudnn_frame_convs": [(lean_backward, "FRAME_CONV_GEMMS", False)],
                   "full_cudnn_pointwise_convs": [(lean_backward, "POINTWISE_CONV_GEMMS", False)],
                   "full_expanded_placeholder": [(lean_backward, "TYPED_CONV_PLACEHOLDER", False)],
                   "full_unfused_geglu": [(lean_backward, "GEGLU_KERNELS", False)],
                   "full_recomputed_geglu": [(lean_backward, "GEGLU_KEEP_PROJECTION_BYTES", 0)],
                   "full_separate_qkv": [(layout, "FUSED_QKV", False)],
                   "full_unsplit_attention": [(frame_attention, "PAIRS_SPLIT", 1)],
                   "full_cast_weight_grads": [(frame_attention, "WEIGHT_GRAD_OUT_DTYPE", False)],
                   "full_split_3": [(frame_attention, "PAIRS_SPLIT_CHANNELS", 3)],
                   "full_unstacked_joint_qkv": [(training_step, "STACKED_JOINT_QKV", False)],
                   "full_stacked_joint_qkv": [(training_step, "STACKED_JOINT_QKV", True)],
                   "full_rolled_attention": [(frame_attention, "PAIRS_UNROLL", 1)],
                   "full_unfolded_norms": [(fused_norm, "CL_FOLD_MAX_K", 0)],
                   "full_folded_norms": [(fused_norm, "CL_FOLD_MAX_K", 128)],
                   "full_unfolded_biases": [(lean_backward, "FOLD_CONV_BIASES_TRAINING", False)],
                   "full_separate_clip": [(training_step, "CLIP_IN_OPTIMIZER", False)],
                   "full_joint_head_copies": [(training_step, "JOINT_HEAD_VIEWS", False)],
                   "full_cudnn_small_convs": [(im2col_conv, "IM2COL_CONVS", False)],
                   "full_im2col_1280": [(im2col_conv, "MAX_ROWS", 1280)],
                   "full_flash_joint": [(training_step, "JOINT_SDPA_BACKEND", "flash")],
                   "full_efficient_joint": [(training_step, "JOINT_SDPA_BACKEND", "efficient")],
                   "full_head_joined_kv": [(training_step, "JOINT_KV_TOKEN_ROWS", False)],
                   "full_warmup_3": [(training_step, "GRAPH_WARMUP_STEPS", 3)],
                   "full_draws_between_steps": [(training, "DRAW_AHEAD", False)],
                   "full_memo_text_kv": [(training_step, "MEMO_TEXT_KV", True)],
                   "full_text_kv_each_step": [(training_step, "MEMO_TEXT_KV", False)],
                   "full_no_pdl": [(fused_norm, "PDL", False)],
                   "full_torch_pack_bits": [(lean_backward, "PACK_BITS_KERNEL", False)],
                   "full_torch_layer_norms": [(lean_backward, "FUSED_LAYER_NORMS", False)],
                   "full_prefix_in_step": [(training_step, "OVERLAP_FROZEN_PREFIX", False)],
                   "full_dv_first": [(frame_attention, "PAIRS_DV", "first")],
                   "full_dv_last": [(frame_attention, "PAIRS_DV", "last")],
                   "full_int32_attention": [(frame_attention, "PAIRS_INT32_OFFSETS", True)],
                   "full_rolled_int32_attention": [(frame_attention, "PAIRS_UNROLL", 1),
                                                   (frame_attention, "PAIRS_INT32_OFFSETS", True),
                                                   (frame_attention, "PAIRS_DV", "first")],
                   "full_dots_attention": [(frame_attention, "SHORT_KERNEL", "dots"),
                                           (frame_attention, "DOTS_ROWS", 64),
                                           (frame_attention, "DOTS_MIN_CHANNELS", 0)],
                   "full_dots32_attention": [(frame_attention, "SHORT_KERNEL", "dots"),
                                             (frame_attention, "DOTS_ROWS", 32),
                                             (frame_attention, "DOTS_MIN_CHANNELS", 0)],
                   "full_dots32_wide_attention": [(frame_attention, "SHORT_KERNEL", "dots"),
                                                  (frame_attention, "DOTS_ROWS", 32),
                                                  (frame_attention, "DOTS_MIN_CHANNELS", 8)],
                   "full_pairs_attention": [(frame_attention, "SHORT_KERNEL", "pairs")],
                   "full_dots_half_p_attention": [(frame_attention, "SHORT_KERNEL", "dots"),
                                                  (frame_attention, "DOTS_ROWS", 64),
                                                  (frame_attention, "DOTS_MIN_CHANNELS", 0),
                                                  (frame_attention, "DOTS_HALF_PROBABILITIES", True)],
                   "full_cl_min_programs_132": [(fused_norm, "CL_MIN_PROGRAMS", 132)],
                   "full_cl_min_programs_264": [(fused_norm, "CL_MIN_PROGRAMS", 264)],
                   "full_cl_min_programs_0": [(fused_norm, "CL_MIN_PROGRAMS", 0)],
                   "full_skip_grads": [(lean_backward, "SKIP_GRADS_IN_NORMS", True)],
                   "full_padded_heads": [(frame_attention, "PAIRS_PADDED_HEADS", True)],
                   "full_skip_grads_padded_heads": [(lean_backward, "SKIP_GRADS_IN_NORMS", True),
                                                    (frame_attention, "PAIRS_PADDED_HEADS", True)],
                   "full_folded_taps_320": [(lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 320)],
                   "full_folded_taps_1280": [(lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 1280)],
                   "full_skip_padded_folded": [(lean_backward, "SKIP_GRADS_IN_NORMS", True),
                                               (frame_attention, "PAIRS_PADDED_HEADS", True),
                                               (lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 320)],
                   "full_overlap_optimizer": [(training_step, "OVERLAP_OPTIMIZER", True)],
                   "full_overlap_recompute_qkv": [(training_step, "OVERLAP_OPTIMIZER", True),
                                                  (frame_attention, "RECOMPUTE_PROJECTION", True)],
                   "full_all_untimed": [(lean_backward, "SKIP_GRADS_IN_NORMS", True),
                                        (frame_attention, "PAIRS_PADDED_HEADS", True),
                                        (lean_backward, "FRAME_TAPS_FOLDED_MAX_ROWS", 320),
                                        (training_step, "OVERLAP_OPTIMIZER", True)],
                   "full_cl132_dv_first": [(fused_norm, "CL_MIN_PROGRAMS", 132),
                                           (frame_attention, "PAIRS_DV", "first")]}
#: name -> the BLAS library PyTorch's matrix products go through for the run (`preferred_blas_library`)
BLAS_LIBRARY = {"full_cublaslt": "cublaslt"}


@contextlib.contextmanager
def module_settings(*settings: tuple):
    """(module, attribute, value) settings in force inside the block, the previous values restored after."""
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in settings]
    try:
        for module, attr, value in settings:
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def run_variant(name, args, unet_config, video, embeds, scheduler, device, flops, peak) -> dict:
    blas = torch.backends.cuda.preferred_blas_library() if name in BLAS_LIBRARY else None
    try:
        if blas is not None:
            torch.backends.cuda.preferred_blas_library(BLAS_LIBRARY[name])
        with module_settings(*MODULE_SETTINGS.get(name, [])):
            return _run_variant(name, args, unet_config, video, embeds, scheduler, device, flops, peak)
    finally:
        if blas is not None:
            torch.backends.cuda.preferred_blas_library(blas)


def _run_variant(name, args, unet_config, video, embeds, scheduler, device, flops, peak) -> dict:
    description, overrides = VARIANTS[name]
    baseline = overrides is None
    dtype = torch.float32 if baseline or device.type != "cuda" else torch.bfloat16
    unet = build_unet(unet_config, args.model_seed, device, dtype)
    other = args.baseline_steps if baseline else args.other_steps
    steps = {"full": args.steps, "full_triton_attention": args.steps, "lora": args.lora_steps,
             "lora_triton_attention": args.lora_steps}.get(name, other)  # fmt: skip
    record = {"description": description, "steps_asked": steps}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        record["weights_gib"] = torch.cuda.memory_allocated(device) / GIB
    began = time.perf_counter()
    if baseline:
        timer = Timer()
        torch.manual_seed(0 if name == "baseline" else 1)  # dropout masks
        losses = reference_loop(unet, video, embeds, scheduler, steps, args.seed, device, timer)
        seconds, warmup = timer.seconds, 3
    else:
        torch.manual_seed(0)
        settings = {"mixed_precision": "bf16" if device.type == "cuda" else "no", **overrides}
        if settings.get("temporal_kernels") == "best":
            settings["temporal_kernels"] = args.best_kernels
        if device.type != "cuda":
            settings["cuda_graph"] = "no"
        config = MotionDistillationConfig(
            max_train_steps=steps, seed=args.seed, checkpointing_steps=0, num_frames=args.frames, **settings
        )
        record["config"] = {k: v for k, v in config.to_dict().items() if k in (*settings, "r", "learning_rate")}
        result = train_motion(unet, video, embeds, scheduler, config, progress=False)
        losses, seconds = result.losses, result.extra["step_seconds"]
        warmup = 5 if config.cuda_graph == "yes" else (3 if config.compile != "no" else 2)
        record["trainable_parameters"] = result.info.num_parameters
        record["memory_format_run"] = result.extra.get("memory_format")  # "auto" resolved
        if result.extra.get("frozen_prefix"):  # the layers run a step ahead beside the backward pass
            record["frozen_prefix"] = result.extra["frozen_prefix"]
        record["train_motion_seconds"] = result.seconds
    record["wall_s"] = time.perf_counter() - began
    if device.type == "cuda":
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    record.update(summarize(seconds, warmup, flops, peak))
    record["step_seconds"] = [round(s, 5) for s in seconds]
    record["losses"] = [round(v, 6) for v in losses]
    del unet
    return record


def free(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_h100.json"))
    parser.add_argument("--variants", default="full_graph_fast,full_graph,full_graph_math,full_graph_conv,baseline,"
                        "full,lora,baseline_rerun,full_eager")
    parser.add_argument("--steps", type=int, default=400, help="steps of the `full` and `lora` runs")
    parser.add_argument("--lora-steps", type=int, default=400)
    parser.add_argument("--baseline-steps", type=int, default=100)
    parser.add_argument("--other-steps", type=int, default=100, help="steps of the other train_motion variants")
    parser.add_argument("--seed", type=int, default=0, help="train_motion seed (timesteps and noise)")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a tiny Show-1 UNet: a CPU smoke test of the code")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one eager step")
    parser.add_argument("--profile-kernels", default=None, choices=TEMPORAL_KERNELS,
                        help="temporal_kernels of the profiled step (default: what train_motion's default runs)")
    parser.add_argument("--profile-memory-format", default="auto", choices=MEMORY_FORMATS,
                        help="memory_format of the profiled step")
    parser.add_argument("--profile-stacks", action="store_true",
                        help="with --profile: also rank the copies (copy_, clone, contiguous, _to_copy) by the "
                             "Python lines that make them, and the kernels by operator, shapes and autograd node")
    parser.add_argument("--timed-conv-shapes", type=Path, default=None, metavar="JSON",
                        help="for full_timed_convs: a `bench_conv_shapes.py --compare-timed` result; the shapes "
                             "whose timing pays within --other-steps steps are timed")
    cudnn_benchmark_option(parser)
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:  # before minutes of set-up and runs, not after them
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "full_timed_convs" in names:
        if args.timed_conv_shapes is None:
            parser.error("--variants full_timed_convs needs --timed-conv-shapes JSON (bench_conv_shapes.py "
                         "--compare-timed)")
        if names.index("full_timed_convs") > 0 and any(VARIANTS[n][1] is not None for n in names[:names.index(
                "full_timed_convs")]):
            parser.error("--variants: put full_timed_convs first among the train_motion runs (a process keeps "
                         "the algorithms its first calls chose)")
        timed_shapes = paying_conv_shapes(args.timed_conv_shapes, args.other_steps)
        MODULE_SETTINGS["full_timed_convs"] = [(lean_backward, "TIMED_CONV_SHAPES", timed_shapes)]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet_config = {**show1_base_config(), **(TINY if args.tiny else {})}
    args.frames, height, width = 8, (16 if args.tiny else 40), (16 if args.tiny else 64)
    text_len, text_dim = 77, unet_config["encoder_hid_dim"]
    data = {
        "benchmark": "training",
        "env": environment(device, args.commit),
        "settings": {"model": "tiny" if args.tiny else "show-1-base (random weights)", "frames": args.frames,
                     "height": height, "width": width, "text_embeddings": [1, text_len, text_dim],
                     "seed": args.seed, "model_seed": args.model_seed, "loss": "cos/official",
                     "target": {"seconds_400": 15.0, "peak_gib": 8.0}},
        "runs": {},
    }
    if "full_timed_convs" in names:
        data["settings"]["timed_conv_shapes"] = {"from": args.timed_conv_shapes.name,
                                                 "shapes": sorted([k, list(x), list(w)] for k, x, w in timed_shapes)}
    print(json.dumps(data["env"]), flush=True)
    data["flops"] = step_flops(unet_config, args.frames, height, width, text_len)
    data["matmul_bf16_tflops"] = matmul_tflops(device)
    data["sdpa_backends"] = sdpa_backends(unet_config, args.frames, height, width, text_len, device)
    print(json.dumps({k: data[k] for k in ("flops", "matmul_bf16_tflops", "sdpa_backends")}), flush=True)
    write(args.out, data)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    video, embeds = inputs(args.frames, height, width, text_len, text_dim, device)
    args.best_kernels = _temporal_kernels("auto", device)  # what train_motion's default runs here
    for name in args.variants.split(","):
        timed = {k: data["runs"][k].get("s_per_step") for k in ("full_graph", "full_graph_math", "full_graph_conv",
                                                                 "full_graph_fast") if k in data["runs"]}
        timed = {k: v for k, v in timed.items() if v}
        if timed:  # the fastest temporal kernels measured so far in this run
            best = min(timed, key=timed.get)
            args.best_kernels = VARIANTS[best][1]["temporal_kernels"]
            data["best_temporal_kernels"] = args.best_kernels
        print(f"--- {name}: {VARIANTS[name][0]}", flush=True)
        try:
            record = run_variant(name, args, unet_config, video, embeds, scheduler, device,
                                 data["flops"]["step"], data["matmul_bf16_tflops"])
        except Exception as error:  # keep the other variants' numbers
            record = {"description": VARIANTS[name][0], "error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
        free(device)
        data["runs"][name] = record
        data["loss_agreement"] = loss_agreement(data["runs"])
        write(args.out, data)
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()
                 if k not in ("losses", "step_seconds", "config")}
        print(json.dumps(short), flush=True)
    if args.profile:
        data["profile_temporal_kernels"] = args.profile_kernels or args.best_kernels
        data["profile_memory_format"] = args.profile_memory_format
        data["profile"] = profile_step(unet_config, args, video, embeds, scheduler, device)
        write(args.out, data)
    print(json.dumps(data.get("loss_agreement", {}), indent=1)[:3000], flush=True)
    return data


def top_cuda_events(key_averages, per: int, unit: str, rows: int) -> dict:
    """The profiler's operators and kernels ranked by CUDA time, per `unit` (`per` units were profiled).

    Returns `kernels_per_<unit>`, `cuda_ms_per_<unit>` (kernel time) and `rows`: the top `rows` events with their
    CUDA ms and calls per unit and their share of the kernel time (operators nest, so shares overlap).
    """
    events = sorted((e for e in key_averages if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in kernels) or 1
    return {f"kernels_per_{unit}": sum(e.count for e in kernels) / per, f"cuda_ms_per_{unit}": total / 1e3 / per,
            "rows": [{"name": e.key[:120], f"cuda_ms_per_{unit}": e.device_time_total / 1e3 / per,
                      f"calls_per_{unit}": e.count / per, "share": e.device_time_total / total}
                     for e in events[:rows]]}  # fmt: skip


def copies_by_line(prof, per: int, rows: int = 30) -> list:
    """The copy operators of a profile grouped by the innermost lines of motion_adapters, diffusers or torch.nn that
    called them, ranked by CUDA time per step (`per` steps were profiled). Copies made in the backward pass have no
    Python stack (autograd's thread): they are grouped by the autograd node that made them."""
    copies = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}
    grouped = {}
    for e in prof.events():
        if e.name not in copies or e.device_time_total <= 0:
            continue
        if e.cpu_parent is not None and e.cpu_parent.name in copies:  # counted in its outer copy operator
            continue
        lines = [f.split("site-packages/")[-1].split("/work/")[-1] for f in e.stack
                 if any(part in f for part in ("motion_adapters", "diffusers", "torch/nn/", "torch/autograd"))][:4]
        parent = e.cpu_parent
        while not lines and parent is not None:
            if parent.name.startswith("autograd::engine::evaluate_function: "):
                lines = [parent.name.split(": ", 1)[1]]
            parent = parent.cpu_parent
        key = (e.name, tuple(lines))
        ms, calls = grouped.get(key, (0.0, 0))
        grouped[key] = (ms + e.device_time_total / 1e3 / per, calls + 1 / per)
    ranked = sorted(grouped.items(), key=lambda item: -item[1][0])[:rows]
    return [{"op": op, "lines": list(lines), "cuda_ms_per_step": round(ms, 3), "calls_per_step": calls}
            for (op, lines), (ms, calls) in ranked]


def kernels_by_source(prof, per: int, rows: int = 80) -> list:
    """The kernels of a profile grouped by the operator that launched them, its input shapes and the nearest
    enclosing autograd function or backward node, ranked by CUDA time per step (`per` steps were profiled)."""
    grouped = {}
    for e in prof.events():
        ms = sum(k.duration for k in e.kernels) / 1e3 / per
        if ms <= 0:
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(("_", "autograd::engine::evaluate_function: ")):
            parent = parent.cpu_parent
        source = "" if parent is None else parent.name.removeprefix("autograd::engine::evaluate_function: ")
        shapes = ",".join("x".join(map(str, shape)) for shape in (e.input_shapes or []) if shape)
        key = (source, e.name, shapes[:80])
        total, calls, kernels = grouped.get(key, (0.0, 0.0, 0.0))
        grouped[key] = (total + ms, calls + 1 / per, kernels + len(e.kernels) / per)
    ranked = sorted(grouped.items(), key=lambda item: -item[1][0])[:rows]
    return [{"source": source, "op": op, "shapes": shapes, "cuda_ms_per_step": round(ms, 4),
             "calls_per_step": calls, "kernels_per_step": kernels}
            for (source, op, shapes), (ms, calls, kernels) in ranked]


def profile_step(unet_config, args, video, embeds, scheduler, device) -> list:
    """The top CUDA kernels of two eager train_motion steps with the chosen temporal kernels (where time goes)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    unet = build_unet(unet_config, args.model_seed, device, torch.bfloat16)
    rows = []

    def prof(state):
        if state.step == 3:
            verbose = torch._C._profiler._ExperimentalConfig(verbose=True)  # Python frames in the events' stacks
            prof.ctx = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                               with_stack=args.profile_stacks, record_shapes=args.profile_stacks,
                               experimental_config=verbose if args.profile_stacks else None)  # fmt: skip
            prof.ctx.__enter__()
        if state.step == 5:
            torch.cuda.synchronize()
            prof.ctx.__exit__(None, None, None)
            top = top_cuda_events(prof.ctx.key_averages(), per=2, unit="step", rows=40)
            rows.extend(top["rows"])
            prof.kernels_per_step = top["kernels_per_step"]
            if args.profile_stacks:
                rows.append({"copies_by_line": copies_by_line(prof.ctx, per=2)})
                rows.append({"kernels_by_source": kernels_by_source(prof.ctx, per=2)})

    config = MotionDistillationConfig(max_train_steps=5, seed=args.seed, checkpointing_steps=0,
                                      mixed_precision="bf16", cuda_graph="no", num_frames=args.frames,
                                      temporal_kernels=args.profile_kernels or args.best_kernels,
                                      memory_format=args.profile_memory_format)  # fmt: skip
    try:
        train_motion(unet, video, embeds, scheduler, config, progress=False, callbacks=[prof])
        rows.insert(0, {"kernels_per_step": getattr(prof, "kernels_per_step", None)})
    except Exception as error:
        rows = [{"error": f"{type(error).__name__}: {error}"}]
    del unet
    free(device)
    for row in rows[:25]:
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
