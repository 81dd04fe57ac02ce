"""Where do a training step's activations and gradients leave channels-last, or bf16?

Runs `train_motion`'s step on show-1-base (`--tiny`: a tiny Show-1 UNet) and records, for every block-level module
(each ResNet, temporal convolution layer, spatial and temporal attention, sampler, and the UNet's input and
output layers), the memory layout and dtype of its input and output in the forward pass and of their gradients
in the backward pass. A gradient that arrives in another layout than its activation costs a copy at the next
layer that needs channels-last (a convolution's, a fused norm's); a float32 one costs casts. On CUDA the step is
`train_motion`'s own (eager, after two warm-up steps); on the CPU, the same layer swaps entered by hand with the
norms in Triton's interpreter (`TRITON_INTERPRET=1`, as the tests run them), since `train_motion` keeps the fused
kernels to CUDA.

    python benchmarks/trace_layouts.py --out benchmarks/results/layouts_h200.json
    TRITON_INTERPRET=1 python benchmarks/trace_layouts.py --tiny --out /tmp/layouts.json
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import MODULE_SETTINGS, TINY, build_unet, environment, inputs, write  # noqa: E402

from motion_adapters.models import show1_base_config  # noqa: E402

#: the modules traced: a block's layers, the samplers, and the UNet's first and last layers
BLOCK_MODULES = re.compile(
    r"((down|up)_blocks\.\d+|mid_block)\.(resnets|temp_convs|attentions|temp_attentions|upsamplers|downsamplers)\.\d+"
    r"|conv_in|conv_norm_out|conv_out"
)


def layout(t: torch.Tensor) -> str:
    """"channels_last", "contiguous", or the strides, then "/" and the dtype: `channels_last/bfloat16`."""
    if t.dim() in (4, 5):
        cl = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        kind = "channels_last" if t.is_contiguous(memory_format=cl) else None
    else:
        kind = None
    if kind is None:
        kind = "contiguous" if t.is_contiguous() else "strides " + ",".join(map(str, t.stride()))
    return f"{kind}/{str(t.dtype).removeprefix('torch.')}"


class LayoutTrace:
    """Forward hooks on `unet`'s block modules recording layouts while `on`, and tensor hooks for the gradients."""

    def __init__(self, unet: torch.nn.Module):
        self.on = False
        self.records: dict[str, dict] = {}
        self.handles = [module.register_forward_hook(self._hook(name))
                        for name, module in unet.named_modules() if BLOCK_MODULES.fullmatch(name)]  # fmt: skip

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self.on:
                return
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            record = self.records.setdefault(name, {"module": type(module).__name__})
            tensors = {"input": args[0] if args and isinstance(args[0], torch.Tensor) else None, "output": out}
            for role, tensor in tensors.items():
                if tensor is None:
                    continue
                record[role] = layout(tensor)
                if tensor.requires_grad:
                    tensor.register_hook(lambda grad, role=role: record.__setitem__(f"{role}_grad", layout(grad)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _trainable_qkv(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [m.weight for n, m in unet.named_modules()
            if ".temp_attentions." in f".{n}." and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]  # fmt: skip


def trace_cuda(unet, video, embeds, trace: LayoutTrace) -> None:
    from diffusers import DDPMScheduler

    from motion_adapters.config import MotionDistillationConfig
    from motion_adapters.training import train_motion

    def callback(state) -> None:
        trace.on = state.step == 2  # the third step's forward and backward

    config = MotionDistillationConfig(max_train_steps=3, seed=0, checkpointing_steps=0, mixed_precision="bf16",
                                      cuda_graph="no", num_frames=video.shape[2])  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    train_motion(unet, video, embeds, scheduler, config, progress=False, callbacks=[callback])


def trace_cpu(unet, embeds, frames: int, size: int, trace: LayoutTrace) -> None:
    """`train_motion`'s channels-last layer swaps entered by hand, one bf16 autocast step (CPU: a code check)."""
    from motion_adapters import layout as layouts
    from motion_adapters.lean_backward import (
        frozen_activations_recomputed,
        frozen_convs_keep_no_input,
        norms_in_compute_dtype,
    )
    from motion_adapters.training_step import temporal_kernels

    unet.requires_grad_(False).train()
    for weight in _trainable_qkv(unet):
        weight.data = weight.data.float()  # float32 masters, as train_motion keeps them
        weight.requires_grad_(True)
    x = torch.randn(1, unet.config.in_channels, frames, size, size)
    trace.on = True
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with temporal_kernels(unet, "triton_fast"), layouts.channels_last_training(unet, True, True), \
            frozen_convs_keep_no_input(unet, True), norms_in_compute_dtype(unet, True), \
            frozen_activations_recomputed(unet, True, False, True), autocast:  # fmt: skip
        unet(x, torch.tensor([500]), embeds.bfloat16()).sample.float().square().mean().backward()


def summary(records: dict[str, dict]) -> dict:
    """How many traced tensors of each role were in each layout (forward and gradient)."""
    counts = {}
    for record in records.values():
        for role in ("input", "output", "input_grad", "output_grad"):
            if role in record:
                counts.setdefault(role, collections.Counter())[record[role]] += 1
    return {role: dict(counter.most_common()) for role, counter in counts.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layouts_h200.json"))
    parser.add_argument("--tiny", action="store_true", help="a tiny Show-1 UNet: a CPU check of the code")
    parser.add_argument("--variant", default=None, choices=sorted(MODULE_SETTINGS),
                        help="trace with the module settings of this bench_training.py variant")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in MODULE_SETTINGS.get(args.variant, [])]
    for module, attr, value in MODULE_SETTINGS.get(args.variant, []):
        setattr(module, attr, value)
    try:
        return _main(args)
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _main(args) -> dict:

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = {**show1_base_config(), **(TINY if args.tiny else {})}
    frames, height, width = 8, (16 if args.tiny else 40), (16 if args.tiny else 64)
    unet = build_unet(config, 0, device, torch.bfloat16)
    video, embeds = inputs(frames, height, width, 77, config["encoder_hid_dim"], device)
    trace = LayoutTrace(unet)
    try:
        if device.type == "cuda":
            trace_cuda(unet, video, embeds, trace)
        else:
            if height != width:
                raise ValueError("the CPU trace takes square frames")
            trace_cpu(unet, embeds, frames, height, trace)
    finally:
        trace.remove()
    data = {"benchmark": "layouts", "env": environment(device, args.commit),
            "settings": {"model": "tiny" if args.tiny else "show-1-base (random weights)", "frames": frames,
                         "height": height, "width": width, "variant": args.variant,
                         "step": "train_motion" if device.type == "cuda" else "layer swaps by hand, bf16 autocast"},
            "summary": summary(trace.records), "modules": trace.records}  # fmt: skip
    write(args.out, data)
    for name, record in trace.records.items():
        print(f"{name:36s} " + "  ".join(f"{k} {v}" for k, v in record.items() if k != "module"), flush=True)
    print(data["summary"], flush=True)
    return data


if __name__ == "__main__":
    main()
