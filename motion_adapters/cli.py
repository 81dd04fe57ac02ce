"""The `motion-adapters` command line: demo, train, generate, push, inspect, eval.

Every subcommand is a `main(argv)` path so tests drive it in-process. Exit codes: 0 success, 1 failure of the
work itself (a bad file, a Hub id that does not resolve, a NaN loss), 2 bad usage (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motion-adapters",
        description="Learn a motion from one video into a video model's temporal attention (VMC), and share it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="learn the zigzag of a shipped clip on the embedded default model, generate it with a new look"
    )
    demo.add_argument("--out", default="outputs/demo", help="folder for the motion, videos and report")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu (default) or cuda")
    demo.set_defaults(func=_cmd_demo)

    inspect = sub.add_parser("inspect", help="describe a motion folder or Hub id")
    inspect.add_argument("motion", help="a motion folder, or a Hub id like user/seagull-walk")
    inspect.add_argument("--revision", default=None)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=_cmd_inspect)

    from motion_adapters import cli_commands

    cli_commands.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    Example:
        >>> main(["inspect", "motions/seagull-walk"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["many"]:
        from motion_adapters.multi import main as many_main

        return many_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"motion-adapters {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE


def _cmd_inspect(args: argparse.Namespace) -> int:
    from motion_adapters.hub import resolve_motion_path
    from motion_adapters.serialization import load_motion_adapter

    motion = load_motion_adapter(resolve_motion_path(args.motion, revision=args.revision))
    description = motion.description()
    training = dict(description.get("training") or {})
    training.pop("losses", None)
    description["training"] = training
    description["noise_prior"] = list(motion.noise_prior.shape) if motion.noise_prior is not None else None
    size = sum(t.numel() * t.element_size() for t in motion.tensors.values())
    description["tensor_bytes"] = size
    if args.json:
        print(json.dumps(description, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    info = motion.info
    print(f"motion      {motion.path}")
    print(f"backbone    {info.backbone}")
    print(f"mode        {info.mode}" + (f" (r={info.r}, alpha={info.lora_alpha})" if info.mode == "lora" else ""))
    print(f"target      {info.target}  ({len(info.module_names)} modules, {info.num_parameters:,} parameters)")
    print(f"tensors     {size / 2**20:.2f} MiB")
    keys = ("prompt", "base_model", "num_frames", "height", "width", "steps", "loss_first", "loss_last", "seconds")
    for key in keys:
        if training.get(key) is not None:
            print(f"{key:<11} {training[key]}")
    print(f"noise prior {'yes ' + str(description['noise_prior']) if motion.noise_prior is not None else 'no'}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from motion_adapters.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, seed=args.seed, device=args.device)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
