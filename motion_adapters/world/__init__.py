"""The shapes world: a procedural generator of captioned clips of shapes moving on backgrounds, with exact motion.

Example:
    >>> from motion_adapters.world import UNSEEN_MOTIONS, render_clip, sample_spec
    >>> spec = sample_spec(0, motions=UNSEEN_MOTIONS)
    >>> video = render_clip(spec, num_frames=8, height=32, width=32)
    >>> spec.trajectory(8).shape
    (8, 2)
"""

from .generator import make_dataset, write_clip
from .render import render_background, render_clip, shape_area, shape_coverage
from .spec import ClipSpec, appearance_invariant_prompt, parse_caption, sample_spec
from .vocab import (
    BACKGROUNDS,
    COLORS,
    MOTION_PHRASES,
    MOTIONS,
    SHAPES,
    SPEEDS,
    TRAIN_MOTIONS,
    UNSEEN_MOTIONS,
    Background,
    is_compatible,
    motion_path,
    motion_phrase,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "MOTIONS",
    "MOTION_PHRASES",
    "SHAPES",
    "SPEEDS",
    "TRAIN_MOTIONS",
    "UNSEEN_MOTIONS",
    "Background",
    "ClipSpec",
    "appearance_invariant_prompt",
    "is_compatible",
    "make_dataset",
    "motion_path",
    "motion_phrase",
    "parse_caption",
    "render_background",
    "render_clip",
    "sample_spec",
    "shape_area",
    "shape_coverage",
    "write_clip",
]
