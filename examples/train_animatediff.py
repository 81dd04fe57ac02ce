"""Learn a motion with an AnimateDiff (UNetMotionModel) or ZeroScope (UNet3DConditionModel) backbone.

Real models (GPU, downloads from the Hub):
    python examples/train_animatediff.py clip.mp4 --prompt "a seagull is walking" --backbone animatediff
    python examples/train_animatediff.py clip.mp4 --prompt "a seagull is walking" --backbone zeroscope

Smoke run on tiny random models built from config (CPU, seconds; what CI runs):
    python examples/train_animatediff.py --tiny --out /tmp/motion
"""

from __future__ import annotations

import argparse

import torch
from diffusers import DDPMScheduler

from motion_adapters import MotionDistillationConfig, train_motion
from motion_adapters.video import load_video

HUB = {
    "animatediff": ("emilianJR/epiCRealism", "guoyww/animatediff-motion-adapter-v1-5-2", (512, 512)),
    "zeroscope": ("cerspense/zeroscope_v2_576w", None, (320, 576)),
}


def real_components(backbone: str, device: str):
    """The pipeline of a real backbone: its UNet, VAE and prompt encoder."""
    base, adapter, size = HUB[backbone]
    if backbone == "animatediff":
        from diffusers import AnimateDiffPipeline, MotionAdapter

        pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=MotionAdapter.from_pretrained(adapter))
    else:
        from diffusers import TextToVideoSDPipeline

        pipe = TextToVideoSDPipeline.from_pretrained(base)
    pipe.to(device)

    def encode(prompt: str) -> torch.Tensor:
        return pipe.encode_prompt(prompt, device, 1, False)[0]

    return pipe.unet, pipe.vae, encode, DDPMScheduler.from_config(pipe.scheduler.config), size


def tiny_components(backbone: str):
    """Tiny random stand-ins with the same classes, for a CPU smoke run."""
    from diffusers import AutoencoderKL, UNet3DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    if backbone == "animatediff":
        unet = UNetMotionModel(
            block_out_channels=(32, 32), layers_per_block=1, cross_attention_dim=16, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), motion_max_seq_length=16,
        )
    else:
        unet = UNet3DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16, attention_head_dim=8,
            norm_num_groups=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()

    def encode(prompt: str) -> torch.Tensor:  # a stand-in text encoder: a fixed random embedding per prompt
        seed = sum(map(ord, prompt))
        return torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed))

    return unet, vae, encode, DDPMScheduler(beta_schedule="scaled_linear"), (16, 16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video", nargs="?", help="clip to learn from (default with --tiny: a shapes-world zigzag)")
    parser.add_argument("--prompt", default="a red circle zigzagging")
    parser.add_argument("--backbone", choices=sorted(HUB), default="animatediff")
    parser.add_argument("--mode", choices=("full", "lora"), default="lora")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", default="outputs/animatediff-motion")
    parser.add_argument("--tiny", action="store_true", help="tiny random models, CPU smoke run")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    unet, vae, encode, scheduler, size = tiny_components(args.backbone) if args.tiny else real_components(
        args.backbone, device
    )
    if args.video:
        clip = load_video(args.video, num_frames=8, size=size)
    else:
        from motion_adapters.world import ClipSpec, render_clip

        clip = render_clip(ClipSpec("circle", "red", "blue", "zigzag"), num_frames=8, height=size[0], width=size[1])
    config = MotionDistillationConfig(
        mode=args.mode, max_train_steps=args.steps or (4 if args.tiny else 400), prompt=args.prompt,
        learning_rate=1e-3 if args.tiny else 1e-4,
    )
    result = train_motion(unet, clip, encode(args.prompt), scheduler, config, vae=vae, output_dir=args.out,
                          training_info={"prompt": args.prompt, "backbone": args.backbone})
    print(f"{args.backbone}: trained {result.info.num_parameters:,} parameters in {len(result.info.module_names)} "
          f"{result.info.mode} modules; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
