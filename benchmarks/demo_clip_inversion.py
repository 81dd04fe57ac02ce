"""The demo's clip on the CPU: which keyframe UNet inverts the clip, for several losses (keyframes only).

For each training setting, a fresh default pipeline learns the zigzag of the shipped example clip
(`VMCPipeline.train_motion` with `invert_with="tuned"`), then generates the demo's target caption three ways:
from the tuned UNet's inversion of the clip, from the pretrained UNet's inversion (what `invert_with="base"` stores),
and from random noise (seeds 0 to 2). Scores are the demo's (`score_keyframes`): motion cosine and appearance.

    python benchmarks/demo_clip_inversion.py --out benchmarks/results/demo_clip_inversion_cpu.json   # CPU, ~12 min
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_training import git_commit  # noqa: E402

from motion_adapters.config import MotionDistillationConfig  # noqa: E402
from motion_adapters.demo import EXAMPLE_CLIP, EXAMPLE_SPEC, TARGET_SPEC, score_keyframes  # noqa: E402
from motion_adapters.pipelines.vmc import VMCPipeline  # noqa: E402

SETTINGS = {
    "paper_1e-3_150": {"max_train_steps": 150, "learning_rate": 1e-3},
    "eps_1e-3_150": {"max_train_steps": 150, "learning_rate": 1e-3, "loss": "eps_mse"},
    "paper_1e-4_150": {"max_train_steps": 150, "learning_rate": 1e-4},
    "l2_1e-3_150": {"max_train_steps": 150, "learning_rate": 1e-3, "loss": "l2"},
}
CALL = {"num_inference_steps": 25, "guidance_scale": 7.5, "output_type": "pt"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_clip_inversion_cpu.json")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args(argv)
    pipe = VMCPipeline.from_default()
    clip = pipe._prepare_clip(EXAMPLE_CLIP, MotionDistillationConfig(), {})

    def generate(pipe, latents, seed=0):
        out = pipe.keyframes(TARGET_SPEC.caption, 8, 32, 32, latents=latents,
                             generator=torch.Generator().manual_seed(seed), **CALL)  # fmt: skip
        scores = score_keyframes(out.frames[0].float().cpu(), EXAMPLE_SPEC, TARGET_SPEC)
        return scores["displacement_cosine"], scores["appearance_accuracy"]

    base_prior = pipe.invert(clip, progress=False)
    results = {"untuned": {"inverted": generate(pipe, base_prior),
                           "random": [generate(pipe, None, s) for s in range(3)]}}  # fmt: skip
    print("untuned", results["untuned"], flush=True)
    for name in args.settings.split(","):
        began = time.time()
        pipe = VMCPipeline.from_default()  # fresh weights for every setting
        config = MotionDistillationConfig(**{"checkpointing_steps": 0, **SETTINGS[name]})
        trained = pipe.train_motion(EXAMPLE_CLIP, EXAMPLE_SPEC.appearance_invariant_prompt, config,
                                    invert_with="tuned", progress=False)  # fmt: skip
        results[name] = {
            "tuned_inverted": generate(pipe, pipe._noise_priors["default"]),
            "untuned_inverted_noise": generate(pipe, base_prior),
            "random": [generate(pipe, None, s) for s in range(3)],
            "loss": [trained.losses[0], trained.losses[-1]],
            "s": round(time.time() - began),
        }
        print(name, results[name], flush=True)
    data = {"benchmark": "demo_clip_inversion", "scores": "(motion cosine, appearance accuracy)",
            "env": {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
                    "commit": (git_commit(ROOT) or "")[:12] or None},
            "results": results}  # fmt: skip
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    main()
