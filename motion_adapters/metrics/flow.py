"""Motion fidelity of real videos by dense optical flow (OpenCV Farneback): a weight-free proxy, not a judge.

Both clips are resampled to a common size and frame count, converted to grayscale, and the Farneback flow between
consecutive frames is compared. The scores say whether things move the same way in the same places; they do not
see what moves, they are fooled by camera motion and lighting changes, and Farneback itself is unreliable on
large displacements (more than about a tenth of the frame per step), textureless regions and occlusions.
"""

from __future__ import annotations

import numpy as np
import torch

from ..video import tensor_to_frames

__all__ = ["flow_fidelity", "optical_flow"]


def _require_cv2():
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "optical-flow motion fidelity needs OpenCV: pip install motion_adapters[metrics] "
            "(or pip install opencv-python-headless)."
        ) from error
    return cv2


def _uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        return tensor_to_frames(video)
    if isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3:
        return video
    raise ValueError(
        f"video must be a (3, F, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array, got "
        f"{type(video).__name__} {getattr(video, 'dtype', '')} {getattr(video, 'shape', '')}."
    )


def _gray(video: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grayscale uint8 frames (F, H, W) resized to ``size``."""
    cv2 = _require_cv2()
    frames = _uint8_frames(video)
    height, width = size
    return np.stack(
        [
            cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (width, height), interpolation=cv2.INTER_AREA)
            for f in frames
        ]
    )


def optical_flow(video: torch.Tensor | np.ndarray, size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """Dense Farneback flow between consecutive frames, shape (F - 1, H, W, 2), (dx, dy) in pixels at ``size``.

    Args:
        video: A (3, F, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array, F >= 2.
        size: (height, width) the frames are resized to (stretched, aspect ratio not kept) before the flow.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> flow = optical_flow(render_clip(ClipSpec("circle", "red", "black", "right", start=(0.3, 0.5))))
        >>> flow.shape, bool(flow[..., 0].mean() > 0)
        ((7, 128, 128, 2), True)
    """
    _check_size(size)
    cv2 = _require_cv2()
    gray = _gray(video, size)
    if len(gray) < 2:
        raise ValueError(f"video has {len(gray)} frame; optical flow needs at least 2.")
    return np.stack(
        [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0) for a, b in zip(gray[:-1], gray[1:])]
    )


def _check_size(size) -> None:
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s >= 8 for s in size)):
        raise ValueError(f"size must be two ints >= 8 (height, width), got {size!r}.")


def _still_aware_cosine(dot: float, norm_g: float, norm_r: float, moving_g: bool, moving_r: bool) -> float:
    if not moving_g and not moving_r:
        return 1.0
    if not moving_g or not moving_r:
        return 0.0
    return float(dot / max(norm_g * norm_r, 1e-12))


def flow_fidelity(
    generated: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    size: tuple[int, int] = (128, 128),
    num_frames: int | None = None,
    still_threshold: float = 0.02,
) -> dict[str, float]:
    """Compare the motion of a generated clip with a reference clip by optical flow.

    Both clips are resized to ``size`` and resampled to ``num_frames`` frames (default: the shorter clip's count,
    frames picked evenly). For each consecutive frame pair the Farneback flows ``g`` and ``r`` give:

    * ``flow_cosine``: ``sum(g . r) / sum(|g| |r|)`` over pixels, i.e. the per-pixel cosine weighted by the product
      of the two magnitudes, so static pixels do not count. It needs the motion in the same places: the same
      motion at another position scores near 0.
    * ``trajectory_cosine``: the cosine between the two mean flow vectors (the frame's average motion), which
      ignores where things move. Rotation, zoom and symmetric motions average to about zero.

    A field whose mean flow magnitude is below ``still_threshold`` pixels per step (at ``size``) counts as still,
    for both scores: both still scores 1, one still scores 0. For ``trajectory_cosine`` the same threshold applies
    to the length of the mean vector. Each score is the mean over frame pairs, in [-1, 1]; a reversed clip scores
    about -1.

    Args:
        generated: A (3, F, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array.
        reference: The clip whose motion should be reproduced, in the same forms.
        size: Common (height, width) the flow is computed at.
        num_frames: Common frame count (>= 2); ``None`` uses the shorter clip's.
        still_threshold: Mean flow magnitude, in pixels per step at ``size``, under which a field is still.

    Returns:
        ``{"flow_cosine": float, "trajectory_cosine": float}``.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> clip = render_clip(ClipSpec("circle", "red", "black", "right", start=(0.3, 0.5)))
        >>> flow_fidelity(clip, clip.flip(1))["trajectory_cosine"] < 0
        True
    """
    _check_size(size)
    gen_frames, ref_frames = _uint8_frames(generated), _uint8_frames(reference)
    count = min(len(gen_frames), len(ref_frames)) if num_frames is None else num_frames
    if not isinstance(count, int) or count < 2:
        raise ValueError(f"num_frames must be an int >= 2 (clips need 2 frames for a flow), got {count!r}.")
    gen = optical_flow(_resample(gen_frames, count), size)
    ref = optical_flow(_resample(ref_frames, count), size)
    flow_cosines, trajectory_cosines = [], []
    for g, r in zip(gen, ref):
        mag_g, mag_r = np.linalg.norm(g, axis=-1), np.linalg.norm(r, axis=-1)
        moving_g, moving_r = mag_g.mean() >= still_threshold, mag_r.mean() >= still_threshold
        dot = float((g * r).sum())
        flow_cosines.append(_still_aware_cosine(dot, 1.0, float((mag_g * mag_r).sum()), moving_g, moving_r))
        mean_g, mean_r = g.reshape(-1, 2).mean(0), r.reshape(-1, 2).mean(0)
        norm_g, norm_r = float(np.linalg.norm(mean_g)), float(np.linalg.norm(mean_r))
        trajectory_cosines.append(
            _still_aware_cosine(
                float(mean_g @ mean_r), norm_g, norm_r, norm_g >= still_threshold, norm_r >= still_threshold
            )
        )
    return {"flow_cosine": float(np.mean(flow_cosines)), "trajectory_cosine": float(np.mean(trajectory_cosines))}


def _resample(frames: np.ndarray, count: int) -> np.ndarray:
    if count == len(frames):
        return frames
    return frames[np.round(np.linspace(0, len(frames) - 1, count)).astype(int)]
