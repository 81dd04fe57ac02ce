"""What "temporal attention" means for each backbone class, and how a target pattern becomes module names.

A target is either:

- a string starting with an alias (`temporal_attn`, `spatial_attn`) followed by a glob over the rest of the
  module path, e.g. `"temporal_attn.to_[qkv]"` or `"temporal_attn.to_*"`. The alias resolves, per backbone
  class, to the attention modules of that kind; the glob (fnmatch syntax, with character classes) must match the
  remaining path below one of them; it selects the `nn.Linear` layers among the modules it matches;
- any other string: a regular expression that must match a full module name (peft's rule for a string);
- a list of names: a module matches when its name equals an entry or ends with "." + entry (peft's rule).

Adding a backbone is one `register_backbone` call.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

import torch.nn as nn

ALIASES = ("temporal_attn", "spatial_attn")


@dataclass(frozen=True)
class BackboneTargets:
    r"""Regular expressions, over full module names, of one backbone class's attention modules.

    Attributes:
        temporal_attn: matches each temporal (frame-axis) attention module, e.g. `...attn1`.
        spatial_attn: matches each spatial (self and cross) attention module.
        default_size: the (height, width) the backbone generates natively, for clips without an explicit size.
        pixel_space: True when the UNet denoises pixels (Show-1); False for latent models that need a VAE.
        text_per_frame: True when the UNet wants `encoder_hidden_states` repeated once per frame (AnimateDiff's
            UNetMotionModel); False when it repeats them itself.

    Example:
        >>> spec = BackboneTargets(temporal_attn=r".*temp_attentions\\.\\d+\\.transformer_blocks\\.\\d+\\.attn[12]",
        ...                        spatial_attn=r".*attentions\\.\\d+")
    """

    temporal_attn: str
    spatial_attn: str
    default_size: tuple[int, int] = (256, 256)
    pixel_space: bool = False
    text_per_frame: bool = False


_REGISTRY: dict[str, BackboneTargets] = {}


def register_backbone(class_name: str, targets: BackboneTargets) -> None:
    """Teach the target grammar a backbone class, by its class name.

    Example:
        >>> register_backbone("MyVideoUNet", BackboneTargets(r".*time_attn", r".*space_attn"))
    """
    _REGISTRY[class_name] = targets


def backbone_targets(model: nn.Module) -> BackboneTargets:
    """Return the registered targets of `model`'s class (or of its nearest registered base class).

    Raises:
        ValueError: for a class no entry knows, naming the known classes.

    Example:
        >>> from diffusers import UNet3DConditionModel
        >>> backbone_targets(UNet3DConditionModel).pixel_space  # a class works as well as an instance
        False
    """
    cls = model if isinstance(model, type) else type(model)
    for klass in cls.__mro__:
        if klass.__name__ in _REGISTRY:
            return _REGISTRY[klass.__name__]
    raise ValueError(
        f"{cls.__name__} has no registered temporal attention: known backbones are "
        f"{', '.join(sorted(_REGISTRY))}. Pass target as a regex or a list of module names, or call "
        f"motion_adapters.targets.register_backbone({cls.__name__!r}, BackboneTargets(...))."
    )


def backbone_name(model: nn.Module) -> str:
    """The class name recorded in adapter files: the registered class `model` is or derives from."""
    for klass in type(model).__mro__:
        if klass.__name__ in _REGISTRY:
            return klass.__name__
    return type(model).__name__


_ATTN = r"transformer_blocks\.\d+\.attn[12]"
register_backbone(
    "Show1UNet3DConditionModel",
    BackboneTargets(
        temporal_attn=rf"(.*\.)?temp_attentions\.\d+\.{_ATTN}",
        spatial_attn=r"(.*\.)?attentions\.\d+",
        default_size=(40, 64),
        pixel_space=True,
    ),
)
register_backbone(
    "UNet3DConditionModel",
    BackboneTargets(
        temporal_attn=rf"((.*\.)?temp_attentions\.\d+|transformer_in)\.{_ATTN}",
        spatial_attn=rf"(.*\.)?attentions\.\d+\.{_ATTN}",
        default_size=(320, 576),
    ),
)
register_backbone(
    "UNetMotionModel",
    BackboneTargets(
        temporal_attn=rf"(.*\.)?motion_modules\.\d+\.{_ATTN}",
        spatial_attn=rf"(.*\.)?attentions\.\d+\.{_ATTN}",
        default_size=(256, 256),
        text_per_frame=True,
    ),
)


def resolve_target(model: nn.Module, target: str | list[str]) -> list[str]:
    """Return the names of the `nn.Linear` modules of `model` that `target` selects, in module order.

    Raises:
        ValueError: if nothing matches (listing the closest Linear module names), or if a match is not a Linear.

    Example:
        >>> from diffusers import UNetMotionModel
        >>> unet = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        ...     cross_attention_dim=32, down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        ...     up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"))
        >>> resolve_target(unet, "temporal_attn.to_q")[0]
        'down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q'
    """
    modules = {n: m for n, m in model.named_modules() if not _inside_adapter(n)}
    matcher = _matcher(model, target)
    names = [name for name in modules if name and matcher(name)]
    if isinstance(target, str) and target.partition(".")[0] in ALIASES:
        # an alias pattern selects the Linear layers it matches ("temporal_attn.to_*" skips to_out's Dropout)
        names = [name for name in names if _is_linear(modules[name])]
    if not names:
        raise ValueError(
            f"target={target!r} matches no module of {type(model).__name__}. Closest Linear module names: "
            f"{', '.join(_closest(model, modules, target)) or '(none)'}. Use an alias pattern like "
            f"'temporal_attn.to_[qkv]', a regex over full names, or a list of names."
        )
    not_linear = [n for n in names if not _is_linear(modules[n])]
    if not_linear:
        raise ValueError(
            f"target={target!r} matches modules that are not nn.Linear: {', '.join(not_linear[:5])}. "
            f"Narrow the pattern to the projection layers (e.g. add '.to_[qkv]')."
        )
    return names


_ADAPTER_PARTS = re.compile(r"\.(base_layer|lora_[A-Za-z_]+)(\.|$)")


def _inside_adapter(name: str) -> bool:
    """True for the submodules peft adds inside a wrapped layer (base_layer, lora_A, ...)."""
    return _ADAPTER_PARTS.search(name) is not None


def _is_linear(module: nn.Module) -> bool:
    """A Linear layer, or a peft LoRA wrapper around one (so a second adapter can target the same layers)."""
    get_base = getattr(module, "get_base_layer", None)
    return isinstance(module, nn.Linear) or (get_base is not None and isinstance(get_base(), nn.Linear))


def _closest(model: nn.Module, modules: dict[str, nn.Module], target: str | list[str]) -> list[str]:
    linear = [n for n, m in modules.items() if _is_linear(m)]
    probe = target if isinstance(target, str) else target[0]
    alias, _, rest = probe.partition(".")
    if alias in ALIASES:  # suggest alias patterns built from the layers that really sit under that alias
        base = re.compile(rf"(?:{getattr(backbone_targets(model), alias)})\.(?P<tail>.+)")
        tails = sorted({m.group("tail") for n in linear if (m := base.fullmatch(n))})
        return [f"{alias}.{t}" for t in difflib.get_close_matches(rest, tails, n=5, cutoff=0.0)]
    return difflib.get_close_matches(probe, linear, n=5, cutoff=0.0)


def _matcher(model: nn.Module, target: str | list[str]):
    if isinstance(target, (list, tuple)):
        if not target or not all(isinstance(t, str) and t for t in target):
            raise ValueError(f"target={target!r}: a list target must hold non-empty module names.")
        keys = list(target)
        return lambda name: any(name == k or name.endswith("." + k) for k in keys)
    if not isinstance(target, str) or not target:
        raise ValueError(f"target={target!r} must be a pattern string or a list of module names.")
    alias, _, rest = target.partition(".")
    if alias in ALIASES:
        base = getattr(backbone_targets(model), alias)
        if not rest:
            raise ValueError(
                f"target={target!r} names only the attention modules; add the projections to adapt, "
                f"e.g. '{alias}.to_[qkv]'."
            )
        pattern = re.compile(rf"(?:{base})\.{fnmatch.translate(rest)}")
    else:
        try:
            pattern = re.compile(target)
        except re.error as err:
            raise ValueError(f"target={target!r} is not a valid regular expression: {err}.") from err
    return lambda name: pattern.fullmatch(name) is not None
