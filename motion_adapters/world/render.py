"""Draw shapes-world clips: anti-aliased shapes composited on plain or textured backgrounds, as tensors in [-1, 1]."""

from __future__ import annotations

import numpy as np
import torch

from .spec import ClipSpec
from .vocab import BACKGROUNDS, COLORS, SHAPES

__all__ = ["render_background", "render_clip", "shape_area", "shape_coverage"]

STAR_INNER_RADIUS = 0.5
"""Inner radius of the five-pointed star, relative to its outer radius."""


def _polygon(shape: str) -> np.ndarray:
    """Vertices (x, y downwards) of a shape of circumradius 1 centered on its centroid; angles from straight up."""
    if shape == "triangle":
        angles, radii = np.deg2rad([0.0, 120.0, 240.0]), np.ones(3)
    elif shape == "star":
        angles, radii = np.deg2rad(np.arange(10) * 36.0), np.tile([1.0, STAR_INNER_RADIUS], 5)
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
    return np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)


def shape_area(shape: str) -> float:
    """Area of a shape drawn in a circle of diameter 1 (multiply by the diameter squared for other sizes).

    Example:
        >>> round(shape_area("circle"), 4), shape_area("square")
        (0.7854, 0.5)
    """
    if shape == "circle":
        return float(np.pi / 4)
    if shape == "square":
        return 0.5
    x, y = _polygon(shape).T / 2
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v), in units of the circumradius around the center, lie inside the shape."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1 / np.sqrt(2)
    inside = np.zeros(u.shape, dtype=bool)
    vertices = _polygon(shape)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):  # even-odd rule
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def shape_coverage(
    shape: str, center: tuple[float, float], diameter: float, height: int, width: int, supersample: int = 4
) -> np.ndarray:
    """Fraction of each pixel covered by a shape, estimated with ``supersample``² samples per pixel.

    Pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)`` in pixel units, so its center is at ``(j + 0.5, i + 0.5)``.

    Args:
        shape: A name in ``SHAPES``.
        center: Centroid (x, y) in pixels.
        diameter: Diameter of the circle the shape is drawn in, in pixels.
        height: Frame height in pixels.
        width: Frame width in pixels.
        supersample: Samples per pixel side.

    Returns:
        Coverage in [0, 1], shape (height, width).

    Example:
        >>> float(shape_coverage("square", (4.0, 4.0), 4 * 2**0.5, 8, 8).sum())  # a 4 x 4 pixel square
        16.0
    """
    coverage = np.zeros((height, width))
    radius = diameter / 2
    if radius <= 0:
        return coverage
    x0, x1 = max(int(np.floor(center[0] - radius)), 0), min(int(np.ceil(center[0] + radius)) + 1, width)
    y0, y1 = max(int(np.floor(center[1] - radius)), 0), min(int(np.ceil(center[1] + radius)) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return coverage
    sub = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + sub).ravel()
    ys = (np.arange(y0, y1)[:, None] + sub).ravel()
    u, v = np.meshgrid((xs - center[0]) / radius, (ys - center[1]) / radius)
    inside = _inside(shape, u, v).astype(np.float64)
    window = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    coverage[y0:y1, x0:x1] = window
    return coverage


def _background_array(background: str, height: int, width: int) -> np.ndarray:
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {tuple(BACKGROUNDS)}, got {background!r}.")
    spec = BACKGROUNDS[background]
    colors = np.asarray(spec.colors, dtype=np.float64)
    cell = max(2, round(min(height, width) / 8))
    rows, cols = np.arange(height)[:, None] // cell, np.arange(width)[None, :] // cell
    if spec.kind == "plain":
        index = np.zeros((height, width), dtype=int)
    elif spec.kind == "checkered":
        index = (rows + cols) % 2
    else:  # striped: horizontal stripes
        index = np.broadcast_to(rows % 2, (height, width))
    return colors[index]


def _check_frame_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 8:
            raise ValueError(f"{name} must be an int >= 8, got {value!r}.")


def render_background(background: str, height: int = 32, width: int = 32) -> torch.Tensor:
    """Draw a background without any object, as a (3, height, width) tensor in [-1, 1].

    Textures use cells of ``max(2, round(min(height, width) / 8))`` pixels: checkered squares or horizontal
    stripes, starting with the texture's first color at the top left.

    Example:
        >>> render_background("checkered", 32, 32).shape
        torch.Size([3, 32, 32])
    """
    _check_frame_size(height, width)
    array = _background_array(background, height, width)
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).to(torch.float32)


def render_clip(
    spec: ClipSpec, num_frames: int = 8, height: int = 32, width: int = 32, supersample: int = 4
) -> torch.Tensor:
    """Render a clip as a (3, num_frames, height, width) float32 tensor in [-1, 1].

    The object follows ``spec.trajectory(num_frames)`` exactly: its centroid in frame ``i`` is at
    ``(x * width, y * height)`` pixels, and its diameter is ``spec.sizes(num_frames)[i] * min(height, width)``
    pixels. Edges are anti-aliased by ``supersample``² samples per pixel, and values are rounded to uint8 levels so
    the clip survives a lossless round trip through png or gif unchanged.

    Args:
        spec: What to draw.
        num_frames: Number of frames.
        height: Frame height in pixels (at least 8).
        width: Frame width in pixels (at least 8).
        supersample: Anti-aliasing samples per pixel side; 1 draws hard edges.

    Returns:
        The clip, deterministic for a given spec and size.

    Example:
        >>> spec = ClipSpec("circle", "red", "blue", "left", start=(0.7, 0.5))
        >>> render_clip(spec, num_frames=8, height=32, width=32).shape
        torch.Size([3, 8, 32, 32])
    """
    if not isinstance(spec, ClipSpec):
        raise ValueError(f"spec must be a ClipSpec, got {type(spec).__name__}. Build one with sample_spec.")
    _check_frame_size(height, width)
    if not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample must be an int >= 1, got {supersample!r}.")
    background = _background_array(spec.background, height, width)
    color = np.asarray(COLORS[spec.color], dtype=np.float64)
    centers, diameters = spec.trajectory(num_frames), spec.sizes(num_frames) * min(height, width)
    frames = np.empty((num_frames, height, width, 3))
    for i, ((x, y), diameter) in enumerate(zip(centers, diameters)):
        alpha = shape_coverage(spec.shape, (x * width, y * height), diameter, height, width, supersample)[..., None]
        frames[i] = background * (1 - alpha) + color * alpha
    frames = np.round(frames)
    return torch.from_numpy(frames / 127.5 - 1.0).permute(3, 0, 1, 2).to(torch.float32)
