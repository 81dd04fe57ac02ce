"""The embedded default model: a small Show-1 cascade pretrained on the shapes world, its configs and its loaders.

The cascade has the architecture of Show-1 (``docs/default_model.md``) at the scale of the world: a keyframe 3D UNet
(8 x 32 x 32 pixels), an interpolation 3D UNet (7 keyframe pairs -> 29 frames, in 7 channels), one video
super-resolution 3D UNet (32 x 32 -> 96 x 96, noise-level class embedding) and a two-layer T5 encoder with a
sentencepiece tokenizer trained on the world's captions. The weights live in ``DEFAULT_MODEL_DIR`` in the folder
layout of :class:`~motion_adapters.pipelines.Show1CascadePipeline`, written by
:mod:`motion_adapters.world.pretrain`.

Example:
    >>> from motion_adapters.world.default_model import DEFAULT_CALL_KWARGS, load_default_cascade
    >>> cascade = load_default_cascade()
    >>> video = cascade("a red circle moving left on a black background", **DEFAULT_CALL_KWARGS,
    ...                 output_type="pt").frames  # (1, 3, 29, 96, 96) in [-1, 1]
"""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ..models import Show1UNet3DConditionModel, show1_base_config, show1_sr1_config
from .vocab import BACKGROUNDS, COLORS, MOTIONS, SHAPES, SPEEDS, is_compatible, motion_phrase

__all__ = [
    "DEFAULT_CALL_KWARGS",
    "DEFAULT_MODEL_DIR",
    "KEYFRAME_SIZE",
    "NOISE_SCHEDULER_CONFIG",
    "NUM_KEYFRAMES",
    "SCHEDULER_CONFIG",
    "SR_SIZE",
    "STAGE_FOLDERS",
    "TEXT_ENCODER_CONFIG",
    "TinyHeadAttnProcessor",
    "build_default_components",
    "caption_corpus",
    "caption_tokenizer",
    "cascade_from_components",
    "interpolation_unet_config",
    "keyframes_unet_config",
    "load_default_cascade",
    "load_default_components",
    "sr_unet_config",
    "train_caption_tokenizer",
    "use_tiny_head_attention",
]

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"
"""Folder of the shipped cascade (``cascade_index.json``, one subfolder per stage, ``training_log.json``)."""

STAGE_FOLDERS = {"keyframes": "keyframes", "interpolation": "interpolation", "sr": "sr1"}
"""Subfolder of ``DEFAULT_MODEL_DIR`` holding each stage (the cascade's stage names)."""

NUM_KEYFRAMES = 8
"""Keyframes per video; interpolation makes 4 * (8 - 1) + 1 = 29 frames of them."""
KEYFRAME_SIZE = 32
"""Height and width of keyframes and interpolated frames, in pixels."""
SR_SIZE = 96
"""Height and width after super-resolution, in pixels (3x)."""

TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "d_model": 256,
    "d_kv": 64,
    "d_ff": 512,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 64,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
"""``T5Config`` keys of the text encoder (``vocab_size`` comes from the tokenizer)."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "lower_order_final": True,
    "lambda_min_clipped": -5.1,
    "timestep_spacing": "linspace",
    "variance_type": "fixed_small",
}
"""Sampling scheduler of every stage: show-1-base's DPM-Solver++ config, except v prediction and the thresholding.

Show-1's ``sample_max_value=1.5`` lets dynamic thresholding divide a predicted frame by up to 1.5, which greys out
the world's saturated colors; with ``1.0`` the threshold is always 1, so thresholding only clips the predicted clean
frame to [-1, 1], the range every world clip lies in.
"""

NOISE_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
}
"""Training schedule of every stage (``DDPMScheduler``, v prediction); also the SR stage's condition noising."""

DEFAULT_CALL_KWARGS: dict[str, Any] = {
    "num_frames": NUM_KEYFRAMES,
    "height": KEYFRAME_SIZE,
    "width": KEYFRAME_SIZE,
    "stage_kwargs": {
        "keyframes": {"num_inference_steps": 25, "guidance_scale": 7.5},
        "interpolation": {"num_inference_steps": 6, "guidance_scale": 1.0},
        "sr1": {"num_inference_steps": 4, "guidance_scale": 1.0, "noise_level": 100, "height": SR_SIZE,
                "width": SR_SIZE},
    },
}  # fmt: skip
"""Arguments of ``Show1CascadePipeline.__call__`` for the default model: 8 keyframes of 32 x 32 -> 29 x 96 x 96."""

_UNET_COMMON: dict[str, Any] = {
    "attention_head_dim": 64,
    "addition_embed_type_num_heads": 4,
    "encoder_hid_dim": TEXT_ENCODER_CONFIG["d_model"],
    "norm_num_groups": 32,
}


def keyframes_unet_config() -> dict[str, Any]:
    """Config of the keyframe 3D UNet: show-1-base's blocks at 3 levels (32, 64, 128 channels), 3 -> 3 channels.

    Epsilon only (3 output channels): the default scheduler's ``fixed_small`` variance never reads IF's variance
    channels, so the model has none.

    Example:
        >>> keyframes_unet_config()["block_out_channels"]
        [32, 64, 128]
    """
    return {
        **show1_base_config(),
        **_UNET_COMMON,
        "sample_size": KEYFRAME_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 1,
        "cross_attention_dim": 128,
        "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    }


def interpolation_unet_config() -> dict[str, Any]:
    """Config of the interpolation 3D UNet: 2 levels (32, 64), in 7 channels (3 noisy + 3 condition + 1 mask).

    The condition is the window's two end keyframes trilinearly interpolated over its 5 frames; the mask is 1 on
    the end frames. Two levels suffice: between neighbouring keyframes the object moves at most 2 pixels.

    Example:
        >>> interpolation_unet_config()["in_channels"]
        7
    """
    return {
        **keyframes_unet_config(),
        "in_channels": 7,
        "block_out_channels": [32, 64],
        "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    }


def sr_unet_config() -> dict[str, Any]:
    """Config of the super-resolution 3D UNet: show-1-sr1's blocks at 3 levels (32, 32, 64), in 6 -> out 3.

    Input = 3 noisy + 3 upsampled low-resolution channels; ``class_labels`` is the condition's noise level.

    Example:
        >>> sr_unet_config()["class_embed_type"]
        'timestep'
    """
    return {
        **show1_sr1_config(),
        **_UNET_COMMON,
        "sample_size": SR_SIZE,
        "in_channels": 6,
        "out_channels": 3,
        "block_out_channels": [32, 32, 64],
        "layers_per_block": [1, 1, 1],
        "cross_attention_dim": 128,
        "time_embedding_dim": 128,
        "down_block_types": ["ResnetDownsampleBlock3D", "ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D", "ResnetUpsampleBlock3D"],
    }


class TinyHeadAttnProcessor:
    """Unmasked self-attention computed with broadcasts instead of SDPA, for Show-1's temporal attention.

    Show-1 splits temporal attention into 64 heads of C / 64 channels, so the default model's heads have 1 or 2
    channels over 5 to 8 frames: millions of tiny attention problems, which the fused SDPA kernels either reject or
    (torch 2.11 on H100) fail on in backward, and which batched matrix products handle slowly. Scores are
    ``sum_d q k`` over broadcast (B, L, L, heads, d) tensors, with the softmax in float32; the result equals
    ``AttnProcessor2_0`` (tested). ``load_default_components`` sets it (about twice as fast on a CPU), and so does
    pretraining; the saved models keep diffusers' default processors.

    Example:
        >>> use_tiny_head_attention(unet)  # doctest: +SKIP
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        """Attend over the sequence of ``hidden_states`` (B, L, C) and return (B, L, C), as ``AttnProcessor2_0``."""
        if encoder_hidden_states is not None or attention_mask is not None or attn.group_norm is not None:
            raise ValueError("TinyHeadAttnProcessor computes unmasked self-attention only; use AttnProcessor2_0.")
        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states).view(batch, length, 1, attn.heads, -1)
        key = attn.to_k(hidden_states).view(batch, 1, length, attn.heads, -1)
        value = attn.to_v(hidden_states).view(batch, 1, length, attn.heads, -1)
        scores = (query * key).sum(-1).float() * query.shape[-1] ** -0.5  # (B, L_query, L_key, heads)
        weights = scores.softmax(dim=2).to(value.dtype)
        out = (weights.unsqueeze(-1) * value).sum(2).reshape(batch, length, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def use_tiny_head_attention(unet: torch.nn.Module) -> int:
    """Give every temporal attention of a Show-1 UNet the ``TinyHeadAttnProcessor``; returns how many."""
    from diffusers.models.attention_processor import Attention

    modules = [m for name, m in unet.named_modules() if isinstance(m, Attention) and ".temp_attentions." in name]
    for module in modules:
        module.set_processor(TinyHeadAttnProcessor())
    return len(modules)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_corpus() -> list[str]:
    """Every caption the world can make (seen and unseen motions, every speed, compatible colors only).

    Example:
        >>> "a red circle moving left on a blue background" in caption_corpus()
        True
    """
    captions = []
    for shape in SHAPES:
        for color in COLORS:
            for background in BACKGROUNDS:
                if not is_compatible(color, background):
                    continue
                for motion in MOTIONS:
                    for speed in SPEEDS:
                        if motion == "still" and speed != "normal":
                            continue
                        captions.append(
                            f"{_article(color)} {color} {shape} {motion_phrase(motion, speed)} on "
                            f"{_article(background)} {background} background"
                        )
    return captions


_EXTRA_CHARACTERS = "abcdefghijklmnopqrstuvwxyz 0123456789 . , ; : ' \" - ! ? ( ) /"


def train_caption_tokenizer(path: str | os.PathLike, vocab_size: int = 90) -> Path:
    """Train the unigram sentencepiece model of the world's captions and write it to ``path`` (``spiece.model``).

    Every caption word becomes one piece; lower-case letters, digits and common punctuation are pieces too, so any
    lower-cased ASCII prompt tokenizes without unknown tokens. The seed pieces are all substrings of the caption
    words, weighted by their counts (sentencepiece's own seeding drops words that occur once per unique word).
    Ids: 0 pad, 1 eos, 2 unk, as T5.

    Args:
        path: File to write.
        vocab_size: Pieces in the model.

    Returns:
        The path written.

    Example:
        >>> train_caption_tokenizer("spiece.model")
        PosixPath('spiece.model')
    """
    import sentencepiece as spm

    captions = caption_corpus()
    counts = Counter()
    for caption in captions:
        for word in caption.split():
            word = "\u2581" + word
            for i in range(len(word)):
                for j in range(i + 2, len(word) + 1):
                    counts[word[i:j]] += 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seeds = path.with_suffix(".seeds.tsv")
    seeds.write_text("".join(f"{piece}\t{count}\n" for piece, count in counts.most_common()), encoding="utf-8")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions + [_EXTRA_CHARACTERS] * 10), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            normalization_rule_name="identity", seed_sentencepieces_file=str(seeds), minloglevel=2,
        )  # fmt: skip
    finally:
        seeds.unlink()
    path.write_bytes(model.getvalue())
    return path


def caption_tokenizer(path: str | os.PathLike | None = None) -> T5Tokenizer:
    """Wrap a sentencepiece model as the ``T5Tokenizer`` the pipelines use (no extra ids).

    Args:
        path: A ``spiece.model``; the shipped one (``DEFAULT_MODEL_DIR/keyframes/tokenizer/spiece.model``) when None.

    Example:
        >>> tokenizer = caption_tokenizer()
        >>> tokenizer.convert_ids_to_tokens(tokenizer("a red star").input_ids)
        ['▁a', '▁red', '▁star', '</s>']
    """
    import sentencepiece as spm

    path = Path(path) if path is not None else DEFAULT_MODEL_DIR / STAGE_FOLDERS["keyframes"] / "tokenizer"
    if path.is_dir():
        path = path / "spiece.model"
    if not path.is_file():
        raise ValueError(
            f"path={str(path)!r} is not a sentencepiece model file; train one with train_caption_tokenizer."
        )
    processor = spm.SentencePieceProcessor(model_file=str(path))
    # transformers 5's T5Tokenizer is tokenizers-backed: it takes the unigram pieces and scores.
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_default_components(tokenizer: T5Tokenizer | None = None, seed: int = 0) -> dict[str, Any]:
    """Build the cascade's components with fresh random weights (the starting point of pretraining).

    Args:
        tokenizer: The caption tokenizer; the shipped one when None.
        seed: Seed of the weight initialisation.

    Returns:
        The same keys as :func:`load_default_components`.

    Example:
        >>> components = build_default_components()
        >>> components["unet"].config.in_channels, components["interpolation_unet"].config.in_channels
        (3, 7)
    """
    tokenizer = tokenizer if tokenizer is not None else caption_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG))
    return {
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "unet": Show1UNet3DConditionModel(**keyframes_unet_config()).eval(),
        "interpolation_unet": Show1UNet3DConditionModel(**interpolation_unet_config()).eval(),
        "sr_unet": Show1UNet3DConditionModel(**sr_unet_config()).eval(),
        "scheduler": DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
        "noise_scheduler": DDPMScheduler(**NOISE_SCHEDULER_CONFIG),
    }


def _check_model_dir(model_dir: Path) -> None:
    missing = [name for name in STAGE_FOLDERS.values() if not (model_dir / name / "unet" / "config.json").is_file()]
    if missing:
        raise ValueError(
            f"model_dir={str(model_dir)!r} has no trained {missing} stage(s); pass the folder written by "
            "`python -m motion_adapters.world.pretrain --out DIR`, or leave model_dir=None for the shipped model."
        )


def load_default_components(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_dir: str | os.PathLike | None = None,
    tiny_head_attention: bool = True,
) -> dict[str, Any]:
    """Load the pretrained default cascade's components, in eval mode.

    The weights are stored in float16; they load as ``dtype`` (float32 when None) on ``device`` (CPU when None).
    With ``tiny_head_attention`` the UNets' temporal attentions get :class:`TinyHeadAttnProcessor`, which gives the
    same outputs as diffusers' default processor (to float rounding) in about half the CPU time.

    Args:
        device: Where the models go.
        dtype: dtype of the models.
        model_dir: A folder written by the pretraining script; the shipped ``DEFAULT_MODEL_DIR`` when None.
        tiny_head_attention: Set :class:`TinyHeadAttnProcessor` on every temporal attention.

    Returns:
        ``{"text_encoder", "tokenizer", "unet" (keyframes), "interpolation_unet", "sr_unet", "scheduler"
        (DPM-Solver++ for sampling), "noise_scheduler" (the DDPM training schedule)}``.

    Example:
        >>> components = load_default_components()
        >>> components["unet"].config.sample_size, components["sr_unet"].config.sample_size
        (32, 96)
    """
    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    _check_model_dir(model_dir)
    dtype = dtype or torch.float32
    keyframes = model_dir / STAGE_FOLDERS["keyframes"]

    def unet(stage: str) -> Show1UNet3DConditionModel:
        folder = model_dir / STAGE_FOLDERS[stage] / "unet"
        model = Show1UNet3DConditionModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        if tiny_head_attention:
            use_tiny_head_attention(model)
        return model

    return {
        "text_encoder": T5EncoderModel.from_pretrained(keyframes / "text_encoder", dtype=dtype).to(device).eval(),
        "tokenizer": caption_tokenizer(keyframes / "tokenizer"),
        "unet": unet("keyframes"),
        "interpolation_unet": unet("interpolation"),
        "sr_unet": unet("sr"),
        "scheduler": DPMSolverMultistepScheduler.from_pretrained(keyframes / "scheduler"),
        "noise_scheduler": DDPMScheduler.from_pretrained(model_dir / STAGE_FOLDERS["sr"] / "image_noising_scheduler"),
    }


def cascade_from_components(components: dict[str, Any]):
    """Assemble a ``Show1CascadePipeline`` (keyframes, interpolation, SR1) from a components dict.

    Every stage gets its own copy of the sampling scheduler; the T5 encoder belongs to the keyframe stage, which
    encodes prompts once for all three.

    Example:
        >>> cascade = cascade_from_components(build_default_components())
        >>> cascade.stages
        ('keyframes', 'interpolation', 'sr1')
    """
    from ..pipelines import (
        Show1CascadePipeline,
        Show1InterpolationPipeline,
        Show1KeyframesPipeline,
        Show1SuperResPipeline,
    )

    scheduler = components["scheduler"]
    keyframes = Show1KeyframesPipeline(
        tokenizer=components["tokenizer"], text_encoder=components["text_encoder"], unet=components["unet"],
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config),
    )  # fmt: skip
    interpolation = Show1InterpolationPipeline(
        tokenizer=None, text_encoder=None, unet=components["interpolation_unet"],
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config),
    )  # fmt: skip
    sr1 = Show1SuperResPipeline(
        tokenizer=None, text_encoder=None, unet=components["sr_unet"],
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler.config),
        image_noising_scheduler=DDPMScheduler.from_config(components["noise_scheduler"].config),
    )  # fmt: skip
    for pipeline in (keyframes, interpolation, sr1):
        pipeline.set_progress_bar_config(disable=True)
    return Show1CascadePipeline(keyframes, interpolation, sr1)


def load_default_cascade(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    model_dir: str | os.PathLike | None = None,
    tiny_head_attention: bool = True,
):
    """Load the pretrained default model as a ``Show1CascadePipeline`` (keyframes, interpolation, SR1).

    Call it with :data:`DEFAULT_CALL_KWARGS` for 29 frames of 96 x 96; the cascade's own defaults are Show-1's
    (40 x 64 keyframes, 75 to 125 steps per stage), which this model was not trained for.

    Args:
        device: Where the models go (CPU when None).
        dtype: dtype of the models (float32 when None).
        model_dir: A folder written by the pretraining script; the shipped model when None.
        tiny_head_attention: Set :class:`TinyHeadAttnProcessor` on every temporal attention (same outputs, faster).

    Example:
        >>> cascade = load_default_cascade()
        >>> out = cascade("a white star moving up on a striped background", **DEFAULT_CALL_KWARGS, output_type="pt")
        >>> out.frames.shape
        torch.Size([1, 3, 29, 96, 96])
    """
    return cascade_from_components(load_default_components(device, dtype, model_dir, tiny_head_attention))
