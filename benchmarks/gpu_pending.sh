#!/usr/bin/env bash
# The measurements the levers built without a GPU are waiting for, one step a call (each under 10 minutes on an
# H100 or H200), results under $OUT (the device tool's output folder; default results/pending):
#
#   bash benchmarks/gpu_pending.sh tests     # the GPU tests of those levers (-m gpu), against cuDNN, PyTorch, off
#   bash benchmarks/gpu_pending.sh training  # each lever against the defaults in one process, then all together
#   bash benchmarks/gpu_pending.sh convs     # each cuDNN convolution shape timed as training calls it, both ways
#   bash benchmarks/gpu_pending.sh timed     # training with only the shapes whose timing pays timed (after convs)
#   bash benchmarks/gpu_pending.sh cascade   # the whole cascade at real sizes with today's defaults
#   bash benchmarks/gpu_pending.sh profile   # one eager training step's CUDA kernels, by operator and by source
#
# The training step names its file after the GPU (training_untimed_h100.json, ...); docs/performance.md's
# "Against the targets" says what each lever is and what would make it a default.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/pending}"
mkdir -p "$OUT"
COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"  # the device's checkout may report a stale HEAD: pass COMMIT=
GPU="$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true) | head -1 | grep -o 'H[0-9][0-9]*' | head -1 | tr 'H' 'h' || true)"
GPU="${GPU:-gpu}"
case "${1:-}" in
  tests)
    python3 -m pytest -q -m gpu tests/test_deferred_updates.py tests/test_frame_taps.py \
      tests/test_frame_attention.py -k "overlapped or folded or padded" ;;
  training)
    python3 benchmarks/bench_training.py --commit "$COMMIT" --out "$OUT/training_untimed_$GPU.json" \
      --variants baseline,full,full_skip_grads,full_padded_heads,full_folded_taps_320,full_folded_taps_1280,full_overlap_optimizer,full_overlap_recompute_qkv,full_all_untimed,lora,baseline_rerun \
      --baseline-steps 30 --steps 400 --lora-steps 200 --other-steps 400 ;;
  convs)
    python3 benchmarks/bench_conv_shapes.py --compare-timed --commit "$COMMIT" --out "$OUT/conv_timing_$GPU.json"
    python3 benchmarks/bench_conv_shapes.py --compare-timed --cudnn-benchmark-limit 3 --commit "$COMMIT" \
      --out "$OUT/conv_timing_limit3_$GPU.json" ;;
  timed)
    python3 benchmarks/bench_training.py --commit "$COMMIT" --variants full_timed_convs --other-steps 400 \
      --timed-conv-shapes "$OUT/conv_timing_$GPU.json" --out "$OUT/training_timed_convs_$GPU.json"
    python3 benchmarks/bench_training.py --commit "$COMMIT" --variants full --steps 400 \
      --out "$OUT/training_untimed_convs_$GPU.json" ;;
  cascade)
    python3 benchmarks/bench_cascade.py --commit "$COMMIT" --out "$OUT/cascade_defaults_$GPU.json" ;;
  profile)
    python3 benchmarks/bench_training.py --commit "$COMMIT" --variants full --steps 100 --profile --profile-stacks \
      --out "$OUT/training_profile_defaults_$GPU.json" ;;
  *)
    echo "usage: bash benchmarks/gpu_pending.sh tests|training|convs|timed|cascade|profile" >&2
    exit 2 ;;
esac
