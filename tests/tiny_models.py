"""Tiny video UNets built from config for the tests (never downloaded)."""

import torch
from diffusers import UNet3DConditionModel, UNetMotionModel


def tiny_unet3d(seed: int = 0) -> UNet3DConditionModel:
    torch.manual_seed(seed)
    return UNet3DConditionModel(
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=4,
        sample_size=8,
        in_channels=4,
        out_channels=4,
    ).eval()


def tiny_unet_motion(seed: int = 0) -> UNetMotionModel:
    torch.manual_seed(seed)
    return UNetMotionModel(
        block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=32,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        motion_max_seq_length=16,
        num_attention_heads=2,
        motion_num_attention_heads=2,
    ).eval()


def run_unet(unet, seed: int = 1, frames: int = 4) -> torch.Tensor:
    """One deterministic forward pass with the input layout each class expects."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    sample = torch.randn(1, 4, frames, 8, 8, generator=g)
    if isinstance(unet, UNetMotionModel):  # AnimateDiff's UNet wants the text states repeated per frame
        text = text.repeat_interleave(frames, dim=0)
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), encoder_hidden_states=text).sample
