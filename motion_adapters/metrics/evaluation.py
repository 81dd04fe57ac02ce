"""Score one generated clip with every metric that applies, as a JSON-ready dict: CLIP scores and flow fidelity.

Figures that cannot be computed (no prompt, no reference clip, no CLIP model on this machine, no OpenCV) are
``None`` with a reason beside them, so a report always comes back; bad input and a named CLIP model that does
not load are errors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import clip_scores
from .clip_scores import as_clip_frames, resolve_frame_indices, temporal_consistency, text_alignment

__all__ = ["evaluate"]


def evaluate(
    generated,
    reference=None,
    prompt: str | None = None,
    *,
    clip_model=None,
    frame_indices: str | Sequence[int] = "keyframes",
    flow_size: tuple[int, int] = (128, 128),
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Compute text alignment, temporal consistency and motion fidelity of a generated clip, where they apply.

    * ``text_alignment`` and ``temporal_consistency`` (see :mod:`motion_adapters.metrics.clip_scores`) on the
      frames picked by ``frame_indices``; text alignment needs ``prompt``.
    * ``flow_cosine`` and ``trajectory_cosine`` (see :func:`motion_adapters.metrics.flow_fidelity`) against
      ``reference``, always on whole clips: both are resampled evenly to the shorter clip's frame count, so a
      29-frame output against its 8-frame training clip is compared on frames 0, 4, ..., 28, its keyframes.

    A figure that cannot be computed is ``None`` and a key says why: ``clip_unavailable`` (both CLIP figures),
    ``text_alignment_unavailable``, ``temporal_consistency_unavailable`` or ``flow_unavailable``.

    Args:
        generated: The clip to score: a (3, F, H, W) or (1, 3, F, H, W) tensor in [-1, 1], a uint8 (F, H, W, 3)
            array, a list of PIL images, or the path of a video file or folder of frames.
        reference: The clip whose motion should be reproduced (the training clip), in the same forms, or ``None``.
        prompt: The prompt the clip was generated from, or ``None``.
        clip_model: ``None`` uses :data:`~motion_adapters.metrics.clip_scores.DEFAULT_CLIP_MODEL` if it is in the
            local Hugging Face cache (never downloads it) and reports ``clip_unavailable`` otherwise. A Hub id or
            folder is loaded with :func:`~motion_adapters.metrics.clip_scores.load_clip` (downloading if needed)
            and raises if it cannot be; a ``CLIPModel`` or a ``(CLIPModel, CLIPProcessor)`` pair is used as given.
        frame_indices: ``"keyframes"`` (every 4th frame of cascaded outputs, the paper's protocol), ``"all"``, or
            a list of indices, for the CLIP figures.
        flow_size: (height, width) the optical flow is computed at.
        device: Where the CLIP model runs; ``None`` uses the CPU for a loaded model and a given model's own device.

    Returns:
        A dict of plain Python values (``json.dumps`` takes it): the four figures, ``generated`` and ``reference``
        (frame count, height, width and source), ``prompt``, ``clip_model``, ``frame_selection``,
        ``frame_indices``, ``flow_size``, ``flow_num_frames``, and the reasons for missing figures.

    Raises:
        ValueError: A clip cannot be read (the message names the file) or an argument is invalid.
        CLIPLoadError: ``clip_model`` names a model that cannot be loaded.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> clip = render_clip(ClipSpec("circle", "red", "black", "right", start=(0.3, 0.5)))
        >>> report = evaluate(clip, reference=clip, clip_model="openai/clip-vit-base-patch32")  # doctest: +SKIP
        >>> report["trajectory_cosine"], report["text_alignment"]  # doctest: +SKIP
        (1.0, None)
    """
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError(f"prompt must be a non-empty string or None, got {prompt!r}.")
    if not (
        isinstance(flow_size, (tuple, list))
        and len(flow_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in flow_size)
    ):
        raise ValueError(f"flow_size must be two ints >= 8 (height, width), got {flow_size!r}.")
    gen = _one_clip(generated, "generated")
    indices = resolve_frame_indices(frame_indices, len(gen))
    ref = _one_clip(reference, "reference") if reference is not None else None

    selection = frame_indices if isinstance(frame_indices, str) else "custom"
    result: dict[str, Any] = {
        "generated": _describe(gen, generated),
        "reference": _describe(ref, reference) if ref is not None else None,
        "prompt": prompt,
        "clip_model": None,
        "frame_selection": selection,
        "frame_indices": list(indices),
        "flow_size": list(flow_size),
        "flow_num_frames": min(len(gen), len(ref)) if ref is not None else None,
        "text_alignment": None,
        "temporal_consistency": None,
        "flow_cosine": None,
        "trajectory_cosine": None,
    }
    result.update(_flow_figures(gen, ref, tuple(flow_size)))
    result.update(_clip_figures(gen, prompt, indices, clip_model, device))
    return result


def _one_clip(video, name: str) -> np.ndarray:
    clips = as_clip_frames(video)
    if len(clips) != 1:
        raise ValueError(f"{name} is a batch of {len(clips)} clips; evaluate scores one clip. Pass {name}[i].")
    return clips[0]


def _describe(frames: np.ndarray, source) -> dict[str, Any]:
    num_frames, height, width = frames.shape[:3]
    source = os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    return {"num_frames": int(num_frames), "height": int(height), "width": int(width), "source": source}


def _flow_figures(gen: np.ndarray, ref: np.ndarray | None, size: tuple[int, int]) -> dict[str, Any]:
    if ref is None:
        return {"flow_unavailable": "no reference clip given"}
    if min(len(gen), len(ref)) < 2:
        return {"flow_unavailable": f"optical flow needs 2 frames per clip, got {len(gen)} and {len(ref)}"}
    from .flow import flow_fidelity

    try:
        return flow_fidelity(gen, ref, size=size)
    except ImportError as error:
        return {"flow_unavailable": str(error)}


def _clip_figures(gen: np.ndarray, prompt, indices: tuple[int, ...], clip_model, device) -> dict[str, Any]:
    model, processor, name, reason = _resolve_clip(clip_model, device)
    if model is None:
        return {"clip_unavailable": reason}
    figures: dict[str, Any] = {"clip_model": name}
    run_device = device if not isinstance(clip_model, (str, os.PathLike, type(None))) else None
    if len(indices) >= 2:
        figures["temporal_consistency"] = temporal_consistency(
            gen, model, processor, frame_indices=indices, device=run_device
        )
    else:
        figures["temporal_consistency_unavailable"] = f"needs at least 2 evaluated frames, got {len(indices)}"
    if prompt is not None:
        figures["text_alignment"] = text_alignment(
            gen, prompt, model, processor, frame_indices=indices, device=run_device
        )
    else:
        figures["text_alignment_unavailable"] = "no prompt given"
    return figures


def _resolve_clip(clip_model, device):
    """``(model, processor, name, reason)``; ``model`` is ``None`` only when the default is not cached."""
    if clip_model is None:
        default = clip_scores.DEFAULT_CLIP_MODEL
        try:
            model, processor = clip_scores.load_clip(default, device, local_files_only=True)
        except clip_scores.CLIPLoadError:
            reason = (
                f"no CLIP model was named and the default {default} could not be loaded from the local Hugging "
                "Face cache (evaluate never downloads it unasked). Pass clip_model= (CLI: --clip-model) with a Hub "
                "id or a local CLIP folder to compute text_alignment and temporal_consistency."
            )
            return None, None, None, reason
        return model, processor, default, None
    if isinstance(clip_model, (str, os.PathLike)):
        model, processor = clip_scores.load_clip(clip_model, device)
        return model, processor, os.fspath(clip_model), None
    if isinstance(clip_model, tuple) and len(clip_model) == 2:
        model, processor = clip_model
    else:
        model, processor = clip_model, None
    model, processor = clip_scores._model_and_processor(model, processor)
    name = getattr(model, "name_or_path", "") or type(model).__name__
    return model, processor, name, None
