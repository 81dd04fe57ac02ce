"""Metrics for generated clips: CLIP text alignment and consistency, tracked and optical-flow motion fidelity.

``flow`` needs OpenCV (``pip install motion_adapters[metrics]``); it is imported only when its functions run.

Example:
    >>> from motion_adapters.metrics import track_object, trajectory_fidelity
    >>> from motion_adapters.world import render_clip, sample_spec
    >>> spec = sample_spec(0)
    >>> trajectory_fidelity(track_object(render_clip(spec)), spec.trajectory(8))["displacement_cosine"] > 0.9
    True
"""

from .clip_scores import (
    DEFAULT_CLIP_MODEL,
    CLIPLoadError,
    as_clip_frames,
    keyframe_indices,
    load_clip,
    resolve_frame_indices,
    temporal_consistency,
    text_alignment,
)
from .evaluation import evaluate
from .flow import flow_fidelity, optical_flow
from .trajectory import (
    appearance_check,
    estimate_background_palette,
    foreground_area,
    mask_centroids,
    segment_foreground,
    track_object,
    trajectory_fidelity,
    video_motion_fidelity,
)

__all__ = [
    "CLIPLoadError",
    "DEFAULT_CLIP_MODEL",
    "appearance_check",
    "as_clip_frames",
    "evaluate",
    "estimate_background_palette",
    "flow_fidelity",
    "foreground_area",
    "keyframe_indices",
    "load_clip",
    "mask_centroids",
    "optical_flow",
    "resolve_frame_indices",
    "segment_foreground",
    "temporal_consistency",
    "text_alignment",
    "track_object",
    "trajectory_fidelity",
    "video_motion_fidelity",
]
