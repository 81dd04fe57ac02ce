"""The VMC ablations of the paper, measured exactly in the shapes world on the embedded default model.

For each unseen motion (zigzag, circling, bouncing: the default model never saw them) and seed, a source clip with
one random look is rendered, a motion is learned from it with each variant below, and the keyframes are generated
for a caption with another shape, color and background and the same motion, starting from the variant's inverted
noise (VMC inference). Each generation is scored against the source clip's trajectory (tracked object,
`trajectory_fidelity`: mean cosine of frame-to-frame displacements, endpoint error as a fraction of the frame) and
against the target caption's look (`appearance_check`: color, shape, background).

Variants (all train the same parameters, the keyframe UNet's temporal q/k/v, unless named otherwise):

- `vmc_cos_paper`, `vmc_cos_released`, `vmc_l2`: VMC with eq. 17, the released cosine, eq. 16.
- `vmc_cos_released_eps`, `vmc_l2_eps`: the same with a plain epsilon-matching term of weight 1 added
  (`epsilon_loss_weight`), which keeps the tuned UNet a good denoiser of what the frames share.
- `vmc_lora`: the released cosine on rank-8 LoRA factors instead of full weights.
- `spatial_attn`: the released cosine on the spatial (self and cross) attention q/k/v instead.
- `scene_prompt`: the released cosine with the full caption (background included) as the training prompt.
- `eps_matching`: plain epsilon-matching fine-tuning (no frame residuals) of the temporal q/k/v.
- `inversion_only`: no training; the clip's inverted noise alone (the paper's "without adaptation").
- `random_noise`: no training, no inversion: the pretrained model from random noise (the floor).
- `*_base`: a training above, generating from the clip's inversion by the pretrained UNet (`invert_with="base"`,
  the library's default) instead of the tuned UNet's inversion (the paper; every variant without the suffix).

    python benchmarks/ablation_world.py --out benchmarks/results/ablation_world.json \
        --table docs/ablation.md --figure docs/images/ablation_samples.png          # GPU: minutes
    python benchmarks/ablation_world.py --tiny --out /tmp/ablation.json            # CPU smoke test of the code
    python benchmarks/ablation_world.py --report benchmarks/results/ablation_world.json --table docs/ablation.md
    python benchmarks/ablation_world.py --merge zigzag.json circling.json --out all.json  # runs split by motion
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from motion_adapters.config import MotionDistillationConfig  # noqa: E402
from motion_adapters.metrics import appearance_check, track_object, trajectory_fidelity  # noqa: E402
from motion_adapters.serialization import atomic_write_text  # noqa: E402
from motion_adapters.world import UNSEEN_MOTIONS, ClipSpec, render_clip, sample_spec  # noqa: E402
from motion_adapters.world.default_model import KEYFRAME_SIZE, NUM_KEYFRAMES  # noqa: E402

RELEASED = {"loss": "cos", "cos_variant": "official"}
VARIANTS: dict[str, dict] = {
    "vmc_cos_paper": {"config": {"loss": "cos", "cos_variant": "paper"}},
    "vmc_cos_released": {"config": RELEASED},
    "vmc_l2": {"config": {"loss": "l2"}},
    "vmc_cos_released_eps": {"config": {**RELEASED, "epsilon_loss_weight": 1.0}},
    "vmc_l2_eps": {"config": {"loss": "l2", "epsilon_loss_weight": 1.0}},
    "vmc_lora": {"config": {**RELEASED, "mode": "lora", "r": 8, "lora_alpha": 8}},
    "spatial_attn": {"config": {**RELEASED, "target": "spatial_attn.to_[qkv]"}},
    "scene_prompt": {"config": RELEASED, "prompt": "scene"},
    "eps_matching": {"config": {"loss": "eps_mse"}},
    "inversion_only": {"config": None},
    "random_noise": {"config": None, "prior": False},
    # the same trainings, generating from the clip's inversion by the pretrained UNet (`invert_with="base"`, the
    # library's default) instead of by the tuned one (the paper, and every variant above)
    "vmc_cos_paper_base": {"config": {"loss": "cos", "cos_variant": "paper"}, "invert_with": "base"},
    "vmc_cos_released_base": {"config": RELEASED, "invert_with": "base"},
    "vmc_l2_base": {"config": {"loss": "l2"}, "invert_with": "base"},
    "vmc_lora_base": {"config": {**RELEASED, "mode": "lora", "r": 8, "lora_alpha": 8}, "invert_with": "base"},
    "spatial_attn_base": {"config": {**RELEASED, "target": "spatial_attn.to_[qkv]"}, "invert_with": "base"},
    "scene_prompt_base": {"config": RELEASED, "prompt": "scene", "invert_with": "base"},
    "eps_matching_base": {"config": {"loss": "eps_mse"}, "invert_with": "base"},
}
"""Variant name -> config overrides (None: no training), training prompt kind, whether to start from the prior,
which UNet inverts the clip ("tuned" unless named)."""

METRICS = ("displacement_cosine", "endpoint_error", "appearance_accuracy")
PAIRED_CONTROL = "inversion_only"
"""Each variant is also compared clip by clip (same motion and seed) with this one: the same inverted noise untrained."""


def target_look(source: ClipSpec, seed: int) -> ClipSpec:
    """The source clip's motion, speed, start and size with another shape, color and background."""
    rng = np.random.default_rng(10_000 + seed)
    while True:
        other = sample_spec(rng, motions=(source.motion,))
        if other.shape != source.shape and other.color != source.color and other.background != source.background:
            return dataclasses.replace(source, shape=other.shape, color=other.color, background=other.background)


def score(keyframes: torch.Tensor, source: ClipSpec, target: ClipSpec) -> dict[str, float]:
    """Trajectory fidelity against the source clip's path and appearance accuracy against the target look."""
    fidelity = trajectory_fidelity(track_object(keyframes), source.trajectory(keyframes.shape[1]))
    appearance = appearance_check(keyframes, target)
    return {
        "displacement_cosine": float(fidelity["displacement_cosine"]),
        "endpoint_error": float(fidelity["endpoint_error"]),
        "appearance_accuracy": float(appearance["accuracy"]),
    }


def run(args: argparse.Namespace) -> dict:
    from motion_adapters.pipelines.vmc import VMCPipeline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = VMCPipeline.from_default(device=device)
    for stage in (pipe.keyframes, pipe.interpolation, pipe.sr1):
        if stage is not None:
            stage.set_progress_bar_config(disable=True)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}.")
    motions = args.motions.split(",")
    rows, samples, began = [], {}, time.perf_counter()
    for motion in motions:
        for seed in range(args.seeds):
            source = sample_spec(np.random.default_rng(1_000 * seed + UNSEEN_MOTIONS.index(motion)), motions=(motion,))
            target = target_look(source, seed)
            clip = render_clip(source, NUM_KEYFRAMES, KEYFRAME_SIZE, KEYFRAME_SIZE)[None]
            if motion == motions[0] and seed == 0:
                samples["reference"] = clip[0]
            for name in variants:
                variant = VARIANTS[name]
                tick = time.perf_counter()
                prior = None
                if variant["config"] is not None:
                    prompt = source.caption if variant.get("prompt") == "scene" else source.appearance_invariant_prompt
                    config = MotionDistillationConfig(
                        **variant["config"], max_train_steps=args.steps, learning_rate=args.lr, seed=seed,
                        checkpointing_steps=0,
                    )  # fmt: skip
                    result = pipe.train_motion(clip, prompt, config, num_inversion_steps=args.inversion_steps,
                                               invert_with=variant.get("invert_with", "tuned"),
                                               progress=False)  # fmt: skip
                    prior, losses = pipe._noise_priors["default"], result.losses
                else:
                    losses = []
                    if variant.get("prior", True):
                        prior = pipe.invert(clip.to(device), args.inversion_steps, progress=False).cpu()
                out = pipe(
                    target.caption, stages=("keyframes",), output_type="pt", noise_prior=False, latents=prior,
                    num_frames=NUM_KEYFRAMES, height=KEYFRAME_SIZE, width=KEYFRAME_SIZE,
                    generator=torch.Generator().manual_seed(seed),
                    stage_kwargs={"keyframes": {"num_inference_steps": args.inference_steps}},
                ).frames[0].float().cpu()  # fmt: skip
                if variant["config"] is not None:
                    pipe.unload_motion()
                    pipe._noise_priors.clear()
                row = {"variant": name, "motion": motion, "seed": seed, "source": source.caption,
                       "target": target.caption, **score(out, source, target),
                       "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                       "seconds": round(time.perf_counter() - tick, 2)}  # fmt: skip
                rows.append(row)
                if motion == motions[0] and seed == 0:
                    samples[name] = out
                print(f"{motion:9s} seed {seed} {name:17s} cos {row['displacement_cosine']:+.3f} "
                      f"endpoint {row['endpoint_error']:.3f} appearance {row['appearance_accuracy']:.2f} "
                      f"({row['seconds']:.1f}s)", flush=True)  # fmt: skip
    result = {
        "benchmark": "ablation_world",
        "command": "python benchmarks/ablation_world.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        },  # fmt: skip
        "settings": {"steps": args.steps, "lr": args.lr, "seeds": args.seeds, "motions": motions,
                     "inversion_steps": args.inversion_steps, "inference_steps": args.inference_steps,
                     "guidance_scale": pipe._default_stage_kwargs.get("keyframes", {}).get("guidance_scale")},
        "seconds": round(time.perf_counter() - began, 1),
        "rows": rows,
        "summary": summarize(rows, variants),
    }  # fmt: skip
    if args.figure:
        from motion_adapters.world.pretrain_eval import save_grid

        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        save_grid([samples["reference"], *(samples[n] for n in variants)], args.figure, scale=2)
        result["figure"] = {"path": str(args.figure), "rows": ["reference", *variants],
                            "motion": motions[0], "seed": 0}  # fmt: skip
    return result


def summarize(rows: list[dict], variants: list[str]) -> dict:
    """Mean and standard deviation over seeds of each metric, per variant, over all motions and per motion."""

    def stats(values: list[float]) -> dict[str, float]:
        values = [v for v in values if np.isfinite(v)]
        if not values:
            return {"mean": float("nan"), "std": float("nan"), "n": 0}
        return {"mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}  # fmt: skip

    summary = {}
    control = {(r["motion"], r["seed"]): r for r in rows if r["variant"] == PAIRED_CONTROL}
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {metric: stats([r[metric] for r in mine]) for metric in METRICS}
        pairs = [(r, control[r["motion"], r["seed"]]) for r in mine if (r["motion"], r["seed"]) in control]
        if name != PAIRED_CONTROL and pairs:
            summary[name]["paired_vs_" + PAIRED_CONTROL] = {
                metric: {**stats([r[metric] - c[metric] for r, c in pairs]),
                         "better": sum(r[metric] > c[metric] for r, c in pairs),
                         "worse": sum(r[metric] < c[metric] for r, c in pairs)}
                for metric in ("displacement_cosine", "appearance_accuracy")
            }  # fmt: skip
        summary[name]["per_motion"] = {
            motion: stats([r["displacement_cosine"] for r in mine if r["motion"] == motion])
            for motion in dict.fromkeys(r["motion"] for r in mine)
        }
    return summary


def merge(results: list[dict]) -> dict:
    """One result from runs split by motion or by variant (same settings otherwise): rows joined, summary redone."""
    first = results[0]
    for other in results[1:]:
        mine = {k: v for k, v in first["settings"].items() if k != "motions"}
        theirs = {k: v for k, v in other["settings"].items() if k != "motions"}
        if mine != theirs:
            raise SystemExit(f"--merge: settings differ ({mine} vs {theirs}); only runs split by motion merge.")
    rows = [row for result in results for row in result["rows"]]
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    merged = {**first, "rows": rows, "summary": summarize(rows, variants),
              "seconds": round(sum(r["seconds"] for r in results), 1),
              "command": " && ".join(r["command"] for r in results)}  # fmt: skip
    motions = list(dict.fromkeys(m for r in results for m in r["settings"]["motions"]))
    merged["settings"] = {**first["settings"], "motions": motions}
    keys = [(row["variant"], row["motion"], row["seed"]) for row in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit("--merge: two runs hold the same (variant, motion, seed); merge runs that do not overlap.")
    return merged


def table(result: dict, heading: str = "Ablations in the shapes world", source: str = "ablation_world.json",
          intro: str = "") -> str:
    """The markdown page of a result: settings, the summary tables, the per-motion table and the figure."""
    s, summary = result["settings"], result["summary"]
    motions = s["motions"]
    lines = [
        f"# {heading}",
        "",
        f"<!-- generated by benchmarks/ablation_world.py from benchmarks/results/{source}; do not edit -->",
        "",
        *([intro, ""] if intro else []),
        "",
        f"Measured on {result['environment']['device']} (torch {result['environment']['torch']}) on "
        f"{result['date'][:10]}, {result['seconds']:.0f} s in all: `{result['command']}`.",
        "",
        f"Each row learns from one clip of an unseen motion ({', '.join(motions)}; {s['seeds']} seeds each, a new "
        f"random look per seed) for {s['steps']} steps at learning rate {s['lr']}, then generates 8 keyframes of "
        "32 x 32 for a caption with another shape, color and background, starting from the inverted noise of "
        f"the clip ({s['inversion_steps']} DDIM steps; {s['inference_steps']} sampling steps). Motion: mean "
        "cosine of frame-to-frame displacements of the tracked object against the source clip (1 = same path) "
        "and endpoint error (fraction of the frame, 0 = same end point). Appearance: fraction of color, shape "
        "and background that match the new caption. Mean +- standard deviation over motions and seeds.",
        "",
        "| variant | motion cosine | endpoint error | appearance |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in summary.items():
        cells = [f"{row[m]['mean']:.3f} +- {row[m]['std']:.3f}" for m in METRICS]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    paired = {n: r["paired_vs_" + PAIRED_CONTROL] for n, r in summary.items() if "paired_vs_" + PAIRED_CONTROL in r}
    if paired:
        lines += ["", f"Clip by clip against `{PAIRED_CONTROL}` (same motion, seed and target caption): mean +- std "
                  "of the difference, and on how many clips the variant is better / worse:", "",
                  "| variant | motion cosine difference | better / worse | appearance difference | better / worse |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, diff in paired.items():
            cells = [f"{diff[m]['mean']:+.3f} +- {diff[m]['std']:.3f} | {diff[m]['better']} / {diff[m]['worse']}"
                     for m in ("displacement_cosine", "appearance_accuracy")]  # fmt: skip
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "Motion cosine per motion (mean +- std over seeds):", "",
              "| variant | " + " | ".join(motions) + " |", "| --- |" + " --- |" * len(motions)]  # fmt: skip
    for name, row in summary.items():
        cells = [f"{row['per_motion'][m]['mean']:.3f} +- {row['per_motion'][m]['std']:.3f}" for m in motions]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if "figure" in result:
        figure = result["figure"]
        lines += ["", f"Keyframes of the first motion ({figure['motion']}, seed 0), one row each: "
                  + ", ".join(figure["rows"]) + ".", "", f"![ablation samples](images/{Path(figure['path']).name})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/ablation_world.json")
    parser.add_argument("--table", default=None, help="Write the markdown page here.")
    parser.add_argument("--heading", default="Ablations in the shapes world", help="The page's title.")
    parser.add_argument("--intro", default="", help="A paragraph of markdown under the title.")
    parser.add_argument("--figure", default=None, help="Write a PNG of sample keyframes here.")
    parser.add_argument("--report", default=None, help="Only render --table from this result JSON.")
    parser.add_argument("--merge", nargs="+", default=None, help="Combine result JSONs of split runs into --out.")
    parser.add_argument("--variants", default=None, help=f"Comma-separated subset of {', '.join(VARIANTS)}.")
    parser.add_argument("--motions", default=",".join(UNSEEN_MOTIONS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inversion-steps", type=int, default=75)
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="2 steps, 1 seed, 4 inversion/sampling steps (CPU test).")
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads(Path(args.report).read_text())
    elif args.merge:
        result = merge([json.loads(Path(path).read_text()) for path in args.merge])
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    else:
        if args.tiny:
            args.steps, args.seeds, args.inversion_steps, args.inference_steps = 2, 1, 4, 4
            args.motions = args.motions.split(",")[0]
        result = run(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    if args.table:
        source = Path(args.report or args.out).name
        atomic_write_text(args.table, table(result, args.heading, source, args.intro))
    return result


if __name__ == "__main__":
    main()
