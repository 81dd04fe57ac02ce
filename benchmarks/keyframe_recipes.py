"""Which keyframe-stage recipe makes the default model read the caption's motion? Short runs side by side.

Each variant trains the default model's keyframe UNet from scratch for the same wall-clock budget with
``python -m motion_adapters.world.pretrain`` (one process each, the shipped T5 encoder frozen so every variant
reads the same text embeddings), then scores it with ``evaluate_motion_reading`` (v error with the true caption
against the opposite direction's: 1.00 means the motion words are ignored) and ``evaluate_keyframes`` (appearance
and displacement cosine of sampled keyframes). The JSON keeps each variant's command, steps, loss and scores.

Example:
    $ python benchmarks/keyframe_recipes.py --minutes 1.8 --out benchmarks/results/keyframe_recipes_h100.json
    $ python benchmarks/keyframe_recipes.py --minutes 0.05 --max-steps 2 --tiny --out /tmp/recipes.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "shipped_recipe": ["--weighting", "min-snr"],
    "head_dim_8": ["--weighting", "min-snr", "--attention-head-dim", "8"],
    "v_capped": ["--weighting", "v-capped"],
    "head_dim_8_v_capped": ["--weighting", "v-capped", "--attention-head-dim", "8"],
}
"""Variant name -> extra pretrain arguments. Head dim 64 is Show-1's split: temporal heads of C / 64 = 1 or 2
channels at this model's widths; 8 gives 8 heads of 8 or 16 channels (show-1-base's own are 5 to 20)."""


def run_variant(name: str, extra: list[str], args: argparse.Namespace, root: Path) -> dict:
    """Train and score one variant in its own process; returns its summary."""
    out = root / name
    command = [
        sys.executable, "-m", "motion_adapters.world.pretrain", "--out", str(out), "--stage", "keyframes",
        "--minutes", str(args.minutes), "--text-encoder-from", "default", "--eval-samples", str(args.eval_samples),
        "--num-specs", str(args.num_specs), "--workers", str(args.workers), "--log-every", "50", *extra,
    ]  # fmt: skip
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    if args.tiny:
        command += ["--batch-sizes", "4,4,4"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"command": command[1:], "error": result.stderr[-2000:]}
    log = json.loads((out / "training_log.json").read_text())
    stage = log["stages"]["keyframes"]
    keyframes = log["evaluation"].get("keyframes", [])
    at_5 = next((m for m in keyframes if isinstance(m, dict) and m.get("guidance_scale") == 5.0), {})
    return {
        "command": " ".join(["python"] + command[1:]),
        "seconds_total": round(time.perf_counter() - start, 1),
        "steps": stage["steps"],
        "train_seconds": stage["seconds"],
        "s_per_step": round(stage["seconds"] / max(stage["steps"], 1), 4),
        "final_loss": stage["final_loss"],
        "weighting": stage.get("weighting"),
        "motion_reading": log["evaluation"].get("motion_reading"),
        "keyframes_guidance_5": {k: at_5.get(k) for k in ("appearance_accuracy", "translation_displacement_cosine",
                                                          "still_displacement_cosine",
                                                          "growing_shrinking_scale_agreement")},  # fmt: skip
        "curve": stage["curve"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write.")
    parser.add_argument("--minutes", type=float, default=1.8, help="Training minutes per variant.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated names of {list(VARIANTS)}.")
    parser.add_argument("--eval-samples", type=int, default=22)
    parser.add_argument("--num-specs", type=int, default=30_000)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="Batches of 4 (CPU smoke test).")
    parser.add_argument("--keep", default=None, help="Folder to keep the trained variants in (default: a temp dir).")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}.")
    import torch

    from motion_adapters.world.pretrain import _environment  # the same environment record as pretraining

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"environment": _environment(device), "minutes_per_variant": args.minutes, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for name in names:
            report["variants"][name] = run_variant(name, VARIANTS[name], args, root)
            summary = {k: v for k, v in report["variants"][name].items() if k != "curve"}
            print(f"[{name}] {json.dumps(summary)}", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            partial = Path(args.out).with_suffix(".part")
            partial.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            os.replace(partial, args.out)
    return report


if __name__ == "__main__":
    main()
