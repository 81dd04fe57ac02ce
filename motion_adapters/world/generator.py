"""Build captioned shapes-world datasets and clip files, deterministically from a seed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..video import save_video
from .render import render_clip
from .spec import ClipSpec, sample_spec
from .vocab import TRAIN_MOTIONS

__all__ = ["make_dataset", "write_clip"]


def make_dataset(
    n: int,
    seed: int = 0,
    motions: tuple[str, ...] = TRAIN_MOTIONS,
    num_frames: int = 8,
    height: int = 32,
    width: int = 32,
    **sample_kwargs,
) -> list[tuple[torch.Tensor, str, ClipSpec]]:
    """Render ``n`` random captioned clips; the same arguments always give identical tensors.

    Clip ``i`` shows motion ``motions[i % len(motions)]``, so every motion appears equally often; everything else
    is drawn by :func:`sample_spec` from ``numpy.random.default_rng(seed)``.

    Args:
        n: Number of clips.
        seed: Seed of the random generator.
        motions: Motions to cycle through; ``TRAIN_MOTIONS`` for pretraining, ``UNSEEN_MOTIONS`` for one-shot tests.
        num_frames: Frames per clip.
        height: Frame height in pixels.
        width: Frame width in pixels.
        **sample_kwargs: ``shapes``, ``colors``, ``backgrounds`` or ``speeds`` passed to :func:`sample_spec`.

    Returns:
        A list of ``(video, caption, spec)`` with videos of shape (3, num_frames, height, width) in [-1, 1].

    Example:
        >>> video, caption, spec = make_dataset(4, seed=0)[0]
        >>> video.shape, caption == spec.caption
        (torch.Size([3, 8, 32, 32]), True)
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}.")
    motions = tuple(motions)
    if not motions:
        raise ValueError("motions is empty. Pass at least one motion, e.g. TRAIN_MOTIONS.")
    rng = np.random.default_rng(seed)
    dataset = []
    for i in range(n):
        spec = sample_spec(rng, motions=(motions[i % len(motions)],), **sample_kwargs)
        dataset.append((render_clip(spec, num_frames, height, width), spec.caption, spec))
    return dataset


def write_clip(
    spec: ClipSpec,
    path: str | os.PathLike,
    num_frames: int = 8,
    height: int = 32,
    width: int = 32,
    fps: float = 8,
) -> Path:
    """Render a clip and write it to an mp4 or gif file (atomically, via :func:`motion_adapters.video.save_video`).

    gif files keep the pixel values up to one level out of 255 (the world uses few colors); mp4 files are lossy
    (libx264, yuv420p, which also halves the color resolution).

    Example:
        >>> write_clip(sample_spec(0), "clip.gif")
        PosixPath('clip.gif')
    """
    return save_video(render_clip(spec, num_frames, height, width), path, fps=fps)
