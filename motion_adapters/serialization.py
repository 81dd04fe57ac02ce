"""Adapter files: a folder holding the adapted tensors (safetensors, config in metadata), a JSON sidecar, extras.

Layout of a motion folder::

    motion_adapter.safetensors     adapted tensors, keys "unet.<module>.weight" (full) or
                                   "unet.<module>.lora_A.weight" / ".lora_B.weight" (LoRA, peft/diffusers layout)
    motion_adapter_config.json     the same description as the safetensors metadata, readable without torch
    noise_prior.safetensors        optional: the DDIM-inverted initial noise of the training clip ("noise")
    README.md                      optional: the model card

Every file is written atomically (a temporary file in the same folder, then `os.replace`). Loading reads only
safetensors and JSON: no code in a file is ever executed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from motion_adapters.injection import (
    AdapterInfo,
    _state,
    adapter_infos,
    adapter_state_dict,
    inject_temporal_adapter,
    load_adapter_state_dict,
    set_adapter_scales,
    set_full_motion,
)
from motion_adapters.targets import backbone_name

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "motion_adapter.safetensors"
CONFIG_NAME = "motion_adapter_config.json"
NOISE_PRIOR_NAME = "noise_prior.safetensors"
FORMAT = "motion_adapters"
FORMAT_VERSION = 1
PREFIX = "unet."


class MotionFileError(ValueError):
    """A motion folder or file that cannot be loaded: missing, corrupt, or made for another model."""


@dataclass
class MotionAdapter:
    """A motion read from disk: its tensors and everything recorded about how it was made.

    Attributes:
        tensors: adapter tensors keyed by module path (no "unet." prefix).
        info: what was adapted (mode, target, backbone, module names, rank).
        distillation: the `MotionDistillationConfig` fields it was trained with, if recorded.
        training: free-form facts about the run (prompt, frames, losses, steps, time).
        noise_prior: the inverted noise of the training clip, if saved.
        path: the folder it came from.
    """

    tensors: dict[str, torch.Tensor]
    info: AdapterInfo
    distillation: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    noise_prior: torch.Tensor | None = None
    path: Path | None = None

    def description(self) -> dict[str, Any]:
        """The JSON description stored in the metadata and the sidecar."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter": self.info.to_dict(),
            "distillation": self.distillation,
            "training": self.training,
        }


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write (UTF-8); see `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """`safetensors.torch.save_file`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def motion_from_unet(
    unet: nn.Module,
    adapter_name: str = "default",
    *,
    distillation: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    noise_prior: torch.Tensor | None = None,
    compress_rank: int | None = None,
) -> MotionAdapter:
    """Collect one adapter of `unet` as a `MotionAdapter`, optionally compressing a full adapter to low rank.

    With `compress_rank`, a full-mode adapter's delta W - W_base is factored by truncated SVD into LoRA factors
    (B = U_r S_r, A = V_r^T, lora_alpha = r so the scale is 1); the relative Frobenius reconstruction error of
    the delta over all matrices is recorded in `training["compression"]` and logged.

    Example:
        >>> motion = motion_from_unet(unet, compress_rank=8)  # doctest: +SKIP
    """
    info = adapter_infos(unet).get(adapter_name)
    if info is None:
        raise ValueError(f"no adapter named {adapter_name!r} on this model; present: {sorted(adapter_infos(unet))}.")
    tensors = adapter_state_dict(unet, adapter_name)
    training = dict(training or {})
    info = AdapterInfo(**info.to_dict())
    if compress_rank is not None:
        if info.mode != "full":
            raise ValueError(f"compress_rank applies to full-mode adapters; {adapter_name!r} is {info.mode!r}.")
        if isinstance(compress_rank, bool) or not isinstance(compress_rank, int) or compress_rank < 1:
            raise ValueError(f"compress_rank={compress_rank!r} must be a positive int.")
        tensors, error = _compress(tensors, _state(unet).base_weights, compress_rank)
        training["compression"] = {"rank": compress_rank, "relative_error": error}
        logger.info("compressed full adapter to rank %d: relative reconstruction error %.4g", compress_rank, error)
        info.mode, info.r, info.lora_alpha, info.lora_dropout = "lora", compress_rank, float(compress_rank), 0.0
        info.num_parameters = sum(t.numel() for t in tensors.values())
    return MotionAdapter(tensors, info, distillation, training, noise_prior)


def _compress(
    tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor], rank: int
) -> tuple[dict[str, torch.Tensor], float]:
    out: dict[str, torch.Tensor] = {}
    err_sq, ref_sq = 0.0, 0.0
    for key, weight in tensors.items():
        module = key.removesuffix(".weight")
        delta = weight.to(torch.float32) - base[module].to(torch.float32)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.numel())
        lora_b = u[:, :k] * s[:k]
        lora_a = vh[:k]
        if k < rank:  # pad so every layer has the declared rank
            lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - k)], dim=1)
            lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - k, lora_a.shape[1])], dim=0)
        err_sq += float((delta - lora_b @ lora_a).pow(2).sum())
        ref_sq += float(delta.pow(2).sum())
        out[f"{module}.lora_A.weight"] = lora_a.contiguous()
        out[f"{module}.lora_B.weight"] = lora_b.contiguous()
    return out, (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0


def save_motion_adapter(motion: MotionAdapter, save_directory: str | os.PathLike) -> Path:
    """Write a motion folder (see the module docstring). Existing files of the same names are replaced atomically.

    Example:
        >>> save_motion_adapter(motion_from_unet(unet), "motions/seagull-walk")  # doctest: +SKIP
    """
    folder = Path(save_directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_directory={str(folder)!r} is a file; pass a folder path.")
    folder.mkdir(parents=True, exist_ok=True)
    description = motion.description()
    text = json.dumps(description, indent=2, sort_keys=True)
    tensors = {PREFIX + k: v for k, v in motion.tensors.items()}
    metadata = {"format": "pt", FORMAT: text}
    if motion.info.mode == "lora":  # the LoraConfig diffusers' load_lora_weights reads, keys prefixed "unet."
        lora_config = {
            "r": motion.info.r, "lora_alpha": motion.info.lora_alpha, "lora_dropout": motion.info.lora_dropout or 0.0,
            "target_modules": sorted(motion.info.module_names), "init_lora_weights": True,
        }
        metadata["lora_adapter_metadata"] = json.dumps({PREFIX + k: v for k, v in lora_config.items()}, sort_keys=True)
    atomic_save_safetensors(tensors, folder / WEIGHTS_NAME, metadata=metadata)
    if motion.noise_prior is not None:
        atomic_save_safetensors({"noise": motion.noise_prior.detach().cpu()}, folder / NOISE_PRIOR_NAME)
    atomic_write_text(folder / CONFIG_NAME, text + "\n")
    motion.path = folder
    return folder


def load_motion_adapter(path: str | os.PathLike) -> MotionAdapter:
    """Read a motion folder (or its `motion_adapter.safetensors`), validating the format.

    Raises:
        MotionFileError: for a missing folder or file, a corrupt safetensors file, or missing metadata.

    Example:
        >>> motion = load_motion_adapter("motions/seagull-walk")  # doctest: +SKIP
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        raise MotionFileError(
            f"no {WEIGHTS_NAME} at {path}: pass a folder written by save_motion / train_motion, or a Hub id."
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise MotionFileError(
            f"{weights} is not a readable safetensors file ({err}); re-download or re-save it."
        ) from err
    if FORMAT not in metadata:
        raise MotionFileError(
            f"{weights} has no {FORMAT!r} metadata: it is not a motion adapter file (a plain LoRA file?)."
        )
    try:
        description = json.loads(metadata[FORMAT])
        info = AdapterInfo(**description["adapter"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise MotionFileError(f"{weights} has unreadable {FORMAT!r} metadata ({err}).") from err
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise MotionFileError(
            f"{weights} uses format_version {description['format_version']}; this motion_adapters reads up to "
            f"{FORMAT_VERSION}. Upgrade motion_adapters."
        )
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise MotionFileError(f"{weights} holds keys outside the unet: {bad[:3]}.")
    noise = None
    folder = weights.parent
    if (folder / NOISE_PRIOR_NAME).is_file():
        try:
            noise = load_file(str(folder / NOISE_PRIOR_NAME))["noise"]
        except (SafetensorError, OSError, KeyError) as err:
            raise MotionFileError(f"{folder / NOISE_PRIOR_NAME} is unreadable ({err}).") from err
    return MotionAdapter(
        {k[len(PREFIX):]: v for k, v in tensors.items()},
        info,
        description.get("distillation"),
        description.get("training") or {},
        noise,
        folder,
    )


def apply_motion_adapter(
    unet: nn.Module, motion: MotionAdapter, adapter_name: str | None = None, scale: float = 1.0
) -> str:
    """Put a loaded motion on `unet` under `adapter_name` (default: the name it was saved with) at `scale`.

    LoRA motions become peft LoRA layers; full motions become deltas W_motion - W_base added to the current base
    weights. Other adapters already loaded stay active, so several motions combine.

    Raises:
        MotionFileError: when the motion was made for another backbone class, names modules the UNet lacks, or
            has tensors of the wrong shape.

    Example:
        >>> apply_motion_adapter(unet, load_motion_adapter("motions/seagull-walk"), scale=0.8)  # doctest: +SKIP
    """
    name = adapter_name or motion.info.adapter_name
    backbone = backbone_name(unet)
    if motion.info.backbone != backbone:
        raise MotionFileError(
            f"the motion at {motion.path} was trained on a {motion.info.backbone} but this UNet is a {backbone}: "
            f"load it into a pipeline of that backbone."
        )
    modules = dict(unet.named_modules())
    missing = [n for n in motion.info.module_names if n not in modules]
    if missing:
        raise MotionFileError(
            f"the motion at {motion.path} adapts {len(missing)} module(s) this UNet lacks (e.g. {missing[0]}): "
            f"it was made for a differently configured {motion.info.backbone}."
        )
    if name in adapter_infos(unet):
        raise ValueError(f"adapter_name={name!r} is already loaded; pass another adapter_name or unload it first.")
    try:
        if motion.info.mode == "lora":
            inject_temporal_adapter(
                unet, list(motion.info.module_names), "lora", adapter_name=name, r=motion.info.r,
                lora_alpha=motion.info.lora_alpha, lora_dropout=motion.info.lora_dropout or 0.0,
            )
            load_adapter_state_dict(unet, motion.tensors, name)
        else:
            _apply_full(unet, motion, name, modules, scale)
    except ValueError as err:
        if name in adapter_infos(unet):
            from motion_adapters.injection import unload_adapter

            unload_adapter(unet, name)
        raise MotionFileError(f"the motion at {motion.path} does not fit this UNet: {err}") from err
    state = _state(unet)
    state.infos[name].target = motion.info.target
    active = list(state.infos)
    set_adapter_scales(unet, active, [scale if n == name else state.scales.get(n, 1.0) for n in active])
    unet.requires_grad_(False)
    return name


def _apply_full(unet: nn.Module, motion: MotionAdapter, name: str, modules: dict, scale: float) -> None:
    state = _state(unet)
    expected = {f"{n}.weight" for n in motion.info.module_names}
    if set(motion.tensors) != expected:
        raise ValueError("its tensors do not match the module names it records (a damaged file?)")
    weights = {}
    for module_name in motion.info.module_names:
        weight = modules[module_name].weight
        trained = motion.tensors[f"{module_name}.weight"]
        if tuple(trained.shape) != tuple(weight.shape):
            raise ValueError(
                f"{module_name}.weight has shape {tuple(trained.shape)}, the UNet's {tuple(weight.shape)}"
            )
        weights[module_name] = trained
    info = AdapterInfo(**{**motion.info.to_dict(), "adapter_name": name})
    state.infos[name] = info
    set_full_motion(unet, name, weights, scale)
