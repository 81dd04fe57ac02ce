"""The README's main job: learn an unseen motion on the embedded default model and generate it with a new look.

`motion-adapters demo` learns the zigzag of a shipped shapes-world clip (a motion the default model never saw in
pretraining), generates "a yellow square zigzagging ... on a checkered background" from random noise, from the
clip's inverted noise without training, and with the learned motion (from the same noise, the pretrained UNet's
inversion), writes the videos and `report.json`, and prints the tracked motion fidelity and the appearance accuracy
of each beside the reference clip's. Everything (three cascades to 29 frames of 96 x 96, one inversion, 150
training steps) runs on the CPU in about three minutes on two cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.world import ClipSpec

EXAMPLE_CLIP = Path(__file__).resolve().parent / "world" / "assets" / "examples" / "zigzag.gif"
"""The shipped example clip: a red circle zigzagging to the right on a blue background, 8 frames of 32 x 32."""
EXAMPLE_SPEC = ClipSpec("circle", "red", "blue", "zigzag")
"""What `EXAMPLE_CLIP` shows (its trajectory is the reference path)."""
TARGET_SPEC = ClipSpec("square", "yellow", "checkered", "zigzag")
"""The new look for the same motion."""
DEMO_CONFIG = {"max_train_steps": 150, "learning_rate": 1e-4, "checkpointing_steps": 50}
"""Training settings of the demo: the paper's loss and learning rate, 150 of its 400 steps (CPU time)."""


def score_keyframes(keyframes: torch.Tensor, reference: ClipSpec, look: ClipSpec) -> dict:
    """Motion fidelity of the tracked object against `reference`'s path, and appearance against `look`.

    Example:
        >>> from motion_adapters.world import render_clip
        >>> score_keyframes(render_clip(EXAMPLE_SPEC), EXAMPLE_SPEC, EXAMPLE_SPEC)["displacement_cosine"]
        1.0
    """
    from motion_adapters.metrics import appearance_check, track_object, trajectory_fidelity

    fidelity = trajectory_fidelity(track_object(keyframes), reference.trajectory(keyframes.shape[1]))
    appearance = appearance_check(keyframes, look)
    return {
        "displacement_cosine": round(float(fidelity["displacement_cosine"]), 3),
        "endpoint_error": round(float(fidelity["endpoint_error"]), 3),
        "appearance_accuracy": round(float(appearance["accuracy"]), 3),
        "appearance": {k: bool(appearance[k]) for k in ("color", "shape", "background")},
    }


def run_demo(
    out_dir: str | Path = "outputs/demo", steps: int | None = None, seed: int = 0, device: str | None = None
) -> dict:
    """Learn the zigzag of `EXAMPLE_CLIP`, generate it as a yellow square on a checkered background, and report.

    Writes the motion folder `motion/`, `reference.mp4`, `unadapted.mp4`, `inversion_only.mp4`, `vmc.mp4` and
    `report.json` into `out_dir` and returns the report.

    Example:
        >>> report = run_demo("outputs/demo", steps=20)  # doctest: +SKIP
    """
    from motion_adapters.pipelines.vmc import VMCPipeline
    from motion_adapters.serialization import atomic_write_text
    from motion_adapters.video import save_video

    out_dir = Path(out_dir)
    began = time.perf_counter()
    pipe = VMCPipeline.from_default(device=device)
    prompt = TARGET_SPEC.caption

    def generate(**kwargs):
        return pipe(prompt, output_type="pt", return_stage_outputs=True,
                    generator=torch.Generator().manual_seed(seed), **kwargs)  # fmt: skip

    train_prompt = EXAMPLE_SPEC.appearance_invariant_prompt
    config = MotionDistillationConfig(**{**DEMO_CONFIG, **({"max_train_steps": steps} if steps else {})}, seed=seed)
    clip = pipe._prepare_clip(EXAMPLE_CLIP, config, {})

    print(f"1/4 generating without adaptation: {prompt!r}", flush=True)
    unadapted = generate(noise_prior=False)
    print(f"2/4 learning the motion of {EXAMPLE_CLIP.name} ({EXAMPLE_SPEC.caption!r}) with prompt {train_prompt!r}; "
          "the clip is inverted first, by the pretrained UNet", flush=True)  # fmt: skip
    result = pipe.train_motion(EXAMPLE_CLIP, train_prompt, config, output_dir=out_dir / "motion")
    print("3/4 generating from the clip's inverted noise with the motion switched off (the paper's 'without "
          "adaptation')", flush=True)  # fmt: skip
    pipe.set_motions([])
    inverted_only = generate(noise_prior="default")  # the motion's noise prior, with its weights switched off
    print("4/4 generating with the learned motion, from the same noise", flush=True)
    pipe.set_motions(["default"])
    adapted = generate()

    reference = clip[0].cpu()
    keyframes = lambda out: out.stage_frames["keyframes"][0].float().cpu()  # noqa: E731
    rows = {
        "reference clip": score_keyframes(reference, EXAMPLE_SPEC, EXAMPLE_SPEC),
        "without adaptation": score_keyframes(keyframes(unadapted), EXAMPLE_SPEC, TARGET_SPEC),
        "inversion only": score_keyframes(keyframes(inverted_only), EXAMPLE_SPEC, TARGET_SPEC),
        "VMC (this library)": score_keyframes(keyframes(adapted), EXAMPLE_SPEC, TARGET_SPEC),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_video(reference, out_dir / "reference.mp4")
    save_video(unadapted.frames[0].float().cpu(), out_dir / "unadapted.mp4")
    save_video(inverted_only.frames[0].float().cpu(), out_dir / "inversion_only.mp4")
    save_video(adapted.frames[0].float().cpu(), out_dir / "vmc.mp4")
    k = max(1, len(result.losses) // 10)
    report = {
        "prompt": prompt,
        "training_prompt": train_prompt,
        "steps": result.steps,
        "loss_first": round(float(np.mean(result.losses[:k])), 4),
        "loss_last": round(float(np.mean(result.losses[-k:])), 4),
        "trainable_parameters": result.info.num_parameters,
        "video": list(adapted.frames.shape[1:]),
        "seconds": round(time.perf_counter() - began, 1),
        "scores": rows,
    }
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))

    print(f"\nlearned {result.info.num_parameters:,} temporal-attention parameters in {result.steps} steps "
          f"(loss {report['loss_first']} -> {report['loss_last']})")  # fmt: skip
    print(f"{'':<20} {'motion cosine':>14} {'endpoint err':>13} {'appearance':>11}")
    for name, row in rows.items():
        print(f"{name:<20} {row['displacement_cosine']:>14.3f} {row['endpoint_error']:>13.3f} "
              f"{row['appearance_accuracy']:>11.2f}")  # fmt: skip
    print(f"\nmotion cosine: 1 = the reference path; endpoint error: fraction of the frame. Videos "
          f"({' x '.join(map(str, report['video'][1:]))}) and report.json in {out_dir}; {report['seconds']} s in all")
    return report
