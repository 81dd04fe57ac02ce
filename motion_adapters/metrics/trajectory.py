"""Motion and appearance fidelity for shapes-world clips: segment the object, track its centroid, compare paths.

The object is separated from the background by color. The background is either given (an image such as
``render_background``) or estimated as a palette of at most three colors from the frame border over all frames,
which covers the world's plain and two-color textured backgrounds even when the object never moves. Each pixel
gets a soft coverage ``alpha`` in [0, 1], the fraction of the way from its background color to the object color,
so centroids are sub-pixel accurate on anti-aliased clips.
"""

from __future__ import annotations

import numpy as np
import torch

from ..world.render import shape_area, shape_coverage
from ..world.spec import ClipSpec, parse_caption
from ..world.vocab import BACKGROUNDS, COLORS, SHAPES

__all__ = [
    "appearance_check",
    "estimate_background_palette",
    "foreground_area",
    "mask_centroids",
    "segment_foreground",
    "track_object",
    "trajectory_fidelity",
    "video_motion_fidelity",
]

NOISE_LEVEL = 30.0
"""RGB distance below which a pixel counts as background."""
PALETTE_RADIUS = 40.0
"""RGB distance within which border pixels join a palette color."""
PALETTE_MIN_SHARE = 0.15
"""Share of the border pixels a second or third palette color needs."""


def _frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float64 in [0, 255] from a (3, F, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array."""
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video array must be uint8 (F, H, W, 3), got {video.dtype} {video.shape}.")
        return video.astype(np.float64)
    if isinstance(video, torch.Tensor):
        video = video.detach().to("cpu", torch.float32)
        if video.ndim == 5 and video.shape[0] == 1:
            video = video[0]
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(f"video must have shape (3, F, H, W), got {tuple(video.shape)}.")
        return (np.clip(video.permute(1, 2, 3, 0).numpy().astype(np.float64), -1, 1) + 1) * 127.5
    raise ValueError(f"video must be a torch.Tensor or a uint8 numpy array, got {type(video).__name__}.")


def _palette(frames: np.ndarray) -> np.ndarray:
    height, width = frames.shape[1:3]
    ring = max(1, round(min(height, width) / 16))
    border = np.ones((height, width), dtype=bool)
    border[ring:-ring, ring:-ring] = False
    pixels = frames[:, border].reshape(-1, 3)
    total, palette = len(pixels), []
    while len(pixels) and len(palette) < 3:
        bins = np.clip(np.floor(pixels / 16), 0, 15).astype(np.int64)
        keys, counts = np.unique(bins[:, 0] * 256 + bins[:, 1] * 16 + bins[:, 2], return_counts=True)
        key = keys[np.argmax(counts)]
        seed = (np.array([key // 256, key // 16 % 16, key % 16]) + 0.5) * 16
        near = np.linalg.norm(pixels - seed, axis=1) <= PALETTE_RADIUS
        if palette and near.sum() < PALETTE_MIN_SHARE * total:
            break
        color = np.median(pixels[near], axis=0)
        near = np.linalg.norm(pixels - color, axis=1) <= PALETTE_RADIUS
        palette.append(color)
        pixels = pixels[~near]
    return np.asarray(palette)


def estimate_background_palette(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Estimate the background's colors from the frame border: a (K, 3) RGB array, K <= 3, most common first.

    Border pixels (a ring of ``max(1, round(min(H, W) / 16))`` pixels, over all frames) are grouped greedily: the
    most populated 16-level color bin is refined to the median of the pixels within ``PALETTE_RADIUS`` of it, those
    pixels are removed, and the next color is kept while it holds at least ``PALETTE_MIN_SHARE`` of the border.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> estimate_background_palette(render_clip(ClipSpec("circle", "red", "gray", "still"))).round().tolist()
        [[120.0, 120.0, 120.0]]
    """
    return _palette(_frames(video))


def _alpha_to(frames: np.ndarray, backgrounds: np.ndarray, color: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of ``color`` over each candidate background, and the residual distance to that mix."""
    direction = color - backgrounds  # (..., 3)
    length2 = np.maximum((direction * direction).sum(-1), 1e-9)
    alpha = np.clip(((frames - backgrounds) * direction).sum(-1) / length2, 0.0, 1.0)
    residual = np.linalg.norm(frames - backgrounds - alpha[..., None] * direction, axis=-1)
    return alpha, residual


def _segment(
    frames: np.ndarray, background: torch.Tensor | None, palette: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Soft mask (F, H, W) and object RGB color (None when nothing stands out) of float frames in [0, 255]."""
    if background is None:
        palette = _palette(frames) if palette is None else palette
        distance = np.linalg.norm(frames[..., None, :] - palette, axis=-1).min(-1)
    else:
        if not isinstance(background, torch.Tensor) or background.ndim not in (3, 4):
            raise ValueError(
                "background must be a (3, H, W) or (3, F, H, W) tensor in [-1, 1], e.g. render_background."
            )
        bg = _frames(background[:, None] if background.ndim == 3 else background)
        if bg.shape[1:3] != frames.shape[1:3]:
            raise ValueError(f"background is {bg.shape[1:3]} pixels, the video {frames.shape[1:3]}. Pass a match.")
        distance = np.linalg.norm(frames - bg, axis=-1)
    foreground = distance > NOISE_LEVEL
    if not foreground.any():
        return np.zeros(frames.shape[:3]), None
    color = np.median(frames[distance >= 0.8 * distance.max()], axis=0)
    if background is None:
        alpha, residual = _alpha_to(frames[..., None, :], palette, color)
        alpha = np.take_along_axis(alpha, residual.argmin(-1)[..., None], axis=-1)[..., 0]
    else:
        alpha, _ = _alpha_to(frames, bg, color)
    return np.where(foreground, alpha, 0.0), color


def segment_foreground(video: torch.Tensor | np.ndarray, background: torch.Tensor | None = None) -> np.ndarray:
    """Soft foreground mask of the one object in a clip, shape (F, H, W), values in [0, 1].

    Pixels farther than ``NOISE_LEVEL`` from the background are foreground; the object color is the median color
    of the pixels at least 80% as far from the background as the farthest one. Each foreground pixel's value is its
    coverage ``alpha``: where it lies between its background color and the object color (for an estimated palette,
    the palette color that explains the pixel best). Assumes one object of one color.

    Args:
        video: A (3, F, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array.
        background: The empty background, a (3, H, W) or (3, F, H, W) tensor in [-1, 1] such as
            ``render_background``; ``None`` estimates a palette with :func:`estimate_background_palette`.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> mask = segment_foreground(render_clip(ClipSpec("square", "red", "checkered", "still")))
        >>> mask.shape
        (8, 32, 32)
    """
    return _segment(_frames(video), background)[0]


def mask_centroids(masks: np.ndarray, min_area: float = 0.5) -> np.ndarray:
    """Centroid (x, y) of each soft mask as fractions of the frame, shape (F, 2); NaN where the area < min_area px.

    Pixel ``(i, j)`` has its center at ``((j + 0.5) / W, (i + 0.5) / H)``, matching ``ClipSpec.trajectory``.

    Example:
        >>> mask_centroids(np.pad(np.ones((1, 2, 2)), ((0, 0), (0, 2), (0, 2)))).tolist()
        [[0.25, 0.25]]
    """
    masks = np.asarray(masks, dtype=np.float64)
    height, width = masks.shape[1:]
    area = masks.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (masks.sum(axis=1) * (np.arange(width) + 0.5)).sum(axis=1) / area / width
        y = (masks.sum(axis=2) * (np.arange(height) + 0.5)).sum(axis=1) / area / height
    centers = np.stack([x, y], axis=1)
    centers[area < min_area] = np.nan
    return centers


def track_object(video: torch.Tensor | np.ndarray, background: torch.Tensor | None = None) -> np.ndarray:
    """Track the object's centroid through a clip: (F, 2) array of (x, y) fractions of the frame, NaN when absent.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> spec = ClipSpec("circle", "red", "striped", "right", start=(0.3, 0.5))
        >>> bool(np.abs(track_object(render_clip(spec)) - spec.trajectory(8)).max() < 0.01)
        True
    """
    return mask_centroids(segment_foreground(video, background))


def foreground_area(video: torch.Tensor | np.ndarray, background: torch.Tensor | None = None) -> np.ndarray:
    """Area of the object in each frame as a fraction of the frame, shape (F,).

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> area = foreground_area(render_clip(ClipSpec("square", "red", "black", "growing", size=0.3)))
        >>> bool(area[-1] > area[0])
        True
    """
    return segment_foreground(video, background).mean(axis=(1, 2))


def _pair_cosines(generated: np.ndarray, reference: np.ndarray, still: float) -> np.ndarray:
    """Cosine per step of (T, D) displacements: 1 if both still, 0 if one still or missing, else the cosine."""
    norm_g, norm_r = np.linalg.norm(generated, axis=1), np.linalg.norm(reference, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (generated * reference).sum(1) / (norm_g * norm_r)
    still_g, still_r = norm_g < still, norm_r < still
    cosine = np.where(still_g & still_r, 1.0, np.where(still_g | still_r, 0.0, cosine))
    return np.where(np.isnan(norm_g) | np.isnan(norm_r), 0.0, cosine)


def trajectory_fidelity(
    generated: np.ndarray,
    reference: np.ndarray,
    frame_size: tuple[int, int] | None = None,
    still_threshold: float = 0.005,
) -> dict[str, float]:
    """Compare two centroid paths of the same length.

    Positions are first expressed in units of the frame diagonal (pixels divided by ``sqrt(H² + W²)`` when
    ``frame_size = (H, W)`` is given, else fractions of a square frame divided by ``sqrt(2)``).

    * ``displacement_cosine``: mean over consecutive frame pairs of the cosine between the two displacement
      vectors. A displacement shorter than ``still_threshold`` counts as still: both still scores 1, one still
      scores 0; a pair with a missing (NaN) position scores 0. Range [-1, 1]; a reversed motion scores about -1.
    * ``endpoint_error``: distance between the two final positions after moving both paths to start at the same
      point, in diagonals. NaN when the generated object is lost in the first or last frame.
    * ``mean_error``: the same distance averaged over all frames (missing frames ignored; NaN if all are missing).
    * ``tracked_fraction``: share of frames where the generated object was found.

    Args:
        generated: (F, 2) positions, e.g. from :func:`track_object`.
        reference: (F, 2) positions, e.g. ``spec.trajectory(F)``.
        frame_size: (H, W) of the frames the positions are fractions of; ``None`` treats them as square.
        still_threshold: Step length, in diagonals, below which a step counts as no motion.

    Example:
        >>> ref = np.array([[0.2, 0.5], [0.4, 0.5], [0.6, 0.5]])
        >>> trajectory_fidelity(ref[::-1], ref)["displacement_cosine"]
        -1.0
    """
    generated, reference = np.asarray(generated, np.float64), np.asarray(reference, np.float64)
    if generated.shape != reference.shape or generated.ndim != 2 or generated.shape[1] != 2:
        raise ValueError(
            f"generated and reference must both be (F, 2), got {generated.shape} and {reference.shape}. "
            "Track clips with the same number of frames."
        )
    if frame_size is None:
        scale = np.array([1.0, 1.0]) / np.sqrt(2)
    else:
        height, width = frame_size
        scale = np.array([width, height], dtype=np.float64) / np.hypot(height, width)
    gen, ref = generated * scale, reference * scale
    cosines = _pair_cosines(np.diff(gen, axis=0), np.diff(ref, axis=0), still_threshold)
    errors = np.linalg.norm((gen - gen[0]) - (ref - ref[0]), axis=1)
    valid = ~np.isnan(errors)
    return {
        "displacement_cosine": float(cosines.mean()) if len(cosines) else 1.0,
        "endpoint_error": float(errors[-1]),
        "mean_error": float(errors[valid].mean()) if valid.any() else float("nan"),
        "tracked_fraction": float((~np.isnan(generated).any(axis=1)).mean()),
    }


def video_motion_fidelity(
    generated: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray,
    scale_threshold: float = 0.02,
) -> dict[str, float]:
    """Track the object in two clips and compare their motion, position and size.

    Returns the keys of :func:`trajectory_fidelity` plus ``scale_agreement``: the mean over frame pairs of the sign
    agreement of the change in object size (log of the square root of the area), where changes under
    ``scale_threshold`` (2% by default) count as none: both none or same sign 1, one none 0, opposite signs -1.
    Growing against shrinking scores -1 while their centroids alone would look alike.

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> grow = render_clip(ClipSpec("circle", "red", "black", "growing", size=0.3))
        >>> video_motion_fidelity(grow, grow.flip(1))["scale_agreement"]
        -1.0
    """
    gen_frames, ref_frames = _frames(generated), _frames(reference)
    if gen_frames.shape[0] != ref_frames.shape[0]:
        raise ValueError(
            f"generated has {gen_frames.shape[0]} frames, reference {ref_frames.shape[0]}. Pass clips of equal length."
        )
    gen_masks, ref_masks = _segment(gen_frames, None)[0], _segment(ref_frames, None)[0]
    result = trajectory_fidelity(
        mask_centroids(gen_masks), mask_centroids(ref_masks), frame_size=gen_frames.shape[1:3]
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        gen_size = np.diff(0.5 * np.log(gen_masks.sum(axis=(1, 2))))[:, None]
        ref_size = np.diff(0.5 * np.log(ref_masks.sum(axis=(1, 2))))[:, None]
    gen_size[~np.isfinite(gen_size)], ref_size[~np.isfinite(ref_size)] = np.nan, np.nan
    agreement = _pair_cosines(gen_size, ref_size, scale_threshold)
    result["scale_agreement"] = float(agreement.mean()) if len(agreement) else 1.0
    return result


def _classify_shape(alpha: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-matching shape for one frame's soft mask, and the soft IoU of every shape's template."""
    height, width = alpha.shape
    area = alpha.sum()
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    center = ((alpha.sum(0) * xs).sum() / area, (alpha.sum(1) * ys).sum() / area)
    scores = {}
    for shape in SHAPES:
        template = shape_coverage(shape, center, float(np.sqrt(area / shape_area(shape))), height, width)
        scores[shape] = float(np.minimum(alpha, template).sum() / np.maximum(alpha, template).sum())
    return max(scores, key=scores.get), scores


def _classify_background(frames: np.ndarray, masks: np.ndarray, palette: np.ndarray) -> str:
    if len(palette) == 1:
        candidates = [b for b in BACKGROUNDS.values() if b.kind == "plain"]
        return min(candidates, key=lambda b: np.linalg.norm(palette[0] - b.colors[0])).name
    labels = np.linalg.norm(frames[..., None, :] - palette[:2], axis=-1).argmin(-1)
    empty = masks == 0
    across = (labels[:, :, 1:] != labels[:, :, :-1])[empty[:, :, 1:] & empty[:, :, :-1]].mean()
    down = (labels[:, 1:] != labels[:, :-1])[empty[:, 1:] & empty[:, :-1]].mean()
    kind = "striped" if across < 0.3 * down else "checkered"
    candidates = [b for b in BACKGROUNDS.values() if b.kind == kind]
    mean = palette[:2].mean(0)
    return min(candidates, key=lambda b: np.linalg.norm(mean - np.mean(b.colors, axis=0))).name


def appearance_check(video: torch.Tensor | np.ndarray, expected: ClipSpec | str) -> dict:
    """Check that a clip shows the color, shape and background a spec or caption asks for.

    The object color is the nearest named color to the segmented object's color. The background is plain when the
    border palette has one color (nearest plain color), else a texture: horizontal stripes when labels change
    across rows at least ~3x more often than along them, else checkered. The shape is the one whose template, drawn
    by the world's renderer at the mask's centroid with the mask's area, best overlaps (soft IoU) the mask of the
    frame where the object is largest.

    Args:
        video: A (3, F, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array showing one object.
        expected: A ``ClipSpec`` or a world caption (``parse_caption`` reads it; it must name the background).

    Returns:
        ``{"color": bool, "shape": bool, "background": bool, "accuracy": float, "predicted": dict}``; ``accuracy``
        is the share of the three attributes that match, and ``predicted`` holds the names found (``None`` when no
        object was found).

    Example:
        >>> from motion_adapters.world import ClipSpec, render_clip
        >>> spec = ClipSpec("star", "yellow", "striped", "right", start=(0.3, 0.5))
        >>> appearance_check(render_clip(spec, height=64, width=64), spec)["accuracy"]
        1.0
    """
    if isinstance(expected, ClipSpec):
        want = {"color": expected.color, "shape": expected.shape, "background": expected.background}
    elif isinstance(expected, str):
        want = parse_caption(expected)
        if want["background"] is None:
            raise ValueError(f"caption {expected!r} names no background. Pass a full caption or a ClipSpec.")
    else:
        raise ValueError(f"expected must be a ClipSpec or a caption, got {type(expected).__name__}.")
    frames = _frames(video)
    palette = _palette(frames)
    masks, color = _segment(frames, None, palette)
    predicted = {"color": None, "shape": None, "background": _classify_background(frames, masks, palette)}
    if color is not None:
        predicted["color"] = min(COLORS, key=lambda name: np.linalg.norm(color - np.asarray(COLORS[name])))
        predicted["shape"] = _classify_shape(masks[int(masks.sum(axis=(1, 2)).argmax())])[0]
    result = {key: predicted[key] == want[key] for key in ("color", "shape", "background")}
    return {**result, "accuracy": sum(result.values()) / 3, "predicted": predicted}
