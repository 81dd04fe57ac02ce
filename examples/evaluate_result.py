"""Score a generated video against the clip its motion came from, and against its prompt.

    python examples/evaluate_result.py generated.mp4 --reference clip.mp4 --prompt "a penguin is walking" \
        --clip-model openai/clip-vit-large-patch14

Motion fidelity (optical flow) needs no weights; the CLIP figures need a CLIP model (a Hub id or a local folder).
Without arguments it scores a shapes-world example: the same zigzag drawn with another shape and colors (high
fidelity) and the reversed zigzag (low).
"""

from __future__ import annotations

import argparse
import json

from motion_adapters.metrics import evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generated", nargs="?")
    parser.add_argument("--reference", default=None)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--clip-model", default=None)
    args = parser.parse_args(argv)
    if args.generated:
        report = evaluate(args.generated, args.reference, args.prompt, clip_model=args.clip_model)
        print(json.dumps(report, indent=2))
        return 0
    from motion_adapters.world import ClipSpec, render_clip

    reference = render_clip(ClipSpec("circle", "red", "blue", "zigzag"), num_frames=8, height=64, width=64)
    same = render_clip(ClipSpec("star", "yellow", "checkered", "zigzag"), num_frames=8, height=64, width=64)
    for name, video in (("same motion, new look", same), ("reversed motion", reference.flip(1))):
        report = evaluate(video, reference)
        print(f"{name:<24} flow_cosine {report['flow_cosine']:+.3f}  trajectory_cosine {report['trajectory_cosine']:+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
