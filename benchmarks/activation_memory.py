"""What a VMC training step keeps for the backward pass, by the module that keeps it (CPU, exact bytes).

Runs one forward pass of a Show-1 keyframe UNet with show-1-base's block structure (its channel widths scaled by
`--width`, since the bytes of every activation scale with the channels) on 8 x 40 x 64 frames, with only the temporal
attention's q/k/v trainable, as `train_motion` sets it up, and attributes every tensor that autograd saves to the
innermost module running when it is saved. Each storage is counted once; the model's own parameters are not
counted. Compares `frozen_convs="autograd"` with `"input_grad_only"`, and the latter with
`frozen_activations="recompute"` on top (the defaults).

    python benchmarks/activation_memory.py --out benchmarks/results/activation_memory_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_training import git_commit  # noqa: E402

from motion_adapters.injection import inject_temporal_adapter  # noqa: E402
from motion_adapters.lean_backward import frozen_activations_recomputed, frozen_convs_keep_no_input  # noqa: E402
from motion_adapters.models import Show1UNet3DConditionModel, show1_base_config  # noqa: E402
from motion_adapters.training_step import temporal_kernels  # noqa: E402


def build(width: float, seed: int = 0) -> Show1UNet3DConditionModel:
    base = show1_base_config()
    head_dim = 64 * width  # keeps show-1-base's number of spatial attention heads (C / 64) at every level
    if head_dim != int(head_dim) or any((c * width) % 32 for c in base["block_out_channels"]):
        raise SystemExit(f"--width {width} must keep whole heads and 32 norm groups: use 0.5 or 1.")
    channels = [int(c * width) for c in base["block_out_channels"]]
    config = {**base, "block_out_channels": channels, "cross_attention_dim": channels[-1], "encoder_hid_dim": 256,
              "attention_head_dim": int(head_dim)}  # fmt: skip
    torch.manual_seed(seed)
    unet = Show1UNet3DConditionModel(**config).train()
    inject_temporal_adapter(unet, target="temporal_attn.to_[qkv]", mode="full")
    return unet


def saved_bytes(
    unet, frames: int, height: int, width: int, input_grad_convs: bool, recompute: bool = False
) -> dict[str, int]:
    """Bytes autograd keeps for the backward pass of one step, by module class."""
    stack: list[str] = []

    def enter(module, args) -> None:
        stack.append(type(module).__name__)

    def leave(module, args, output) -> None:
        stack.pop()

    hooks = [h for m in unet.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: set[int] = set()
    kept: collections.Counter = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kept[stack[-1] if stack else "UNet"] += storage.nbytes()
        return t

    x = torch.randn(1, 3, frames, height, width)
    text = torch.randn(1, 77, unet.config.encoder_hid_dim)
    try:
        with temporal_kernels(unet, "fast"), frozen_convs_keep_no_input(unet, input_grad_convs), \
                frozen_activations_recomputed(unet, recompute), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(x, torch.tensor([500]), text).sample
        del out
    finally:
        for hook in hooks:
            hook.remove()
    return dict(kept.most_common())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "activation_memory_cpu.json")
    parser.add_argument("--width", type=float, default=0.5, help="fraction of show-1-base's channel widths")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=40)
    parser.add_argument("--image-width", type=int, default=64)
    args = parser.parse_args(argv)
    unet = build(args.width)
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():
        if ".temp_attentions." in name and name.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v"):
            p.requires_grad_(True)
    data = {
        "benchmark": "activation_memory",
        "env": {"python": platform.python_version(), "torch": torch.__version__, "device": "cpu", "dtype": "float32",
                "commit": (git_commit(ROOT) or "")[:12] or None},
        "settings": {**vars(args), "out": str(args.out),
                     "block_out_channels": list(unet.config.block_out_channels)},  # fmt: skip
        "runs": {},
    }
    for name, flags in (("autograd", (False, False)), ("input_grad_only", (True, False)),
                        ("input_grad_only+recompute", (True, True))):
        kept = saved_bytes(unet, args.frames, args.height, args.image_width, *flags)
        data["runs"][name] = {"total_bytes": sum(kept.values()), "by_module": kept}
        print(name, f"{sum(kept.values()) / 2**20:.0f} MiB", {k: f"{v / 2**20:.0f}" for k, v in kept.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    return data


if __name__ == "__main__":
    main()
