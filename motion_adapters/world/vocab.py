"""The shapes world's vocabulary: shapes, colors, backgrounds, motions, speeds and how each motion moves.

Everything a caption can say is defined here, together with the exact path each motion follows, so captions,
renderings and metrics all agree on one table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    "is_compatible",
    "motion_path",
    "motion_phrase",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
"""Shape names. Every shape is drawn inside a circle of diameter ``ClipSpec.size`` centered on its centroid."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 50),
    "purple": (160, 70, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
"""Object color names and their RGB values."""


@dataclass(frozen=True)
class Background:
    """A background: a plain color or a two-color texture, named as captions name it.

    Attributes:
        name: The caption word, as in "on a checkered background".
        kind: ``"plain"``, ``"checkered"`` (squares) or ``"striped"`` (horizontal stripes).
        colors: One RGB color for plain backgrounds, two for textures.

    Example:
        >>> BACKGROUNDS["checkered"].kind
        'checkered'
    """

    name: str
    kind: str
    colors: tuple[tuple[int, int, int], ...]


BACKGROUNDS: dict[str, Background] = {
    b.name: b
    for b in (
        Background("black", "plain", ((15, 15, 15),)),
        Background("gray", "plain", ((120, 120, 120),)),
        Background("blue", "plain", ((30, 45, 120),)),
        Background("green", "plain", ((30, 90, 45),)),
        Background("checkered", "checkered", ((35, 35, 35), (85, 85, 85))),
        Background("striped", "striped", ((40, 40, 80), (85, 85, 130))),
    )
}
"""Backgrounds by name: four plain colors and two textures."""

MIN_CONTRAST = 100.0
"""Smallest RGB distance allowed between an object color and any color of its background."""

_DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-1.0, -1.0),
    "up-right": (1.0, -1.0),
    "down-left": (-1.0, 1.0),
    "down-right": (1.0, 1.0),
}

MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "up-left": "moving up and to the left",
    "up-right": "moving up and to the right",
    "down-left": "moving down and to the left",
    "down-right": "moving down and to the right",
    "still": "staying still",
    "growing": "growing",
    "shrinking": "shrinking",
    "zigzag": "zigzagging to the right",
    "circling": "moving in a circle",
    "bouncing": "bouncing up and down",
}
"""How captions phrase each motion (before the speed adverb)."""

TRAIN_MOTIONS: tuple[str, ...] = (*_DIRECTIONS, "still", "growing", "shrinking")
"""Motions of the pretraining set: 8 translations, still, growing and shrinking."""
UNSEEN_MOTIONS: tuple[str, ...] = ("zigzag", "circling", "bouncing")
"""Motions kept out of pretraining, for one-shot motion learning tests."""
MOTIONS: tuple[str, ...] = TRAIN_MOTIONS + UNSEEN_MOTIONS
"""Every motion name."""

SPEEDS: tuple[str, ...] = ("slowly", "normal", "quickly")
"""Speed names; ``"normal"`` adds no adverb to the caption. A still object only takes ``"normal"``."""

# Per-speed amplitudes, in units of the frame side (translations, zigzag, bouncing) or as factors.
TRAVEL = {"slowly": 0.15, "normal": 0.3, "quickly": 0.45}  # translation / zigzag distance over the clip
GROWTH = {"slowly": 1.3, "normal": 1.6, "quickly": 2.0}  # size ratio between the last and first frame
TURNS = {"slowly": 0.5, "normal": 0.75, "quickly": 1.0}  # revolutions of the circling motion
BOUNCE = {"slowly": 0.15, "normal": 0.25, "quickly": 0.35}  # bounce height
ZIGZAG_LEGS, ZIGZAG_HEIGHT, ORBIT_RADIUS, BOUNCES = 4, 0.12, 0.18, 2


def is_compatible(color: str, background: str) -> bool:
    """Whether an object of ``color`` stands out on ``background``: different names and enough RGB contrast.

    Example:
        >>> is_compatible("red", "blue"), is_compatible("blue", "blue")
        (True, False)
    """
    if color == background:
        return False
    rgb = np.asarray(COLORS[color], dtype=float)
    return all(np.linalg.norm(rgb - np.asarray(c, float)) >= MIN_CONTRAST for c in BACKGROUNDS[background].colors)


def motion_phrase(motion: str, speed: str = "normal") -> str:
    """The caption words for a motion at a speed, e.g. ``"moving up and to the right quickly"``.

    Example:
        >>> motion_phrase("left"), motion_phrase("growing", "slowly")
        ('moving left', 'growing slowly')
    """
    if motion not in MOTION_PHRASES:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}.")
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {SPEEDS}, got {speed!r}.")
    return MOTION_PHRASES[motion] if speed == "normal" else f"{MOTION_PHRASES[motion]} {speed}"


def motion_path(motion: str, speed: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the object's center from its start, and its size factor, at normalised times ``t`` in [0, 1].

    Coordinates are fractions of the frame: x to the right, y downwards. Time 0 is the first frame and 1 the last,
    so a clip covers the same path whatever its frame count. Translations move ``TRAVEL[speed]`` in total along
    their direction (diagonals split it over both axes); ``growing``/``shrinking`` scale the size geometrically
    by ``GROWTH[speed]`` (or its inverse) without moving; ``zigzag`` moves right by ``TRAVEL[speed]`` while going
    up and down ``ZIGZAG_LEGS`` times; ``circling`` turns clockwise ``TURNS[speed]`` times on a circle of radius
    ``ORBIT_RADIUS`` starting from its top; ``bouncing`` rises ``BOUNCE[speed]`` and falls back ``BOUNCES`` times.

    Args:
        motion: A name in ``MOTIONS``.
        speed: A name in ``SPEEDS``.
        t: Normalised times, shape (T,).

    Returns:
        ``(offsets, scales)`` of shapes (T, 2) and (T,).

    Example:
        >>> offsets, scales = motion_path("right", "normal", np.array([0.0, 1.0]))
        >>> offsets.tolist(), scales.tolist()
        ([[0.0, 0.0], [0.3, 0.0]], [1.0, 1.0])
    """
    if motion not in MOTION_PHRASES:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}.")
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {SPEEDS}, got {speed!r}.")
    t = np.asarray(t, dtype=np.float64)
    offsets = np.zeros((t.size, 2))
    scales = np.ones(t.size)
    if motion in _DIRECTIONS:
        direction = np.asarray(_DIRECTIONS[motion])
        offsets = t[:, None] * TRAVEL[speed] * direction / np.linalg.norm(direction)
    elif motion == "growing":
        scales = GROWTH[speed] ** t
    elif motion == "shrinking":
        scales = GROWTH[speed] ** -t
    elif motion == "zigzag":
        phase = (t * ZIGZAG_LEGS) % 2.0
        offsets[:, 0] = TRAVEL[speed] * t
        offsets[:, 1] = -ZIGZAG_HEIGHT * np.where(phase <= 1.0, phase, 2.0 - phase)
    elif motion == "circling":
        angle = 2 * np.pi * TURNS[speed] * t
        offsets[:, 0] = ORBIT_RADIUS * np.sin(angle)
        offsets[:, 1] = ORBIT_RADIUS * (1 - np.cos(angle))
    elif motion == "bouncing":
        offsets[:, 1] = -BOUNCE[speed] * np.abs(np.sin(np.pi * BOUNCES * t))
    return offsets, scales
