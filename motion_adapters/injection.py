"""inject_temporal_adapter: make a video UNet's temporal attention trainable (full or LoRA), and undo it.

Two modes, one bookkeeping record per adapter name:

- "full": the matched Linear weights themselves become trainable; everything else is frozen. The original
  weights are kept (on the CPU) so the adapter can be unloaded or rescaled: a loaded full adapter is the delta
  W_motion - W_base, applied as W = W_base + sum_i scale_i * delta_i.
- "lora": peft's LoRA layers are injected on exactly the matched modules (`peft.inject_adapter_in_model`);
  zero-initialised B leaves the outputs identical to the base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from motion_adapters.config import MODES, MotionDistillationConfig
from motion_adapters.targets import backbone_name, resolve_target

STATE_ATTR = "_motion_adapters_state"


@dataclass
class AdapterInfo:
    """What one adapter adapted: written into adapter files and shown by `motion-adapters inspect`.

    Attributes:
        adapter_name: the adapter's name on the model.
        mode: "full" or "lora".
        target: the target pattern it was built from.
        backbone: the backbone class name.
        module_names: the adapted Linear modules, in model order.
        num_parameters: trainable parameters of the adapter.
        r: LoRA rank (LoRA only).
        lora_alpha: LoRA alpha (LoRA only).
        lora_dropout: LoRA dropout (LoRA only).
    """

    adapter_name: str
    mode: str
    target: str | list[str]
    backbone: str
    module_names: list[str]
    num_parameters: int
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        return asdict(self)


@dataclass
class _AdapterState:
    infos: dict[str, AdapterInfo] = field(default_factory=dict)
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # full mode: originals, on CPU
    deltas: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # full-mode motions: trained weights
    scales: dict[str, float] = field(default_factory=dict)


def _state(unet: nn.Module) -> _AdapterState:
    state = unet.__dict__.get(STATE_ATTR)
    if state is None:
        state = _AdapterState()
        unet.__dict__[STATE_ATTR] = state
    return state


def adapter_infos(unet: nn.Module) -> dict[str, AdapterInfo]:
    """The adapters currently on `unet`, by name.

    Example:
        >>> adapter_infos(torch.nn.Linear(2, 2))
        {}
    """
    state = unet.__dict__.get(STATE_ATTR)
    return dict(state.infos) if state else {}


def inject_temporal_adapter(
    unet: nn.Module,
    target: str | list[str] | None = None,
    mode: str | None = None,
    *,
    adapter_name: str = "default",
    r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    config: MotionDistillationConfig | None = None,
) -> AdapterInfo:
    """Make the temporal attention projections of a video UNet trainable, and freeze everything else.

    Arguments left as `None` come from `config` when given, else from `MotionDistillationConfig`'s defaults
    (target "temporal_attn.to_[qkv]", mode "full", r 16, lora_alpha 16, lora_dropout 0).

    Args:
        unet: a video UNet whose class is registered in `motion_adapters.targets` (Show-1, diffusers'
            UNet3DConditionModel or UNetMotionModel), or any module when `target` is a regex or a name list.
        target: which Linear layers to adapt, e.g. "temporal_attn.to_[qkv]" (the paper's 132 matrices on
            show-1-base), "temporal_attn.to_*", "spatial_attn.to_[qkv]", a regex, or a list of names.
        mode: "full" (train the matched weights) or "lora" (train LoRA factors beside them).
        adapter_name: the adapter's name; several LoRA adapters can coexist, one full adapter at a time.
        r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        config: a `MotionDistillationConfig` supplying the arguments left as `None`.

    Returns:
        An `AdapterInfo` naming what was adapted and how many parameters train.

    Raises:
        ValueError: for an unknown mode, a pattern matching nothing (with the closest names), a name already in
            use, or a second full adapter.

    Example:
        >>> from diffusers import UNet3DConditionModel
        >>> unet = UNet3DConditionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        ...     cross_attention_dim=32, attention_head_dim=8,
        ...     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        ...     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
        >>> info = inject_temporal_adapter(unet, "temporal_attn.to_[qkv]", mode="lora", r=4)
        >>> info.module_names[0]
        'transformer_in.transformer_blocks.0.attn1.to_q'
    """
    defaults = config or MotionDistillationConfig()
    target = defaults.target if target is None else target
    mode = defaults.mode if mode is None else mode
    r = defaults.r if r is None else r
    lora_alpha = defaults.lora_alpha if lora_alpha is None else lora_alpha
    lora_dropout = defaults.lora_dropout if lora_dropout is None else lora_dropout
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported: use 'full' or 'lora'.")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty string without dots.")
    if hasattr(nn.Module, adapter_name):
        raise ValueError(
            f"adapter_name={adapter_name!r} is a torch.nn.Module attribute and would shadow it; pick another name."
        )
    state = _state(unet)
    if adapter_name in state.infos:
        raise ValueError(
            f"adapter_name={adapter_name!r} is already on this model; pick another name or call "
            f"unload_adapter(unet, {adapter_name!r}) first."
        )
    names = resolve_target(unet, target)
    modules = dict(unet.named_modules())
    unet.requires_grad_(False)

    if mode == "full":
        if any(info.mode == "full" for info in state.infos.values()) or state.deltas:
            raise ValueError(
                "a full-mode adapter is already on this model and full mode edits weights in place: "
                "unload it first, or use mode='lora' to stack adapters."
            )
        for name in names:
            weight = modules[name].weight
            state.base_weights.setdefault(name, weight.detach().to("cpu", copy=True))
            weight.requires_grad_(True)
        num = sum(modules[name].weight.numel() for name in names)
        info = AdapterInfo(adapter_name, "full", target, backbone_name(unet), names, num)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        lora_config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(names), init_lora_weights=True
        )
        inject_adapter_in_model(lora_config, unet, adapter_name=adapter_name)
        unet.requires_grad_(False)
        info = AdapterInfo(
            adapter_name, "lora", target, backbone_name(unet), names, 0, r=r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
        )
        state.infos[adapter_name] = info
        for param in adapter_parameters(unet, adapter_name).values():
            param.requires_grad_(True)
        info.num_parameters = sum(p.numel() for p in adapter_parameters(unet, adapter_name).values())
    state.infos[adapter_name] = info
    state.scales[adapter_name] = 1.0
    return info


def adapter_parameters(unet: nn.Module, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The parameters that make up one adapter, by their key in adapter files.

    Full mode: `<module>.weight`; LoRA: `<module>.lora_A.weight` and `<module>.lora_B.weight`.

    Example:
        >>> params = adapter_parameters(unet)  # doctest: +SKIP
    """
    info = _info(unet, adapter_name)
    modules = dict(unet.named_modules())
    params: dict[str, nn.Parameter] = {}
    for name in info.module_names:
        module = modules[name]
        if info.mode == "full":
            params[f"{name}.weight"] = module.weight
        else:
            params[f"{name}.lora_A.weight"] = module.lora_A[adapter_name].weight
            params[f"{name}.lora_B.weight"] = module.lora_B[adapter_name].weight
    return params


def adapter_state_dict(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Detached CPU copies of one adapter's tensors, keyed as in adapter files (no adapter name in keys).

    Example:
        >>> sd = adapter_state_dict(unet)  # doctest: +SKIP
    """
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter_parameters(unet, adapter_name).items()}


def load_adapter_state_dict(
    unet: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default"
) -> None:
    """Copy tensors into an injected adapter, checking that the keys and shapes are exactly the adapter's.

    Raises:
        ValueError: naming missing keys, unexpected keys, or the first shape mismatch.
    """
    params = adapter_parameters(unet, adapter_name)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"adapter tensors do not fit adapter {adapter_name!r}: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). "
            f"Was it saved for another backbone or target?"
        )
    for key, param in params.items():
        value = state_dict[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"adapter tensor {key} has shape {tuple(value.shape)} but the model expects {tuple(param.shape)}: "
                f"the adapter was made for a different model size or LoRA rank."
            )
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def set_full_motion(unet: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    """Register a full-mode motion by its trained weights and apply every registered motion.

    The applied weight is W = W_base + sum_i scale_i * (W_i - W_base), computed in float64 so that one motion at
    scale 1 reproduces its trained weights exactly. Used when loading full-mode motions for inference.
    """
    state = _state(unet)
    modules = dict(unet.named_modules())
    for name, weight_i in weights.items():
        weight = modules[name].weight
        if tuple(weight_i.shape) != tuple(weight.shape):
            raise ValueError(
                f"motion weight for {name} has shape {tuple(weight_i.shape)} but the model's weight is "
                f"{tuple(weight.shape)}: the motion was made for a different model."
            )
        state.base_weights.setdefault(name, weight.detach().to("cpu", copy=True))
    state.deltas[adapter_name] = weights
    state.scales[adapter_name] = float(scale)
    _apply_deltas(unet)


def set_adapter_scales(unet: nn.Module, adapter_names: list[str], weights: list[float] | None = None) -> None:
    """Activate the named adapters with the given weights (1.0 each by default); the others are switched off.

    Works for LoRA adapters (through peft's per-layer scale) and for full-mode motions loaded as deltas.

    Example:
        >>> set_adapter_scales(unet, ["walk", "wave"], [1.0, 0.5])  # doctest: +SKIP
    """
    state = _state(unet)
    weights = [1.0] * len(adapter_names) if weights is None else list(weights)
    if len(weights) != len(adapter_names):
        raise ValueError(f"weights has {len(weights)} entries for {len(adapter_names)} adapter_names; give one each.")
    unknown = [n for n in adapter_names if n not in state.infos]
    if unknown:
        raise ValueError(f"no adapter named {unknown} on this model; loaded: {sorted(state.infos)}.")
    modules = dict(unet.named_modules())
    for name, info in state.infos.items():  # a full-mode motion trained in place: its weights become a delta
        if info.mode == "full" and name not in state.deltas:
            state.deltas[name] = {m: modules[m].weight.detach().to("cpu", copy=True) for m in info.module_names}
    from peft.tuners.lora import LoraLayer

    lora_names = [n for n in adapter_names if state.infos[n].mode == "lora"]
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([n for n in lora_names if n in module.lora_A] or [])
            for name, weight in zip(adapter_names, weights):
                if name in module.lora_A:
                    module.set_scale(name, weight)
            for name in module.lora_A:
                if name not in lora_names:
                    module.set_scale(name, 0.0)
    for name in state.scales:
        state.scales[name] = 0.0
    for name, weight in zip(adapter_names, weights):
        state.scales[name] = float(weight)
    if state.deltas:
        _apply_deltas(unet)


def unload_adapter(unet: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all, with `None`) and restore the base weights it changed.

    Example:
        >>> unload_adapter(unet)  # doctest: +SKIP
    """
    state = _state(unet)
    names = list(state.infos) if adapter_name is None else [adapter_name]
    for name in names:
        info = _info(unet, name)
        if info.mode == "lora":
            _remove_lora(unet, info, name)
        state.infos.pop(name)
        state.deltas.pop(name, None)
        state.scales.pop(name, None)
        if info.mode == "full" and name not in state.deltas:
            _restore_base(unet, info.module_names)
    if state.deltas:
        _apply_deltas(unet)
    elif not any(i.mode == "full" for i in state.infos.values()):
        _restore_base(unet, list(state.base_weights))
        state.base_weights.clear()


def merge_adapter(unet: nn.Module, adapter_name: str = "default") -> None:
    """Fold an adapter into the base weights for good: the model then runs without adapter overhead.

    Example:
        >>> merge_adapter(unet)  # doctest: +SKIP
    """
    state = _state(unet)
    info = _info(unet, adapter_name)
    if info.mode == "lora":
        modules = dict(unet.named_modules())
        for name in info.module_names:
            modules[name].merge(adapter_names=[adapter_name])
        _remove_lora(unet, info, adapter_name)
    state.infos.pop(adapter_name)
    state.deltas.pop(adapter_name, None)
    state.scales.pop(adapter_name, None)
    for name in info.module_names:
        state.base_weights.pop(name, None)
    unet.requires_grad_(False)


def _remove_lora(unet: nn.Module, info: AdapterInfo, adapter_name: str) -> None:
    for name in info.module_names:
        module = unet.get_submodule(name)
        if len(module.lora_A) > 1:
            module.delete_adapter(adapter_name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())
    # peft keeps each injected adapter's config on the model; drop this one, so that a later injection under
    # any name starts clean (peft warns about "multiple adapters" while one is left)
    configs = getattr(unet, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs:
            del unet.peft_config


def _apply_deltas(unet: nn.Module) -> None:
    state = _state(unet)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name, base in state.base_weights.items():
            weight = modules[name].weight
            base64 = base.to(torch.float64)
            total = base64.clone()
            for adapter, weights in state.deltas.items():
                if name in weights:
                    total += state.scales.get(adapter, 1.0) * (weights[name].to(torch.float64) - base64)
            weight.copy_(total.to(weight.device, weight.dtype))


def _restore_base(unet: nn.Module, names: list[str]) -> None:
    state = _state(unet)
    with torch.no_grad():
        for name in names:
            if name in state.base_weights:
                weight = unet.get_submodule(name).weight
                weight.copy_(state.base_weights[name].to(weight.device, weight.dtype))


def _info(unet: nn.Module, adapter_name: str) -> AdapterInfo:
    infos = adapter_infos(unet)
    if adapter_name not in infos:
        raise ValueError(f"no adapter named {adapter_name!r} on this model; present: {sorted(infos) or 'none'}.")
    return infos[adapter_name]
