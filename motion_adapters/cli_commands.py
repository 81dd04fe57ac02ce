"""The `motion-adapters` subcommands that drive pipelines and the Hub: train, generate, push, eval."""

from __future__ import annotations

import argparse

EXIT_OK = 0


def add_commands(sub) -> None:
    """Register the pipeline and Hub subcommands on the CLI's subparsers."""
    push = sub.add_parser("push", help="upload a motion folder to the Hugging Face Hub")
    push.add_argument("folder", help="a motion folder written by train")
    push.add_argument("repo_id", help="the Hub repository, e.g. user/seagull-walk")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="a write token (default: the logged-in one)")
    push.add_argument("--message", default=None, help="the commit message")
    push.set_defaults(func=_cmd_push)
    add_pipeline_commands(sub)
    from motion_adapters.cli_eval import add_eval_command

    add_eval_command(sub)
    # listed for --help; cli.main hands `many ...` to motion_adapters.multi.main with the rest of the arguments
    sub.add_parser("many", help="train many motions / generate many prompts (run under accelerate launch)")


def _cmd_push(args: argparse.Namespace) -> int:
    from motion_adapters.hub import push_motion_to_hub

    url = push_motion_to_hub(
        args.folder, args.repo_id, token=args.token, private=args.private or None, commit_message=args.message
    )
    print(url)
    return EXIT_OK


def add_pipeline_commands(sub) -> None:
    """Register train and generate, which load a VMCPipeline (the embedded default model unless --model)."""
    train = sub.add_parser("train", help="learn the motion of one clip into a motion folder")
    train.add_argument("video", help="an mp4/webm/gif file or a folder of frames")
    train.add_argument("--prompt", required=True, help='the appearance-invariant prompt, e.g. "a seagull is walking"')
    train.add_argument("--out", required=True, help="the motion folder to write (checkpoints resume from it)")
    _model_args(train)
    train.add_argument("--steps", type=int, default=None, help="training steps (default 400)")
    train.add_argument("--mode", choices=("full", "lora"), default=None)
    train.add_argument("--loss", choices=("cos", "l2", "eps_mse"), default=None)
    train.add_argument("--cos-variant", choices=("paper", "official"), default=None)
    train.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4)")
    train.add_argument("--num-frames", type=int, default=None, help="frames sampled from the clip (default 8)")
    train.add_argument("--stride", type=int, default=1, help="take every STRIDE-th frame of the clip")
    train.add_argument("--start", type=int, default=0, help="first frame of the clip to use")
    train.add_argument("--resize-mode", choices=("crop", "stretch"), default="crop")
    train.add_argument("--reverse", action="store_true", help="learn the backward motion")
    train.add_argument("--no-invert", action="store_true", help="skip computing the noise prior")
    train.add_argument("--inversion-steps", type=int, default=75, help="DDIM steps of the inversion")
    train.add_argument("--invert-with", choices=("base", "tuned"), default="base",
                       help="which keyframe UNet inverts the clip for the noise prior: the pretrained one (before "
                            "training) or the tuned one (after it, as the paper)")  # fmt: skip
    train.add_argument("--config", default=None, help="a JSON file of MotionDistillationConfig fields")
    train.set_defaults(func=_cmd_train)

    gen = sub.add_parser("generate", help="generate a video with a motion")
    gen.add_argument("--motion", action="append", default=[], help="a motion folder or Hub id (repeatable)")
    gen.add_argument("--weight", action="append", type=float, default=[], help="weight per --motion (default 1)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("-o", "--output", default="out.mp4", help="an .mp4 or .gif path")
    _model_args(gen)
    gen.add_argument("--stages", default=None, help="comma-separated stages to run (default: all loaded)")
    gen.add_argument("--steps", type=int, default=None, help="keyframe denoising steps")
    gen.add_argument("--guidance-scale", type=float, default=None, help="keyframe guidance scale")
    gen.add_argument("--no-noise-prior", action="store_true", help="start from random noise, not the prior")
    gen.add_argument("--fps", type=int, default=8)
    gen.set_defaults(func=_cmd_generate)


def _model_args(parser) -> None:
    parser.add_argument("--model", default=None, help="a saved cascade folder (default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)


def load_pipeline(model: str | None, device: str | None):
    """The VMCPipeline of `--model` (a saved cascade folder or Hub ids) or the embedded default model."""
    import torch

    from motion_adapters.pipelines.vmc import VMCPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        pipe = VMCPipeline.from_default()
    else:
        pipe = VMCPipeline.from_pretrained(base=model) if not _is_cascade_folder(model) else (
            VMCPipeline.from_pretrained(model)
        )
    return pipe.to(device)


def _is_cascade_folder(path: str) -> bool:
    from pathlib import Path

    from motion_adapters.pipelines.cascade import INDEX_FILE

    return (Path(path) / INDEX_FILE).is_file()


def _cmd_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from motion_adapters.config import MotionDistillationConfig

    fields = json.loads(Path(args.config).read_text()) if args.config else {}
    overrides = {"max_train_steps": args.steps, "mode": args.mode, "loss": args.loss, "cos_variant": args.cos_variant,
                 "learning_rate": args.lr, "num_frames": args.num_frames, "seed": args.seed}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    config = MotionDistillationConfig.from_dict(fields)
    pipe = load_pipeline(args.model, args.device)
    result = pipe.train_motion(
        args.video, args.prompt, config, output_dir=args.out, invert=not args.no_invert, invert_with=args.invert_with,
        num_inversion_steps=args.inversion_steps,
        video_kwargs={"stride": args.stride, "start": args.start, "resize_mode": args.resize_mode,
                      "reverse": args.reverse},
    )
    k = max(1, len(result.losses) // 10)
    print(f"trained {result.info.num_parameters:,} parameters in {len(result.info.module_names)} modules, "
          f"{result.steps} steps, {result.seconds:.1f} s; loss {sum(result.losses[:k]) / k:.4f} -> "
          f"{sum(result.losses[-k:]) / k:.4f}")
    print(f"motion saved to {result.output_dir}")
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from motion_adapters.video import save_video

    if args.weight and len(args.weight) != len(args.motion):
        raise ValueError(f"--weight was given {len(args.weight)} times for {len(args.motion)} --motion; match them.")
    pipe = load_pipeline(args.model, args.device)
    names = [pipe.load_motion(motion) for motion in args.motion]
    if names:
        pipe.set_motions(names, args.weight or None)
    stage_kwargs = {"keyframes": {k: v for k, v in (("num_inference_steps", args.steps),
                                                    ("guidance_scale", args.guidance_scale)) if v is not None}}
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else None
    out = pipe(args.prompt, stages=stages, stage_kwargs=stage_kwargs, output_type="pt",
               generator=torch.Generator().manual_seed(args.seed), noise_prior=not args.no_noise_prior)
    path = save_video(out.frames[0], args.output, fps=args.fps)
    print(f"wrote {path} ({out.frames.shape[2]} frames, {out.frames.shape[3]}x{out.frames.shape[4]})")
    return EXIT_OK
