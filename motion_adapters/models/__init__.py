"""Video diffusion backbones not in diffusers: Show-1's 3D UNet and its blocks."""

from .blocks_show1 import (
    ResnetDownsampleBlock3D,
    ResnetUpsampleBlock3D,
    SimpleCrossAttnDownBlock3D,
    SimpleCrossAttnUpBlock3D,
    UNetMidBlock3DSimpleCrossAttn,
)
from .unet_show1 import (
    Show1UNet3DConditionModel,
    Show1UNet3DConditionOutput,
    show1_base_config,
    show1_interpolation_config,
    show1_sr1_config,
)

__all__ = [
    "ResnetDownsampleBlock3D",
    "ResnetUpsampleBlock3D",
    "Show1UNet3DConditionModel",
    "Show1UNet3DConditionOutput",
    "SimpleCrossAttnDownBlock3D",
    "SimpleCrossAttnUpBlock3D",
    "UNetMidBlock3DSimpleCrossAttn",
    "show1_base_config",
    "show1_interpolation_config",
    "show1_sr1_config",
]
