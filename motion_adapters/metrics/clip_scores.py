"""CLIP scores of generated clips: text alignment with a prompt and temporal consistency between frames.

Both scores are the ones VMC reports: the mean cosine similarity between the prompt's CLIP text embedding and each
frame's CLIP image embedding, and the mean cosine similarity between the image embeddings of all pairs of frames.
Cascaded outputs (29 frames from 8 keyframes) are scored on their keyframes, every 4th frame, as in the paper.
Frames are preprocessed by the model's own CLIP processor (resize, center crop, normalize).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..video import read_frames, tensor_to_frames

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "CLIPLoadError",
    "as_clip_frames",
    "keyframe_indices",
    "load_clip",
    "resolve_frame_indices",
    "temporal_consistency",
    "text_alignment",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
"""CLIP ViT-L/14, the usual judge of text-to-video papers; VMC does not name the CLIP model it used."""
KEYFRAME_STRIDE = 4
"""Show-1's interpolation stage puts 3 new frames between keyframes: 8 keyframes become 29 frames."""
_IMAGE_BATCH = 16


class CLIPLoadError(OSError):
    """A CLIP model or its processor could not be loaded from the named Hub id or folder.

    Example:
        >>> try:
        ...     load_clip("/no/such/folder", local_files_only=True)
        ... except CLIPLoadError as error:
        ...     print(str(error).split(":")[0])
        could not load CLIP model '/no/such/folder'
    """


def keyframe_indices(num_frames: int) -> tuple[int, ...]:
    """The frames that are keyframes of a cascaded output: every 4th when ``(num_frames - 1) % 4 == 0``, else all.

    Show-1 interpolates 3 frames between each pair of keyframes, so a 29-frame output holds its 8 keyframes at
    ``0, 4, ..., 28``. Any clip whose length fits that pattern (5, 9, ..., 29, ...) is treated as cascaded; other
    lengths (such as the keyframe stage's own 8 frames) have every frame as a keyframe. A single frame is ``(0,)``.

    Args:
        num_frames: The clip's frame count, >= 1.

    Example:
        >>> keyframe_indices(29)
        (0, 4, 8, 12, 16, 20, 24, 28)
        >>> keyframe_indices(8)
        (0, 1, 2, 3, 4, 5, 6, 7)
    """
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}.")
    if (num_frames - 1) % KEYFRAME_STRIDE == 0:
        return tuple(range(0, num_frames, KEYFRAME_STRIDE))
    return tuple(range(num_frames))


def resolve_frame_indices(frame_indices: str | Sequence[int] | None, num_frames: int) -> tuple[int, ...]:
    """The frame indices a score is computed on.

    Args:
        frame_indices: ``None`` or ``"keyframes"`` for :func:`keyframe_indices` (the paper's protocol), ``"all"`` for
            every frame, or explicit indices (distinct ints in ``[0, num_frames)``, kept in the order given).
        num_frames: The clip's frame count.

    Example:
        >>> resolve_frame_indices("keyframes", 9), resolve_frame_indices("all", 3), resolve_frame_indices([2, 0], 3)
        ((0, 4, 8), (0, 1, 2), (2, 0))
    """
    if frame_indices is None or (isinstance(frame_indices, str) and frame_indices == "keyframes"):
        return keyframe_indices(num_frames)
    if isinstance(frame_indices, str):
        if frame_indices == "all":
            return tuple(range(num_frames))
        raise ValueError(f'frame_indices must be "keyframes", "all" or a list of ints, got {frame_indices!r}.')
    indices = tuple(frame_indices)
    if not indices or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in indices):
        raise ValueError(
            f'frame_indices must be "keyframes", "all" or a non-empty list of ints, got {frame_indices!r}.'
        )
    bad = [int(i) for i in indices if not 0 <= i < num_frames]
    if bad:
        raise ValueError(f"frame_indices {bad} are outside the clip's {num_frames} frames (0 to {num_frames - 1}).")
    if len(set(indices)) != len(indices):
        raise ValueError(f"frame_indices {list(indices)} repeat a frame. Pass each frame once.")
    return tuple(int(i) for i in indices)


def load_clip(
    model_name_or_path: str | os.PathLike = DEFAULT_CLIP_MODEL,
    device: str | torch.device | None = None,
    *,
    local_files_only: bool = False,
):
    """Load a CLIP model and its processor with transformers, in eval mode.

    Without torchvision, transformers 5 uses the Pillow CLIP image processor; its resizing differs slightly from
    the torchvision one, so scores can differ in the third decimal between the two installs.

    Args:
        model_name_or_path: A Hub id (default ``openai/clip-vit-large-patch14``, about 1.7 GB) or a local folder
            written by ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained``.
        device: Where to put the model; ``None`` leaves it on the CPU.
        local_files_only: Only use a local folder or the Hugging Face cache, never the network.

    Returns:
        ``(model, processor)``: a ``transformers.CLIPModel`` and a ``transformers.CLIPProcessor``.

    Raises:
        CLIPLoadError: The model or its processor cannot be loaded: a typo, a folder without the files, or a Hub id
            that is neither cached nor reachable. The message says which.

    Example:
        >>> model, processor = load_clip("openai/clip-vit-large-patch14", device="cuda")  # doctest: +SKIP
    """
    from transformers import CLIPModel, CLIPProcessor

    name = os.fspath(model_name_or_path)
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=local_files_only)
        processor = CLIPProcessor.from_pretrained(name, local_files_only=local_files_only)
    except Exception as error:  # from_pretrained raises many types; all mean "not loadable"
        lines = str(error).strip().splitlines()
        reason = lines[0].rstrip(".") if lines else type(error).__name__
        if Path(name).is_dir():
            hint = (
                "The folder needs config.json and the weights (CLIPModel.save_pretrained) and the processor files "
                "(CLIPProcessor.save_pretrained)."
            )
        else:
            where = "the local Hugging Face cache" if local_files_only else "the local cache or the Hub"
            hint = (
                f"It is not a local folder, and {where} could not provide it. Check the id or path; without network, "
                f"download it once elsewhere (hf download {name}) into the cache or pass a local folder; "
                "HF_HUB_OFFLINE=1 skips the network retries."
            )
        raise CLIPLoadError(f"could not load CLIP model {name!r}: {reason}. {hint}") from error
    model = model.eval()
    if device is not None:
        model = model.to(device)
    return model, processor


def text_alignment(
    frames,
    prompt: str,
    model,
    processor=None,
    *,
    frame_indices: str | Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> float:
    """CLIP text alignment: the mean cosine similarity between the prompt and each evaluated frame.

    ``mean_i cos(T(prompt), I(frame_i))`` with ``T`` and ``I`` CLIP's projected text and image embeddings. Raw
    cosines, in [-1, 1]; CLIPScore-style reports multiply by 100 (or 2.5) and clip at 0. Prompts longer than the
    text encoder's context (77 tokens for OpenAI CLIP) are truncated to it, with a warning. A batch of clips
    scores the mean of the clips' scores.

    Args:
        frames: A (3, F, H, W) or (B, 3, F, H, W) tensor in [-1, 1], a uint8 (F, H, W, 3) array, a list of PIL
            images or uint8 (H, W, 3) arrays, or the path of a video file or folder of frames.
        prompt: The text the clip should show.
        model: A ``transformers.CLIPModel``, or a Hub id or folder loaded with :func:`load_clip`.
        processor: Its ``CLIPProcessor``; ``None`` loads the one saved beside the model.
        frame_indices: ``None``/``"keyframes"`` (every 4th frame of cascaded outputs, see :func:`keyframe_indices`),
            ``"all"``, or a list of indices.
        device: Where to run the model; ``None`` uses the model's own device. The model is moved back after.

    Example:
        >>> model, processor = load_clip()  # doctest: +SKIP
        >>> text_alignment(video, "a seagull is walking", model, processor)  # doctest: +SKIP
        0.27
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    clips = as_clip_frames(frames)
    model, processor = _model_and_processor(model, processor)
    scores = []
    with _evaluating(model, device) as run_device:
        text = _text_embedding(prompt, model, processor, run_device)
        for clip in clips:
            images = _image_embeddings(
                clip[list(resolve_frame_indices(frame_indices, len(clip)))], model, processor, run_device
            )
            scores.append(float((images @ text).mean()))
    return float(np.mean(scores))


def temporal_consistency(
    frames,
    model,
    processor=None,
    *,
    frame_indices: str | Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> float:
    """CLIP temporal consistency: the mean cosine similarity between the image embeddings of all pairs of frames.

    ``mean_{i<j} cos(I(frame_i), I(frame_j))`` over the evaluated frames (all pairs, not only neighbours), so a
    clip whose frames all look alike scores near 1 whether it moves or not: it measures stable appearance, not
    motion. A batch of clips scores the mean of the clips' scores.

    Args:
        frames: The clip, in any form :func:`text_alignment` takes; at least 2 frames must be evaluated.
        model: A ``transformers.CLIPModel``, or a Hub id or folder loaded with :func:`load_clip`.
        processor: Its ``CLIPProcessor`` (or its image processor); ``None`` loads the one saved beside the model.
        frame_indices: ``None``/``"keyframes"``, ``"all"``, or a list of indices, as in :func:`text_alignment`.
        device: Where to run the model; ``None`` uses the model's own device. The model is moved back after.

    Example:
        >>> temporal_consistency(video, model, processor, frame_indices="all")  # doctest: +SKIP
        0.93
    """
    clips = as_clip_frames(frames)
    model, processor = _model_and_processor(model, processor)
    scores = []
    with _evaluating(model, device) as run_device:
        for clip in clips:
            indices = resolve_frame_indices(frame_indices, len(clip))
            if len(indices) < 2:
                raise ValueError(
                    f"temporal consistency needs at least 2 evaluated frames, got {len(indices)} "
                    f"(frame_indices={frame_indices!r}, {len(clip)} frames)."
                )
            images = _image_embeddings(clip[list(indices)], model, processor, run_device)
            similarity = images @ images.T
            upper = torch.triu_indices(len(indices), len(indices), offset=1)
            scores.append(float(similarity[upper[0], upper[1]].mean()))
    return float(np.mean(scores))


def as_clip_frames(frames) -> list[np.ndarray]:
    """Normalise any accepted clip form to a list of uint8 (F, H, W, 3) arrays, one per clip.

    Args:
        frames: A (3, F, H, W) or (B, 3, F, H, W) tensor in [-1, 1], a uint8 (F, H, W, 3) array, a list of PIL
            images or uint8 (H, W, 3) arrays of one size, or the path of a video file or folder of frames.

    Example:
        >>> [clip.shape for clip in as_clip_frames(torch.zeros(2, 3, 4, 8, 8))]
        [(4, 8, 8, 3), (4, 8, 8, 3)]
    """
    if isinstance(frames, (str, os.PathLike)):
        return [_stack(read_frames(frames), f"frames of {os.fspath(frames)}")]
    if isinstance(frames, torch.Tensor):
        if frames.ndim == 5:
            if frames.shape[0] == 0:
                raise ValueError(f"frames is an empty batch, shape {tuple(frames.shape)}.")
            return [tensor_to_frames(clip) for clip in frames]
        return [tensor_to_frames(frames)]
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
            raise ValueError(
                f"a numpy clip must be uint8 of shape (F, H, W, 3), got {frames.dtype} {frames.shape}. "
                "Convert [0, 1] floats with (x * 255).round().astype(np.uint8)."
            )
        return [frames]
    if isinstance(frames, Sequence) and len(frames) > 0:
        arrays = []
        for i, frame in enumerate(frames):
            array = np.asarray(frame.convert("RGB")) if isinstance(frame, Image.Image) else np.asarray(frame)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(
                    f"frames[{i}] must be a PIL image or uint8 (H, W, 3), got {array.dtype} {array.shape}."
                )
            arrays.append(array)
        return [_stack(arrays, "frames")]
    raise ValueError(
        "frames must be a (3, F, H, W) or (B, 3, F, H, W) tensor in [-1, 1], a uint8 (F, H, W, 3) array, a non-empty "
        f"list of PIL images or a video path, got {type(frames).__name__}."
    )


def _stack(arrays: list[np.ndarray], what: str) -> np.ndarray:
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"{what} have different sizes {shapes}. Resize them to one size first.")
    return np.stack(arrays)


def _model_and_processor(model, processor):
    if isinstance(model, (str, os.PathLike)):
        loaded, loaded_processor = load_clip(model)
        return loaded, processor if processor is not None else loaded_processor
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ValueError(
            f"model must be a transformers CLIPModel or a Hub id or folder of one, got {type(model).__name__}."
        )
    if processor is None:
        from transformers import CLIPProcessor

        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        try:
            processor = CLIPProcessor.from_pretrained(source)
        except Exception as error:  # any failure means the processor is not beside the model
            raise ValueError(
                f"processor=None but no CLIPProcessor could be loaded from the model's source {source!r} ({error}). "
                "Pass processor=CLIPProcessor.from_pretrained(...) or load both with load_clip."
            ) from error
    return model, processor


@contextlib.contextmanager
def _evaluating(model, device) -> Iterator[torch.device]:
    """Run ``model`` in eval mode without gradients on ``device``, restoring its mode and device after."""
    original = next(model.parameters()).device
    run_device = torch.device(device) if device is not None else original
    was_training = model.training
    try:
        model.eval()
        if run_device != original:
            model.to(run_device)
        with torch.inference_mode():
            yield run_device
    finally:
        if run_device != original:
            model.to(original)
        model.train(was_training)


def _pooled(output) -> torch.Tensor:
    """Projected embeddings: transformers < 5 returns a tensor, transformers 5 an output with ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _text_embedding(prompt: str, model, processor, device: torch.device) -> torch.Tensor:
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"processor {type(processor).__name__} has no tokenizer. Pass a CLIPProcessor.")
    max_length = model.config.text_config.max_position_embeddings
    length = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
    if length > max_length:
        warnings.warn(
            f"prompt has {length} tokens; CLIP reads {max_length}, so it was truncated for text_alignment.",
            stacklevel=3,
        )
    tokens = tokenizer([prompt], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    features = _pooled(model.get_text_features(**{k: v.to(device) for k, v in tokens.items()}))
    return torch.nn.functional.normalize(features.float(), dim=-1)[0]


def _image_embeddings(frames: np.ndarray, model, processor, device: torch.device) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (N, D), float32, of uint8 frames (N, H, W, 3)."""
    image_processor = getattr(processor, "image_processor", processor)
    dtype = next(model.parameters()).dtype
    embeddings = []
    for start in range(0, len(frames), _IMAGE_BATCH):
        images = [Image.fromarray(frame) for frame in frames[start : start + _IMAGE_BATCH]]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
        embeddings.append(_pooled(model.get_image_features(pixel_values=pixels)).float())
    return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1)
