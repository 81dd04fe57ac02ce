"""The config rules of Show-1's 3D UNet: block names, extension keys, and the checks that name a bad key.

Kept apart from the model class so `unet_show1.py` holds the architecture and its forward pass.
"""

from __future__ import annotations

from typing import Any

from .blocks_show1 import (
    ResnetDownsampleBlock3D,
    ResnetUpsampleBlock3D,
    SimpleCrossAttnDownBlock3D,
    SimpleCrossAttnUpBlock3D,
)
from .extensions import EXTENSIONS, check_extension

__all__ = ["DOWN_BLOCKS", "EXTENSION_KEYS", "MID_BLOCKS", "UP_BLOCKS", "per_block", "validate_config"]

DOWN_BLOCKS = {
    "ResnetDownsampleBlock3D": ResnetDownsampleBlock3D,
    "SimpleCrossAttnDownBlock3D": SimpleCrossAttnDownBlock3D,
}
UP_BLOCKS = {"ResnetUpsampleBlock3D": ResnetUpsampleBlock3D, "SimpleCrossAttnUpBlock3D": SimpleCrossAttnUpBlock3D}
MID_BLOCKS = ("UNetMidBlock3DSimpleCrossAttn", None)

EXTENSION_KEYS = tuple(EXTENSIONS)
"""Config keys of this class that Show-1's configs do not have; their defaults build Show-1 exactly."""

# Config keys whose other values select architectures this class does not build: key -> (allowed values, reason).
_RESTRICTED_KEYS = {
    "num_attention_heads": ((None,), "heads are derived from attention_head_dim, as in the reference"),
    "dual_cross_attention": ((False,), "only Transformer2DModel blocks use it and Show-1 has none"),
    "use_linear_projection": ((False,), "only Transformer2DModel blocks use it and Show-1 has none"),
    "upcast_attention": ((False,), "only Transformer2DModel blocks use it; the joint attention always upcasts"),
    "time_embedding_type": (("positional",), "Show-1 uses sinusoidal timestep projections"),
    "time_cond_proj_dim": ((None,), "timestep conditioning is not part of Show-1"),
    "encoder_hid_dim_type": ((None, "text_proj"), "Show-1 projects T5 states with a Linear layer"),
    "class_embed_type": ((None, "timestep"), "the SR stage embeds its noise level like a timestep"),
    "num_class_embeds": ((None,), "Show-1 has no learned class table"),
    "projection_class_embeddings_input_dim": ((None,), "only projection class embeddings use it"),
    "addition_embed_type": ((None, "text"), "Show-1 pools the T5 states into the time embedding"),
    "addition_time_embed_dim": ((None,), "only addition_embed_type 'text_time' uses it"),
    "resnet_time_scale_shift": (("default", "scale_shift"), "ResnetBlock2D supports these"),
    "cross_attention_norm": ((None, "group_norm", "layer_norm"), "Attention supports these"),
}



def per_block(name: str, value: Any, num_blocks: int) -> list:
    """One value per down block: a list or tuple as given (its length checked), a single value repeated.

    Example:
        >>> per_block("layers_per_block", 2, 3)
        [2, 2, 2]
    """
    if isinstance(value, (list, tuple)):
        if len(value) != num_blocks:
            raise ValueError(
                f"`{name}` has {len(value)} entries but there are {num_blocks} down blocks; give one per block."
            )
        return list(value)
    return [value] * num_blocks


def validate_config(config: dict[str, Any]) -> None:
    """Raise ValueError naming the key for every config value `Show1UNet3DConditionModel` cannot honour."""
    for key, (allowed, reason) in _RESTRICTED_KEYS.items():
        if config[key] not in allowed:
            raise ValueError(f"`{key}={config[key]!r}` is not supported ({reason}); use one of {list(allowed)}.")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for key, names, known in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"`{key}` has unsupported blocks {unknown}; Show-1 blocks are {sorted(known)}.")
    if config["mid_block_type"] not in MID_BLOCKS:
        raise ValueError(
            f"`mid_block_type={config['mid_block_type']!r}` is not supported; use one of {list(MID_BLOCKS)}."
        )
    if not (len(down) == len(up) == len(config["block_out_channels"])):
        raise ValueError(
            f"`down_block_types` ({len(down)}), `up_block_types` ({len(up)}) and `block_out_channels` "
            f"({len(config['block_out_channels'])}) must have the same length."
        )
    for key in ("layers_per_block", "only_cross_attention"):
        per_block(key, config[key], len(down))
    if any(
        n != 1 for n in per_block("transformer_layers_per_block", config["transformer_layers_per_block"], len(down))
    ):
        raise ValueError(
            f"`transformer_layers_per_block={config['transformer_layers_per_block']!r}` is not supported: each Show-1 "
            "layer has one joint attention and one temporal transformer; use 1."
        )
    head_dim = config["attention_head_dim"]
    if not isinstance(head_dim, int):
        raise ValueError(f"`attention_head_dim` must be one int for all blocks (Show-1 uses 64), got {head_dim!r}.")
    if not isinstance(config["cross_attention_dim"], int):
        raise ValueError(f"`cross_attention_dim` must be one int, got {config['cross_attention_dim']!r}.")
    if config["norm_num_groups"] is None:
        raise ValueError("`norm_num_groups=None` is not supported: every Show-1 block uses group norms; use 32.")
    channels = config["block_out_channels"]
    attended = [c for c, n in zip(channels, down) if n.startswith("SimpleCrossAttn")]
    attended += [c for c, n in zip(reversed(channels), up) if n.startswith("SimpleCrossAttn")]
    attended += [channels[-1]] if config["mid_block_type"] else []
    if any(c % head_dim for c in attended):
        raise ValueError(
            f"`block_out_channels` of attention blocks {sorted(set(attended))} must be multiples of "
            f"`attention_head_dim={head_dim}`."
        )
    if config["encoder_hid_dim_type"] is not None and config["encoder_hid_dim"] is None:
        raise ValueError("`encoder_hid_dim_type='text_proj'` needs `encoder_hid_dim` (4096 for T5 XXL).")
    for key, (default, *_) in EXTENSIONS.items():
        check_extension(key, config.get(key, default))
