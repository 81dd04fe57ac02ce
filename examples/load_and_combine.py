"""Load shared motions (Hub ids or folders) into a VMCPipeline, combine two with weights, and generate.

    python examples/load_and_combine.py user/seagull-walk user/head-turn --weights 1.0 0.5 \
        --prompt "a penguin is walking" -o penguin.mp4

Without `--model` the pipeline is the embedded default model; `--model` takes a saved cascade folder. Motions are
downloaded once into the Hugging Face cache (`HF_HUB_OFFLINE=1` uses only the cache).
"""

from __future__ import annotations

import argparse

import torch

from motion_adapters import VMCPipeline
from motion_adapters.video import save_video


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("motions", nargs="+", help="motion folders or Hub ids")
    parser.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per motion")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("-o", "--output", default="combined.mp4")
    parser.add_argument("--model", default=None, help="a saved cascade folder (default: the embedded model)")
    parser.add_argument("--stages", default=None, help="comma-separated stages, e.g. keyframes")
    parser.add_argument("--steps", type=int, default=None, help="keyframe denoising steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = VMCPipeline.from_pretrained(args.model) if args.model else VMCPipeline.from_default()
    names = [pipe.load_motion(motion) for motion in args.motions]
    pipe.set_motions(names, args.weights)
    print("active motions:", pipe.motions)
    stage_kwargs = {"keyframes": {"num_inference_steps": args.steps}} if args.steps else None
    out = pipe(args.prompt, stages=tuple(args.stages.split(",")) if args.stages else None, stage_kwargs=stage_kwargs,
               output_type="pt", generator=torch.Generator().manual_seed(args.seed))
    path = save_video(out.frames[0], args.output)
    print(f"wrote {path}: {tuple(out.frames.shape[2:])} (frames, height, width)")
    pipe.unload_motion()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
