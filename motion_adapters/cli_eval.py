"""The `motion-adapters eval` subcommand: score a generated clip and print the figures as JSON."""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK = 0


def add_eval_command(sub) -> None:
    """Register ``eval`` on the CLI's subparsers.

    Example:
        >>> parser = argparse.ArgumentParser(prog="motion-adapters")
        >>> add_eval_command(parser.add_subparsers(dest="command"))
        >>> parser.parse_args(["eval", "out.mp4", "--all-frames"]).all_frames
        True
    """
    ev = sub.add_parser(
        "eval",
        help="score a generated clip: CLIP text alignment and temporal consistency, motion fidelity by optical flow",
        description=(
            "Score a generated clip and print the figures as JSON. CLIP figures use --clip-model, or the default "
            "CLIP model when it is in the local Hugging Face cache (never downloaded unasked); flow figures need "
            "--reference. Figures that cannot be computed are null, with a reason."
        ),
    )
    ev.add_argument("generated", help="the generated clip: an mp4/webm/gif file or a folder of frames")
    ev.add_argument("--reference", default=None, help="the clip whose motion should be reproduced (flow figures)")
    ev.add_argument("--prompt", default=None, help="the prompt the clip was generated from (text alignment)")
    ev.add_argument(
        "--clip-model",
        default=None,
        help="a CLIP Hub id or local folder (default: the cached openai/clip-vit-large-patch14, if any)",
    )
    ev.add_argument(
        "--all-frames",
        action="store_true",
        help="score every frame with CLIP (default: the keyframes, every 4th frame of 29-frame outputs)",
    )
    ev.add_argument("--device", default=None, help="where the CLIP model runs: cpu, cuda, cuda:1 ... (default: cpu)")
    ev.add_argument("--json-out", default=None, help="also write the JSON to this file")
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``eval``: compute the figures, print them as JSON, optionally write them to ``--json-out``.

    Example:
        >>> cmd_eval(argparse.Namespace(generated="out.mp4", reference="clip.mp4", prompt=None, clip_model=None,
        ...                             all_frames=False, device=None, json_out=None))  # doctest: +SKIP
        0
    """
    from motion_adapters.metrics.evaluation import evaluate
    from motion_adapters.serialization import atomic_write_text

    result = evaluate(
        args.generated,
        reference=args.reference,
        prompt=args.prompt,
        clip_model=args.clip_model,
        frame_indices="all" if args.all_frames else "keyframes",
        device=args.device,
    )
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    print(text)
    for key in ("clip_unavailable", "flow_unavailable"):
        if key in result:
            print(f"motion-adapters eval: note: {result[key]}", file=sys.stderr)
    return EXIT_OK
