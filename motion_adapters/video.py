"""Read, sample, resize and write video clips as tensors of shape (C, F, H, W) in [-1, 1].

Files are decoded with imageio-ffmpeg (mp4, webm, mov, mkv, avi) or Pillow (gif, folders of frames) and written
with imageio-ffmpeg. Every failure to read a clip raises :class:`VideoError`, a ``ValueError`` whose message names
the file and what was found.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

__all__ = [
    "FFMPEG_EXTENSIONS",
    "FRAME_EXTENSIONS",
    "VideoError",
    "frames_to_tensor",
    "load_video",
    "natural_sort_key",
    "read_frames",
    "resize_frame",
    "save_video",
    "tensor_to_frames",
]

FFMPEG_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi")
"""File extensions decoded with imageio-ffmpeg."""
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
"""Image extensions read from a folder of frames."""
RESIZE_MODES = ("crop", "stretch")


class VideoError(ValueError):
    """A clip could not be read or does not hold the frames asked for.

    Example:
        >>> try:
        ...     load_video("missing.mp4")
        ... except VideoError as error:
        ...     print(error)
        missing.mp4 does not exist. Pass the path of a video file or of a folder of frames.
    """


def natural_sort_key(name: str) -> tuple:
    """Sort key that orders the numbers inside names by value: ``2.jpg`` before ``10.jpg``.

    Example:
        >>> sorted(["frame_10.png", "frame_2.png"], key=natural_sort_key)
        ['frame_2.png', 'frame_10.png']
    """
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)), name


def _iter_file_frames(path: Path) -> Iterator[np.ndarray]:
    """Yield the frames of a video file as uint8 (H, W, 3) arrays; raise VideoError when it cannot be decoded."""
    suffix = path.suffix.lower()
    if suffix == ".gif":
        try:
            with Image.open(path) as image:
                for frame in ImageSequence.Iterator(image):
                    yield np.array(frame.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise VideoError(
                f"{path} could not be read as a gif ({error}). Check that the file is complete."
            ) from None
        return
    if suffix not in FFMPEG_EXTENSIONS:
        raise VideoError(
            f"{path} has extension {suffix!r}, which load_video does not read. "
            f"Pass a {', '.join(FFMPEG_EXTENSIONS + ('.gif',))} file or a folder of frames."
        )
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        try:
            meta = next(reader)
            width, height = meta["size"]
            for buffer in reader:
                yield np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3)
        except (OSError, RuntimeError, StopIteration, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise VideoError(
                f"{path} could not be decoded by ffmpeg ({first_line}). Check that the file is a complete video."
            ) from None
    finally:
        reader.close()


def _iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise VideoError(f"{path} does not exist. Pass the path of a video file or of a folder of frames.")
    if not path.is_dir():
        yield from _iter_file_frames(path)
        return
    files = [p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS and not p.name.startswith(".")]
    files = sorted((p for p in files if p.is_file()), key=lambda p: natural_sort_key(p.name))
    if not files:
        raise VideoError(
            f"folder {path} holds no frames ({', '.join(FRAME_EXTENSIONS)}). Pass a folder of image files or a video."
        )
    for file in files:
        try:
            with Image.open(file) as image:
                yield np.array(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as error:
            raise VideoError(f"frame {file} could not be read ({error}). Remove or replace it.") from None


def read_frames(path: str | os.PathLike) -> list[np.ndarray]:
    """Read every frame of a video file or of a folder of frames.

    Folders are read in natural order (``frame_2.png`` before ``frame_10.png``); hidden files and files with other
    extensions are skipped. Alpha channels are dropped.

    Args:
        path: An mp4, webm, mov, mkv, avi or gif file, or a folder of png, jpg, jpeg or webp frames.

    Returns:
        The frames as uint8 arrays of shape (H, W, 3).

    Raises:
        VideoError: The path is missing, the folder is empty, or the file cannot be decoded or holds no frames.

    Example:
        >>> _ = save_video(torch.zeros(3, 8, 32, 32), "clip.mp4")
        >>> frames = read_frames("clip.mp4")
        >>> frames[0].shape, frames[0].dtype
        ((32, 32, 3), dtype('uint8'))
    """
    frames = list(_iter_frames(path))
    if not frames:
        raise VideoError(f"{path} holds no frames. Check that the file is a complete video.")
    return frames


def _check_size(size: Sequence[int] | None, allow_none: bool = True) -> tuple[int, int] | None:
    if size is None and allow_none:
        return None
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"size must be two positive ints (height, width), got {size!r}. Pass e.g. size=(32, 32).")
    return int(size[0]), int(size[1])


def _check_resize_mode(resize_mode: str) -> None:
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}.")


def resize_frame(frame: np.ndarray, size: tuple[int, int], resize_mode: str = "crop") -> np.ndarray:
    """Resize one uint8 (H, W, 3) frame to ``size = (height, width)``.

    Args:
        frame: The frame, uint8 of shape (H, W, 3).
        size: Target (height, width).
        resize_mode: ``"crop"`` center-crops to the target aspect ratio before resizing, so shapes keep their
            proportions; ``"stretch"`` resizes the whole frame, distorting it when the aspect ratios differ (what the
            released VMC code did).

    Returns:
        The resized uint8 frame of shape (height, width, 3), resampled with Pillow's bicubic filter.

    Example:
        >>> resize_frame(np.zeros((40, 80, 3), np.uint8), (32, 32)).shape
        (32, 32, 3)
    """
    height, width = _check_size(size, allow_none=False)
    _check_resize_mode(resize_mode)
    src_h, src_w = frame.shape[:2]
    image = Image.fromarray(frame)
    if resize_mode == "crop":
        if src_w * height > width * src_h:  # source is wider: crop the width
            crop_w = max(1, round(src_h * width / height))
            left = (src_w - crop_w) // 2
            image = image.crop((left, 0, left + crop_w, src_h))
        elif src_w * height < width * src_h:  # source is taller: crop the height
            crop_h = max(1, round(src_w * height / width))
            top = (src_h - crop_h) // 2
            image = image.crop((0, top, src_w, top + crop_h))
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


def frames_to_tensor(
    frames: Sequence[np.ndarray | Image.Image],
    size: tuple[int, int] | None = None,
    resize_mode: str = "crop",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stack uint8 frames into a (3, F, H, W) tensor in [-1, 1], resizing them first when ``size`` is given.

    Args:
        frames: uint8 (H, W, 3) arrays or PIL images.
        size: Target (height, width); ``None`` keeps the frames' own size, which must then be the same for all.
        resize_mode: ``"crop"`` or ``"stretch"``, see :func:`resize_frame`.
        dtype: The tensor's floating dtype.

    Returns:
        A tensor of shape (3, F, H, W) with values ``frame / 127.5 - 1``.

    Example:
        >>> frames_to_tensor([np.zeros((4, 4, 3), np.uint8)] * 2).shape
        torch.Size([3, 2, 4, 4])
    """
    size = _check_size(size)
    _check_resize_mode(resize_mode)
    if len(frames) == 0:
        raise ValueError("frames is empty. Pass at least one frame.")
    arrays = []
    for i, frame in enumerate(frames):
        array = np.asarray(frame.convert("RGB")) if isinstance(frame, Image.Image) else np.asarray(frame)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"frames[{i}] must be uint8 of shape (H, W, 3), got {array.dtype} {array.shape}. "
                "Convert it with (x * 255).round().astype(np.uint8) or Image.convert('RGB')."
            )
        arrays.append(resize_frame(array, size, resize_mode) if size is not None else array)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"frames have different sizes {sorted(shapes)}. Pass size=(height, width) to resize them.")
    stacked = torch.from_numpy(np.stack(arrays)).permute(3, 0, 1, 2)
    return (stacked.to(torch.float32) / 127.5 - 1.0).to(dtype)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """Convert a (3, F, H, W) or (1, 3, F, H, W) tensor in [-1, 1] to uint8 frames of shape (F, H, W, 3).

    Values are clamped to [-1, 1] before rounding, as a decoder's output may overshoot slightly.

    Example:
        >>> tensor_to_frames(torch.zeros(3, 2, 4, 4)).shape
        (2, 4, 4, 3)
    """
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"video must be a torch.Tensor, got {type(video).__name__}.")
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(
                f"video has a batch of {video.shape[0]} clips (shape {tuple(video.shape)}). Pass one clip: video[i]."
            )
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must have shape (3, F, H, W) or (1, 3, F, H, W), got {tuple(video.shape)}.")
    video = video.detach().to("cpu", torch.float32)
    if video.numel() and (video.min() < -1.5 or video.max() > 1.5):
        raise ValueError(
            f"video values span [{video.min():.2f}, {video.max():.2f}], not [-1, 1]. "
            "Pass video / 127.5 - 1 for [0, 255] data or video * 2 - 1 for [0, 1] data."
        )
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()


def _check_sampling(num_frames: int, stride: int, start: int) -> None:
    for name, value, low in (("num_frames", num_frames, 1), ("stride", stride, 1), ("start", start, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def load_video(
    path: str | os.PathLike,
    num_frames: int = 8,
    stride: int = 1,
    start: int = 0,
    size: tuple[int, int] | None = None,
    resize_mode: str = "crop",
    reverse: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Load a clip of ``num_frames`` frames, every ``stride``-th frame from frame ``start``, as a tensor in [-1, 1].

    Frames ``start, start + stride, ..., start + (num_frames - 1) * stride`` are taken; decoding stops after the
    last of them, so long videos are not read to the end.

    Args:
        path: An mp4, webm, mov, mkv, avi or gif file, or a folder of png, jpg, jpeg or webp frames (natural order).
        num_frames: How many frames to sample.
        stride: Step between sampled frames; 2 halves the frame rate.
        start: Index of the first sampled frame.
        size: Target (height, width). ``None`` keeps the native resolution.
        resize_mode: ``"crop"`` (default) center-crops to the target aspect ratio then resizes, keeping proportions;
            ``"stretch"`` resizes the full frame, as the released VMC code did.
        reverse: Reverse the sampled frames, turning the clip's motion backwards.
        dtype: The floating dtype of the result.

    Returns:
        A tensor of shape (3, num_frames, H, W) with values in [-1, 1].

    Raises:
        VideoError: The path is missing or unreadable, or the clip has fewer frames than the sampling needs.
        ValueError: An argument is out of range.

    Example:
        >>> _ = save_video(torch.zeros(3, 16, 48, 64), "clip.mp4")
        >>> video = load_video("clip.mp4", num_frames=8, stride=2, size=(32, 32))
        >>> video.shape
        torch.Size([3, 8, 32, 32])
    """
    _check_sampling(num_frames, stride, start)
    size = _check_size(size)
    _check_resize_mode(resize_mode)
    wanted = list(range(start, start + (num_frames - 1) * stride + 1, stride))
    last = wanted[-1]
    wanted_set = set(wanted)
    frames, total = [], 0
    iterator = _iter_frames(path)
    try:
        for index, frame in enumerate(iterator):
            total = index + 1
            if index in wanted_set:
                frames.append(frame)
            if index == last:
                break
    finally:
        iterator.close()
    if total == 0:
        raise VideoError(f"{path} holds no frames. Check that the file is a complete video.")
    if len(frames) < num_frames:
        raise VideoError(
            f"{Path(path).name} has {total} frames; num_frames={num_frames} with stride={stride} and start={start} "
            f"needs {last + 1}. Pass a smaller num_frames, stride or start."
        )
    if reverse:
        frames = frames[::-1]
    try:
        return frames_to_tensor(frames, size=size, resize_mode=resize_mode, dtype=dtype)
    except ValueError as error:
        raise VideoError(f"{path}: {error}") from None


def _as_uint8_frames(video: torch.Tensor | np.ndarray | Sequence) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        return tensor_to_frames(video)
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(
                f"a numpy video must be uint8 of shape (F, H, W, 3), got {video.dtype} {video.shape}. "
                "Convert [0, 1] floats with (x * 255).round().astype(np.uint8)."
            )
        return video
    if isinstance(video, Sequence) and len(video) > 0:
        arrays = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in video]
        if len({a.shape for a in arrays}) > 1 or arrays[0].dtype != np.uint8 or arrays[0].shape[-1:] != (3,):
            raise ValueError("a list video must hold PIL images or uint8 (H, W, 3) arrays, all of the same size.")
        return np.stack(arrays)
    raise ValueError(
        f"video must be a (3, F, H, W) tensor, a uint8 (F, H, W, 3) array or a non-empty list of PIL images, "
        f"got {type(video).__name__}."
    )


def _write_ffmpeg(frames: np.ndarray, path: str, fps: float, codec: str, pix_fmt: str, output_params: list) -> None:
    import imageio_ffmpeg

    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        path,
        (width, height),
        fps=fps,
        codec=codec,
        pix_fmt_out=pix_fmt,
        macro_block_size=1,
        quality=None,
        output_params=output_params,
        ffmpeg_log_level="error",
    )
    writer.send(None)
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def save_video(
    video: torch.Tensor | np.ndarray | Sequence[Image.Image], path: str | os.PathLike, fps: float = 8
) -> Path:
    """Write a clip to an mp4 or gif file atomically.

    The file is written to a temporary file in the same folder and moved into place with ``os.replace``, so readers
    never see a half-written clip. mp4 uses libx264 (yuv420p, CRF 12); frames with an odd height or width are padded
    by one row or column repeating the edge, since yuv420p needs even sizes. gif uses ffmpeg's palettegen and
    paletteuse without dithering and keeps repeated frames; for clips of at most 256 colors it is near-lossless
    (ffmpeg builds the palette in OkLab, which can move a color by one level out of 255).

    Args:
        video: A (3, F, H, W) or (1, 3, F, H, W) tensor in [-1, 1], a uint8 array of shape (F, H, W, 3), or a list
            of PIL images.
        path: Output path ending in ``.mp4`` or ``.gif``. Parent folders are created.
        fps: Frames per second.

    Returns:
        The path written.

    Example:
        >>> save_video(torch.zeros(3, 8, 32, 32), "clip.mp4", fps=8)
        PosixPath('clip.mp4')
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"path must end in .mp4 or .gif, got {str(path)!r}.")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}.")
    frames = _as_uint8_frames(video)
    if suffix == ".mp4":
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        codec, pix_fmt, params = "libx264", "yuv420p", ["-crf", "12"]
    else:
        palette = "split[a][b];[a]palettegen=reserve_transparent=0[p];[b][p]paletteuse=dither=none"
        codec, pix_fmt, params = "gif", "pal8", ["-filter_complex", palette, "-loop", "0"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp{suffix}"  # ffmpeg picks the muxer by extension
    try:
        _write_ffmpeg(frames, str(tmp), fps, codec, pix_fmt, params)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
