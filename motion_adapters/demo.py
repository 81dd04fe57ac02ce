"""The README's main job: learn a motion from one clip, save it, reload it, and report what happened."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from motion_adapters.config import MotionDistillationConfig
from motion_adapters.models import Show1UNet3DConditionModel
from motion_adapters.serialization import WEIGHTS_NAME, apply_motion_adapter, load_motion_adapter
from motion_adapters.training import train_motion
from motion_adapters.world import ClipSpec, render_clip

TINY_SHOW1 = dict(
    sample_size=32, in_channels=3, out_channels=6, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D", "SimpleCrossAttnDownBlock3D"),
    up_block_types=("SimpleCrossAttnUpBlock3D", "SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"),
    mid_block_type="UNetMidBlock3DSimpleCrossAttn", cross_attention_dim=64, encoder_hid_dim=64,
    encoder_hid_dim_type="text_proj", attention_head_dim=32, addition_embed_type="text",
    addition_embed_type_num_heads=4, norm_num_groups=8, resnet_time_scale_shift="scale_shift", act_fn="gelu",
    cross_attention_norm="group_norm",
)


def run_demo(out_dir: str | Path = "outputs/demo", steps: int | None = None, seed: int = 0) -> dict:
    """Train a temporal adapter on a zigzag clip with a small random Show-1 UNet; save, reload, report.

    Example:
        >>> report = run_demo("outputs/demo", steps=10)  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = Show1UNet3DConditionModel(**TINY_SHOW1).eval()
    spec = ClipSpec("circle", "red", "blue", "zigzag")
    clip = render_clip(spec, num_frames=8, height=32, width=32)
    embeds = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(seed))
    config = MotionDistillationConfig(
        max_train_steps=steps or 30, learning_rate=1e-3, prompt=spec.appearance_invariant_prompt, seed=seed,
        checkpointing_steps=0,
    )
    began = time.perf_counter()
    result = train_motion(unet, clip, embeds, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), config,
                          output_dir=out_dir, training_info={"prompt": config.prompt, "clip": spec.caption})
    fresh = Show1UNet3DConditionModel(**TINY_SHOW1).eval()
    fresh.load_state_dict({k: v for k, v in unet.state_dict().items()}, strict=False)
    torch.manual_seed(seed)
    reloaded = Show1UNet3DConditionModel(**TINY_SHOW1).eval()
    apply_motion_adapter(reloaded, load_motion_adapter(out_dir))
    x = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        same = torch.allclose(unet.eval()(x, t, embeds).sample, reloaded(x, t, embeds).sample, atol=1e-5)
    k = max(1, len(result.losses) // 10)
    report = {
        "clip": spec.caption,
        "trainable_parameters": result.info.num_parameters,
        "total_parameters": sum(p.numel() for p in unet.parameters()),
        "loss_first": sum(result.losses[:k]) / k,
        "loss_last": sum(result.losses[-k:]) / k,
        "steps": result.steps,
        "seconds": round(time.perf_counter() - began, 1),
        "adapter_file_bytes": (out_dir / WEIGHTS_NAME).stat().st_size,
        "reloaded_matches_trained": same,
    }
    for key, value in report.items():
        print(f"{key:<26} {value}")
    return report
