"""What one shapes-world clip shows (``ClipSpec``), its captions, its exact trajectory, and how specs are sampled."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .vocab import (
    BACKGROUNDS,
    COLORS,
    MOTION_PHRASES,
    MOTIONS,
    SHAPES,
    SPEEDS,
    TRAIN_MOTIONS,
    is_compatible,
    motion_path,
    motion_phrase,
)

__all__ = ["ClipSpec", "appearance_invariant_prompt", "parse_caption", "sample_spec"]

_DENSE_T = np.linspace(0.0, 1.0, 1001)
SIZE_RANGE = (0.3, 0.45)
"""Sizes sampled for motions that keep the size; growing samples its first size from (0.2, 0.3), shrinking from
(0.4, 0.55)."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _start_bounds(motion: str, speed: str, size: float) -> np.ndarray:
    """Range of start positions ``[[x_lo, x_hi], [y_lo, y_hi]]`` that keep the whole object inside the frame."""
    offsets, scales = motion_path(motion, speed, _DENSE_T)
    radius = size * scales / 2
    low = np.max(radius[:, None] - offsets, axis=0)
    high = np.min(1 - radius[:, None] - offsets, axis=0)
    return np.stack([low, high], axis=1)


@dataclass(frozen=True)
class ClipSpec:
    """Everything one clip shows: an object of a shape and color moving on a background.

    Positions are fractions of the frame, x to the right and y downwards, so (0.5, 0.5) is the center whatever
    the resolution. ``size`` is the diameter of the circle the shape is drawn in, as a fraction of the frame's
    shorter side; the shape's centroid is the center of that circle. Validation rejects unknown names, a color too
    close to its background, a still object with a speed, and start positions that let the object leave the frame.

    Attributes:
        shape: One of ``SHAPES``.
        color: One of ``COLORS``.
        background: One of ``BACKGROUNDS``.
        motion: One of ``MOTIONS``.
        speed: One of ``SPEEDS``; ``"normal"`` for a still object.
        size: Diameter at the first frame, in (0, 1].
        start: Center (x, y) at the first frame.

    Example:
        >>> spec = ClipSpec("circle", "red", "blue", "left", start=(0.7, 0.5))
        >>> spec.caption
        'a red circle moving left on a blue background'
        >>> spec.trajectory(3).round(3).tolist()
        [[0.7, 0.5], [0.55, 0.5], [0.4, 0.5]]
    """

    shape: str
    color: str
    background: str
    motion: str
    speed: str = "normal"
    size: float = 0.35
    start: tuple[float, float] = field(default=(0.5, 0.5))

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, tuple(COLORS)),
            ("background", self.background, tuple(BACKGROUNDS)),
            ("motion", self.motion, MOTIONS),
            ("speed", self.speed, SPEEDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if not is_compatible(self.color, self.background):
            raise ValueError(
                f"color {self.color!r} does not stand out on background {self.background!r}. "
                "Pick another color or background."
            )
        if self.motion == "still" and self.speed != "normal":
            raise ValueError(f"speed must be 'normal' for a still object, got {self.speed!r}.")
        if not 0 < self.size <= 1:
            raise ValueError(f"size must be in (0, 1] (a fraction of the frame's shorter side), got {self.size!r}.")
        start = tuple(float(v) for v in self.start)
        if len(start) != 2:
            raise ValueError(f"start must be an (x, y) pair, got {self.start!r}.")
        object.__setattr__(self, "start", start)
        bounds = _start_bounds(self.motion, self.speed, self.size)
        inside = all(lo - 1e-9 <= v <= hi + 1e-9 for v, (lo, hi) in zip(start, bounds))
        if not inside:
            (x_lo, x_hi), (y_lo, y_hi) = bounds
            hint = (
                f"Pass a start with x in [{x_lo:.3f}, {x_hi:.3f}] and y in [{y_lo:.3f}, {y_hi:.3f}]"
                if x_lo <= x_hi and y_lo <= y_hi
                else "Pass a smaller size or a slower speed"
            )
            raise ValueError(
                f"start={start} lets a {self.shape} of size {self.size} {motion_phrase(self.motion, self.speed)} "
                f"leave the frame. {hint}."
            )

    @property
    def motion_phrase(self) -> str:
        """The caption words for the motion and speed, e.g. ``"moving left quickly"``."""
        return motion_phrase(self.motion, self.speed)

    @property
    def caption(self) -> str:
        """The full caption, e.g. ``"a red circle moving left on a blue background"``."""
        return f"{self.appearance_invariant_prompt} on {_article(self.background)} {self.background} background"

    @property
    def appearance_invariant_prompt(self) -> str:
        """The caption without the background, e.g. ``"a red circle moving left"`` (VMC's appearance-free prompt)."""
        return f"{_article(self.color)} {self.color} {self.shape} {self.motion_phrase}"

    def trajectory(self, num_frames: int) -> np.ndarray:
        """Exact center (x, y) of the object in each frame, shape (num_frames, 2), as fractions of the frame.

        Frame ``i`` is at normalised time ``i / (num_frames - 1)`` of the motion (time 0 for a single frame).

        Example:
            >>> ClipSpec("star", "white", "black", "down", start=(0.5, 0.3)).trajectory(2).tolist()
            [[0.5, 0.3], [0.5, 0.6]]
        """
        offsets, _ = motion_path(self.motion, self.speed, _frame_times(num_frames))
        return np.asarray(self.start) + offsets

    def sizes(self, num_frames: int) -> np.ndarray:
        """Diameter of the object in each frame, shape (num_frames,), as fractions of the frame's shorter side.

        Example:
            >>> ClipSpec("star", "white", "black", "growing", size=0.3).sizes(2).round(3).tolist()
            [0.3, 0.48]
        """
        _, scales = motion_path(self.motion, self.speed, _frame_times(num_frames))
        return self.size * scales

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict; ``ClipSpec(**d)`` rebuilds it.

        Example:
            >>> spec = ClipSpec("circle", "red", "blue", "left", start=(0.7, 0.5))
            >>> ClipSpec(**spec.to_dict()) == spec
            True
        """
        return asdict(self)


def _frame_times(num_frames: int) -> np.ndarray:
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}.")
    return np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)


def _choice(rng: np.random.Generator, options, name: str):
    options = tuple(options)
    if not options:
        raise ValueError(f"{name} is empty. Pass at least one option.")
    return options[int(rng.integers(len(options)))]


def sample_spec(
    rng: np.random.Generator | int,
    motions: tuple[str, ...] = TRAIN_MOTIONS,
    shapes: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS),
    speeds: tuple[str, ...] = SPEEDS,
) -> ClipSpec:
    """Sample a random clip whose object stays inside the frame.

    The motion, shape, background (among those some color stands out on), color (among those that stand out on
    the background), speed (``"normal"`` for still objects), size and start position are drawn in that order from
    ``rng``, so a seed fixes the spec.

    Args:
        rng: A numpy Generator, or an int seed for a fresh one.
        motions: Motions to draw from; use ``UNSEEN_MOTIONS`` for one-shot test clips.
        shapes: Shapes to draw from.
        colors: Colors to draw from.
        backgrounds: Backgrounds to draw from.
        speeds: Speeds to draw from.

    Returns:
        A valid ``ClipSpec``.

    Example:
        >>> spec = sample_spec(0)
        >>> spec == sample_spec(0)
        True
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    motion = _choice(rng, motions, "motions")
    shape = _choice(rng, shapes, "shapes")
    colors = tuple(colors)
    background = _choice(rng, [b for b in backgrounds if any(is_compatible(c, b) for c in colors)], "backgrounds")
    color = _choice(rng, [c for c in colors if is_compatible(c, background)], f"colors compatible with {background}")
    speed = "normal" if motion == "still" else _choice(rng, speeds, "speeds")
    size_range = {"growing": (0.2, 0.3), "shrinking": (0.4, 0.55)}.get(motion, SIZE_RANGE)
    size = round(float(rng.uniform(*size_range)), 4)
    bounds = _start_bounds(motion, speed, size)
    start = tuple(round(float(rng.uniform(lo, hi)), 4) for lo, hi in bounds)
    start = tuple(float(np.clip(v, lo, hi)) for v, (lo, hi) in zip(start, bounds))
    return ClipSpec(shape, color, background, motion, speed, size, start)


_CAPTION = re.compile(
    r"^an? (?P<color>\w+) (?P<shape>\w+) (?P<motion>.+?)(?: on an? (?P<background>\w+) background)?$"
)
_PHRASE_TO_MOTION = {
    motion_phrase(m, s): (m, s) for m in MOTION_PHRASES for s in SPEEDS if not (m == "still" and s != "normal")
}


def parse_caption(caption: str) -> dict[str, str | None]:
    """Read shape, color, motion, speed and background back from a caption or appearance-invariant prompt.

    Args:
        caption: A caption made by ``ClipSpec.caption`` or ``ClipSpec.appearance_invariant_prompt``.

    Returns:
        A dict with keys ``shape``, ``color``, ``motion``, ``speed``, ``background`` (``None`` when the caption has
        no background).

    Raises:
        ValueError: The caption does not follow the world's grammar or uses an unknown word.

    Example:
        >>> parse_caption("an orange star moving up and to the left quickly on a striped background")["motion"]
        'up-left'
    """
    match = _CAPTION.match(caption.strip().lower())
    if match is None or match["motion"] not in _PHRASE_TO_MOTION:
        raise ValueError(
            f"caption {caption!r} does not read 'a <color> <shape> <motion> on a <background> background'. "
            "Pass a caption made by ClipSpec.caption."
        )
    motion, speed = _PHRASE_TO_MOTION[match["motion"]]
    parsed = {**match.groupdict(), "motion": motion, "speed": speed}
    for key, allowed in (("color", COLORS), ("shape", SHAPES), ("background", BACKGROUNDS)):
        if parsed[key] is not None and parsed[key] not in allowed:
            raise ValueError(f"caption {caption!r} names {key} {parsed[key]!r}, not one of {tuple(allowed)}.")
    return parsed


def appearance_invariant_prompt(caption: str) -> str:
    """Drop the background from a world caption, keeping the object and its motion.

    Example:
        >>> appearance_invariant_prompt("a red circle moving left on a blue background")
        'a red circle moving left'
    """
    parse_caption(caption)
    return re.sub(r" on an? \w+ background$", "", caption.strip())
