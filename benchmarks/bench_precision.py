"""What rounding the frozen layers' matrix products to a lower precision does to one VMC training step (CPU).

The step `bench_training.py` times (show-1-base with its random weights, 8 frames at 40 x 64, the square moving
right, the released cosine loss, the same timestep and noise draws), in float32 on the CPU, once exactly and once
per precision with the inputs and weights of the UNet's convolutions and linear layers rounded to that precision
before their products: the products summed in float32 as tensor cores sum them, each output rounded to bf16 (fp16
for fp16, as autocast rounds), the trained q/k/v in bf16 (fp16) throughout. Everything else (norms, attention
products, activations) stays float32, so this isolates what the matrix products' inputs lose. The formats:

- `float16`: what the reference loop's fp16 autocast rounds;
- `bfloat16`: what `train_motion`'s bf16 weights and activations round;
- `e4m3` (fp8): the frozen layers' weights per output channel and their inputs per tensor scaled to e4m3's range
  (448) and rounded to its 3-bit mantissa, the weights so stored for the backward pass too (the gradients flowing
  back are not rounded); `e4m3_rows` the inputs scaled per row instead (a pixel's or a token's channels, as
  row-wise scaled fp8 GEMMs take them); `e4m3_convs` as `e4m3` for the 3 x 3 and temporal convolutions only, the
  rest bf16.

Each is compared with the exact step at the same dropout masks: the noise prediction's relative error, the loss,
and the q/k/v gradient's cosine and relative error; `float32_other_dropout` (the exact step with other dropout
masks) is the noise scale the training benchmark judges loss trajectories by. The inputs' scale is the tensor's own
amax (no delayed scaling), so fp8 here is as good as a per-tensor scheme gets.

    python benchmarks/bench_precision.py --out benchmarks/results/precision_cpu.json   # about 30 minutes, 2 cores
    python benchmarks/bench_precision.py --tiny --out /tmp/precision_tiny.json          # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import (  # noqa: E402
    TINY,
    build_unet,
    draw,
    environment,
    inputs,
    released_loss,
    temporal_qkv_trainable,
    write,
)
from diffusers import DDPMScheduler  # noqa: E402

from motion_adapters.models import show1_base_config  # noqa: E402

#: name -> (format of the frozen layers, of their outputs, of the trained q/k/v; which frozen layers: "all" or
#: "convs"; the dropout seed); "e4m3_rows": e4m3 with one scale a row of the inputs
VARIANTS = {
    "float32": (None, None, None, "all", 0),
    "float32_other_dropout": (None, None, None, "all", 1),
    "float16": ("float16", "float16", "float16", "all", 0),
    "bfloat16": ("bfloat16", "bfloat16", "bfloat16", "all", 0),
    "e4m3": ("e4m3", "bfloat16", "bfloat16", "all", 0),
    "e4m3_rows": ("e4m3_rows", "bfloat16", "bfloat16", "all", 0),
    "e4m3_convs": ("e4m3", "bfloat16", "bfloat16", "convs", 0),
}
E4M3_MAX = 448.0
LAYERS = (nn.Conv2d, nn.Conv3d, nn.Linear)


def rounded(x: torch.Tensor, fmt: str | None, channel_scales: bool = False, rows: int | None = None) -> torch.Tensor:
    """`x`'s values as `fmt` holds them, in x's dtype (float32): bfloat16, float16, or e4m3 scaled to its range.

    e4m3 takes one scale a tensor, with `channel_scales` one a slice along the first dimension (a weight's output
    channels), or with `rows` one a slice across dimension `rows` (an activation's channels: one scale a pixel or
    token), so that the largest magnitude of each lands on 448.

    Example:
        >>> rounded(torch.tensor([1.0 + 2**-9]), "bfloat16").item()
        1.0
    """
    if fmt is None:
        return x
    if fmt in ("bfloat16", "float16"):
        return x.to(getattr(torch, fmt)).to(x.dtype)
    if fmt != "e4m3":
        raise ValueError(f"fmt={fmt!r} must be 'bfloat16', 'float16', 'e4m3' or None.")
    if rows is not None:
        dims = (rows,)
    elif channel_scales and x.dim() > 1:
        dims = tuple(range(1, x.dim()))
    else:
        dims = tuple(range(x.dim()))
    scale = (x.detach().abs().amax(dim=dims, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (x / scale).to(torch.float8_e4m3fn).to(x.dtype) * scale


def _straight_through(x: torch.Tensor, fmt: str | None, **kwargs) -> torch.Tensor:
    """`rounded(x)` forward, the identity backward (the gradient reaching x is not rounded)."""
    return x if fmt is None else x + (rounded(x, fmt, **kwargs) - x).detach()


def simulate(unet: nn.Module, frozen: str | None, output: str | None, trained: str | None, which: str) -> list:
    """Make every convolution and linear layer of `unet` compute as the docstring at the top says; return the
    (module, original forward) pairs to undo it with `restore`."""
    patched = []
    for module in unet.modules():
        if not isinstance(module, LAYERS):
            continue
        trainable = module.weight.requires_grad
        is_conv = isinstance(module, (nn.Conv2d, nn.Conv3d)) and max(module.kernel_size) > 1
        fmt = trained if trainable else frozen if (which == "all" or is_conv) else trained
        if fmt is None and output is None:
            continue
        # e4m3_rows: the inputs scaled a row of channels (dimension 1 of a convolution's, the last of a linear's)
        rows = (-1 if isinstance(module, nn.Linear) else 1) if fmt == "e4m3_rows" else None
        fmt = "e4m3" if fmt == "e4m3_rows" else fmt

        def forward(x, module=module, fmt=fmt, trainable=trainable, rows=rows):
            if trainable:  # the trained weight keeps its gradient
                weight = _straight_through(module.weight, fmt, channel_scales=True)
            else:
                with torch.no_grad():
                    weight = rounded(module.weight, fmt, channel_scales=True)
            x = _straight_through(x, fmt, rows=rows)
            if isinstance(module, nn.Linear):
                y = F.linear(x, weight, module.bias)
            else:
                y = module._conv_forward(x, weight, module.bias)
            return _straight_through(y, output)

        patched.append((module, vars(module).get("forward")))
        module.forward = forward
    return patched


def restore(patched: list) -> None:
    for module, previous in patched:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def step(unet, params, video, embeds, abar, t, noise, dropout_seed):
    """One forward and backward pass of the released loss: (noise prediction, loss, flat q/k/v gradient)."""
    for p in params:
        p.grad = None
    a = abar[t].view(-1, 1, 1, 1, 1)
    noisy = a.sqrt() * video + (1 - a).sqrt() * noise
    torch.manual_seed(dropout_seed)  # dropout masks (the checkpointed recomputation restores the state)
    eps = unet(noisy, t, encoder_hidden_states=embeds).sample[:, :3].float()
    loss = released_loss(eps, noise)
    loss.backward()
    return eps.detach(), loss.item(), torch.cat([p.grad.flatten() for p in params])


def compare(result, reference) -> dict:
    """The noise prediction's relative error, the loss difference, the gradient's cosine and relative error."""
    eps, loss, grad = result
    eps_ref, loss_ref, grad_ref = reference
    return {
        "loss": loss,
        "loss_difference": loss - loss_ref,
        "eps_relative_error": ((eps - eps_ref).norm() / eps_ref.norm()).item(),
        "grad_cosine": F.cosine_similarity(grad.double(), grad_ref.double(), dim=0).item(),
        "grad_relative_error": ((grad - grad_ref).double().norm() / grad_ref.double().norm()).item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision_cpu.json"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--draws", type=int, default=3, help="timestep and noise draws: the benchmark's first steps")
    parser.add_argument("--tiny", action="store_true", help="a tiny Show-1 UNet: a smoke test of the code")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown --variants {unknown}; known: {', '.join(VARIANTS)}")
    names = ["float32"] + [n for n in names if n != "float32"]  # the reference first
    config = {**show1_base_config(), **(TINY if args.tiny else {})}
    frames, height, width = 8, (16 if args.tiny else 40), (16 if args.tiny else 64)
    device = torch.device("cpu")
    unet = build_unet(config, seed=0, device=device, dtype=torch.float32)
    unet.enable_gradient_checkpointing()  # float32 activations of the whole step would not fit beside the weights
    unet.train()
    params = temporal_qkv_trainable(unet)
    video, embeds = inputs(frames, height, width, 77, config["encoder_hid_dim"], device)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    abar = scheduler.alphas_cumprod.to(torch.float32)
    data = {
        "benchmark": "precision",
        "env": environment(device, args.commit),
        "settings": {"model": "tiny" if args.tiny else "show-1-base (random weights)", "frames": frames,
                     "height": height, "width": width, "loss": "cos/official", "draws": args.draws,
                     "trained_parameters": sum(p.numel() for p in params),
                     "threads": torch.get_num_threads()},
        "variants": {n: {"frozen": VARIANTS[n][0], "outputs": VARIANTS[n][1], "trained": VARIANTS[n][2],
                         "layers": VARIANTS[n][3], "dropout_seed": VARIANTS[n][4]} for n in names},
        "draws": [],
    }
    for index in range(args.draws):
        t, noise = draw(scheduler, video.shape, seed=0, step=index)  # bench_training's draws, seed 0
        entry = {"t": int(t), "runs": {}}
        data["draws"].append(entry)
        reference = None
        for name in names:
            frozen, output, trained, which, seed = VARIANTS[name]
            patched = simulate(unet, frozen, output, trained, which)
            start = time.perf_counter()
            try:
                result = step(unet, params, video, embeds, abar, t, noise, seed)
            finally:
                restore(patched)
            if reference is None:
                reference = result
            entry["runs"][name] = {**compare(result, reference), "seconds": round(time.perf_counter() - start, 1)}
            print(index, int(t), name, entry["runs"][name], flush=True)
            del result
            write(args.out, data)
    return data


if __name__ == "__main__":
    main()
