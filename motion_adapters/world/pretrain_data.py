"""Training clips of the default model: a pool of seen-motion clip specs, rendered in batches on the training device.

The pool is sampled once by CPU workers with the world's own ``sample_spec`` (``TRAIN_MOTIONS`` only); every batch
is then drawn from it and rendered by :func:`render_frames`, a batched torch port of ``render_clip`` that gives the
same pixels, so data generation keeps up with a GPU.

Example:
    >>> batches = ClipBatches(SpecPool(32), torch.Generator().manual_seed(0))
    >>> batches.sr(2)["sample"].shape
    torch.Size([2, 3, 8, 96, 96])
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from .default_model import KEYFRAME_SIZE, NOISE_SCHEDULER_CONFIG, NUM_KEYFRAMES, SR_SIZE
from .render import _polygon, render_background
from .spec import sample_spec
from .vocab import BACKGROUNDS, COLORS, SHAPES, TRAIN_MOTIONS, UNSEEN_MOTIONS

__all__ = ["CAPTION_DROPOUT", "TIMELINE", "ClipBatches", "SpecPool", "render_frames"]

TIMELINE = 4 * (NUM_KEYFRAMES - 1) + 1
"""Frames of the full clip (29): keyframe ``i`` is frame ``4 i``."""
SR_WINDOW = 8
"""Frames of one super-resolution window (as Show-1's SR1)."""
MAX_SR_NOISE_LEVEL = 400
"""SR training draws the condition's noise level uniformly from [0, MAX_SR_NOISE_LEVEL)."""
CAPTION_DROPOUT = 0.1
"""Share of training captions replaced by "" so that classifier-free guidance has an unconditional model."""


def _sample_chunk(task: tuple[int, int, int, tuple[str, ...]]) -> dict[str, Any]:
    seed, start, count, motions = task
    rng = np.random.default_rng([seed, start])
    out = {"centers": [], "diameters": [], "shape": [], "color": [], "background": [], "caption": [], "motion": []}
    for i in range(start, start + count):
        spec = sample_spec(rng, motions=(motions[i % len(motions)],))
        out["centers"].append(spec.trajectory(TIMELINE))
        out["diameters"].append(spec.sizes(TIMELINE))
        out["shape"].append(SHAPES.index(spec.shape))
        out["color"].append(list(COLORS).index(spec.color))
        out["background"].append(list(BACKGROUNDS).index(spec.background))
        out["caption"].append(spec.caption)
        out["motion"].append(spec.motion)
    return out


def tokenize_captions(tokenizer, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize as the pipelines do (lower-cased, stripped, padded to 77, truncated); returns ids and mask."""
    tokens = tokenizer(
        [c.lower().strip() for c in captions], padding="max_length", max_length=77, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


class SpecPool:
    """Clip specs sampled up front: per clip its 29-frame path, size, shape, color, background and caption.

    Clip ``i`` shows motion ``motions[i % len(motions)]`` (as ``make_dataset``); the rest comes from
    ``sample_spec`` with a generator seeded by ``(seed, first clip of the chunk)`` for chunks of 2000 clips, so a
    pool depends on ``num_specs`` and ``seed`` only, not on ``workers``. Only ``TRAIN_MOTIONS`` are accepted.

    Args:
        num_specs: Clips in the pool.
        seed: Seed of the sampling.
        workers: CPU processes that sample specs.
        motions: Motions to cycle through.

    Example:
        >>> pool = SpecPool(64, seed=0, workers=1)
        >>> pool.centers.shape, len(pool.captions)
        (torch.Size([64, 29, 2]), 64)
    """

    def __init__(self, num_specs: int, seed: int = 0, workers: int = 1, motions: tuple[str, ...] = TRAIN_MOTIONS):
        unseen = sorted(set(motions) & set(UNSEEN_MOTIONS))
        if unseen or not set(motions) <= set(TRAIN_MOTIONS):
            raise ValueError(
                f"motions={motions} must be TRAIN_MOTIONS only: the unseen motions {UNSEEN_MOTIONS} are kept out of "
                "pretraining for the one-shot tests."
            )
        chunk = 2000
        tasks = [(seed, s, min(chunk, num_specs - s), tuple(motions)) for s in range(0, num_specs, chunk)]
        if workers > 1 and len(tasks) > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                parts = pool.map(_sample_chunk, tasks)
        else:
            parts = [_sample_chunk(task) for task in tasks]
        merged = {key: [v for part in parts for v in part[key]] for key in parts[0]}
        self.centers = torch.tensor(np.asarray(merged["centers"]), dtype=torch.float32)
        self.diameters = torch.tensor(np.asarray(merged["diameters"]), dtype=torch.float32)
        self.shapes = torch.tensor(merged["shape"])
        self.colors = torch.tensor(merged["color"])
        self.backgrounds = torch.tensor(merged["background"])
        self.captions = merged["caption"]
        self.motions = merged["motion"]
        self.unique_captions = sorted(set(self.captions)) + [""]
        index = {caption: i for i, caption in enumerate(self.unique_captions)}
        self.caption_ids = torch.tensor([index[c] for c in self.captions])

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> SpecPool:
        """Move the tensors to ``device`` (returns self)."""
        for name in ("centers", "diameters", "shapes", "colors", "backgrounds", "caption_ids"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def render_frames(
    centers: torch.Tensor,
    diameters: torch.Tensor,
    shapes: torch.Tensor,
    colors: torch.Tensor,
    backgrounds: torch.Tensor,
    size: int,
    supersample: int = 4,
) -> torch.Tensor:
    """Render a batch of world frames on the tensors' device, as ``render_clip`` draws them.

    Same geometry, anti-aliasing (``supersample``² samples per pixel), compositing and uint8 rounding as
    :func:`~motion_adapters.world.render_clip`; in float64 the frames are identical to it.

    Args:
        centers: (B, F, 2) object centers (x, y) as fractions of the frame.
        diameters: (B, F) diameters as fractions of the frame side.
        shapes: (B,) indices into ``SHAPES``.
        colors: (B,) indices into ``COLORS``.
        backgrounds: (B,) indices into ``BACKGROUNDS``.
        size: Frame height and width in pixels.
        supersample: Samples per pixel side.

    Returns:
        (B, 3, F, size, size) frames in [-1, 1], in ``centers``' dtype.

    Example:
        >>> spec = sample_spec(0)
        >>> ids = [torch.tensor([names.index(name)]) for names, name in
        ...        ((SHAPES, spec.shape), (list(COLORS), spec.color), (list(BACKGROUNDS), spec.background))]
        >>> centers, diameters = torch.tensor(spec.trajectory(8))[None], torch.tensor(spec.sizes(8))[None]
        >>> torch.equal(render_frames(centers, diameters, *ids, 32)[0].float(), render_clip(spec, 8, 32, 32))
        True
    """
    device, dtype = centers.device, centers.dtype
    batch, frames = diameters.shape
    sub = (torch.arange(supersample, device=device, dtype=dtype) + 0.5) / supersample
    grid = (torch.arange(size, device=device, dtype=dtype)[:, None] + sub).reshape(-1)
    radius = (diameters * size / 2)[..., None, None]
    u = (grid.view(1, 1, 1, -1) - (centers[..., 0] * size)[..., None, None]) / radius
    v = (grid.view(1, 1, -1, 1) - (centers[..., 1] * size)[..., None, None]) / radius
    inside = torch.zeros(batch, frames, grid.numel(), grid.numel(), dtype=torch.bool, device=device)
    for index, shape in enumerate(SHAPES):
        chosen = shapes == index
        if chosen.any():
            inside[chosen] = _inside_batch(shape, u[chosen], v[chosen])
    alpha = inside.view(batch, frames, size, supersample, size, supersample).to(dtype).mean(dim=(3, 5))[:, None]
    table = torch.stack([render_background(name, size, size).double() for name in BACKGROUNDS])
    background = ((table + 1) * 127.5).round().to(device=device, dtype=dtype)[backgrounds][:, :, None]
    color = torch.tensor(list(COLORS.values()), device=device, dtype=dtype)[colors][:, :, None, None, None]
    return (background * (1 - alpha) + color * alpha).round() / 127.5 - 1


def _inside_batch(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``render._inside`` on tensors: u (N, F, 1, S) and v (N, F, S, 1) broadcast to (N, F, S, S)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 1 / np.sqrt(2)
    inside = torch.zeros(torch.broadcast_shapes(u.shape, v.shape), dtype=torch.bool, device=u.device)
    vertices = _polygon(shape)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):  # even-odd rule, as render._inside
        if y0 == y1:
            continue  # a horizontal edge crosses no scanline
        crosses = (y0 > v) != (y1 > v)
        inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
    return inside


class ClipBatches:
    """Draw training batches of each stage from a ``SpecPool``, rendered on the pool's device.

    Example:
        >>> batches = ClipBatches(SpecPool(32), torch.Generator().manual_seed(0))
        >>> batches.keyframes(4)["sample"].shape
        torch.Size([4, 3, 8, 32, 32])
    """

    def __init__(self, pool: SpecPool, generator: torch.Generator, dtype: torch.dtype = torch.float32):
        self.pool, self.generator, self.dtype = pool, generator, dtype
        self.device = pool.centers.device
        self.noising = DDPMScheduler(**NOISE_SCHEDULER_CONFIG)
        self._motion_indices: dict[tuple[str, ...], torch.Tensor] = {}

    def _clips_showing(self, motions: tuple[str, ...]) -> torch.Tensor:
        """Pool indices of the clips whose motion is one of ``motions`` (cached per tuple)."""
        if motions not in self._motion_indices:
            missing = sorted(set(motions) - set(self.pool.motions))
            if missing:
                raise ValueError(
                    f"motions={motions} names {missing}, which the pool has no clips of (it has "
                    f"{sorted(set(self.pool.motions))}). Build the SpecPool with those motions."
                )
            chosen = [i for i, m in enumerate(self.pool.motions) if m in motions]
            self._motion_indices[motions] = torch.tensor(chosen, device=self.device)
        return self._motion_indices[motions]

    def _randint(self, high: int, size: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(high, size, generator=self.generator, device=self.device)

    def _captions(self, index: torch.Tensor) -> torch.Tensor:
        """Caption ids of the clips, with CAPTION_DROPOUT of them replaced by the id of ""."""
        drop = torch.rand(index.shape, generator=self.generator, device=self.device) < CAPTION_DROPOUT
        return torch.where(drop, len(self.pool.unique_captions) - 1, self.pool.caption_ids[index])

    def _render(self, index: torch.Tensor, frames: torch.Tensor, size: int) -> torch.Tensor:
        """Render frames ``frames`` (B, F) of the 29-frame timeline of clips ``index`` (B,) at ``size``."""
        pool, rows = self.pool, index[:, None]
        return render_frames(
            pool.centers[rows, frames].to(self.dtype), pool.diameters[rows, frames].to(self.dtype),
            pool.shapes[index], pool.colors[index], pool.backgrounds[index], size,
        ).float()  # fmt: skip

    def keyframes(self, batch_size: int, motions: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """8 keyframes (frames 0, 4, ..., 28) of 32 x 32; no condition; only clips of ``motions`` if given."""
        if motions is None:
            index = self._randint(len(self.pool), (batch_size,))
        else:
            candidates = self._clips_showing(tuple(motions))
            index = candidates[self._randint(len(candidates), (batch_size,))]
        frames = torch.arange(0, TIMELINE, 4, device=self.device).expand(batch_size, -1)
        return {"sample": self._render(index, frames, KEYFRAME_SIZE), "captions": self._captions(index)}

    def interpolation(self, batch_size: int) -> dict[str, torch.Tensor]:
        """5-frame windows between keyframes ``p`` and ``p + 1``; condition = interpolated ends + end mask."""
        from ..pipelines.show1_interpolation import interpolation_condition

        index = self._randint(len(self.pool), (batch_size,))
        frames = 4 * self._randint(NUM_KEYFRAMES - 1, (batch_size, 1)) + torch.arange(5, device=self.device)
        video = self._render(index, frames, KEYFRAME_SIZE)
        return {"sample": video, "condition": interpolation_condition(video), "captions": self._captions(index)}

    def sr(self, batch_size: int) -> dict[str, torch.Tensor]:
        """8-frame windows at 96 x 96; condition = the 32 x 32 frames upsampled and noised, first frame clean.

        The first condition frame is the clean high-resolution frame (what the pipeline passes from the previous
        window) or, for a quarter of the windows, the clean upsampled low-resolution frame (what it passes for the
        first window when no first-frame model is given).
        """
        from ..pipelines.show1_superres import upsample_frames

        index = self._randint(len(self.pool), (batch_size,))
        frames = self._randint(TIMELINE - SR_WINDOW + 1, (batch_size, 1)) + torch.arange(SR_WINDOW, device=self.device)
        high = self._render(index, frames, SR_SIZE)
        low = upsample_frames(self._render(index, frames, KEYFRAME_SIZE), SR_SIZE, SR_SIZE)
        levels = self._randint(MAX_SR_NOISE_LEVEL, (batch_size,))
        noise = torch.randn(low.shape, generator=self.generator, device=self.device)
        condition = self.noising.add_noise(low, noise, levels)
        blurry_first = torch.rand(batch_size, generator=self.generator, device=self.device) < 0.25
        condition[:, :, 0] = torch.where(blurry_first[:, None, None, None], low[:, :, 0], high[:, :, 0])
        return {"sample": high, "condition": condition, "class_labels": levels, "captions": self._captions(index)}
