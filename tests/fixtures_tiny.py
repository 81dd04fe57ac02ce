"""Tiny Show-1 cascade components built from config for the pipeline tests (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    IFSuperResolutionPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
    VideoToVideoSDPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from motion_adapters.models import Show1UNet3DConditionModel, show1_base_config, show1_sr1_config
from motion_adapters.pipelines import (
    Show1CascadePipeline,
    Show1InterpolationPipeline,
    Show1KeyframesPipeline,
    Show1SuperResPipeline,
)

TEXT_DIM = 64  # T5 d_model = the UNets' encoder_hid_dim

CAPTIONS = [
    "a cat runs on the grass",
    "a dog jumps over a fence",
    "a burning car driving on a rainbow",
    "a red ball rolls to the left",
    "a panda surfing a wave at sunset",
    "low resolution, blur",
    "the sun sets over the sea",
    "a bird flies across the sky",
]

# show-1-base's scheduler/scheduler_config.json (SHOW1.md)
SHOW1_SCHEDULER_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "beta_schedule": "squaredcos_cap_v2",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "thresholding": True,
    "dynamic_thresholding_ratio": 0.95,
    "sample_max_value": 1.5,
    "lower_order_final": True,
    "lambda_min_clipped": -5.1,
    "timestep_spacing": "linspace",
    "variance_type": "fixed_small",
}


def tiny_tokenizer(tmp_dir: Path) -> T5Tokenizer:
    """Train a 48-piece unigram sentencepiece model on a few captions and wrap it as a T5Tokenizer."""
    corpus = Path(tmp_dir) / "captions.txt"
    corpus.write_text("\n".join(CAPTIONS * 10), encoding="utf-8")
    prefix = str(Path(tmp_dir) / "tiny_spm")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=prefix, vocab_size=48, model_type="unigram", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
    # transformers 5's T5Tokenizer is tokenizers-backed: it takes the unigram pieces and scores, not vocab_file.
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.1,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_unet_config(stage: str) -> dict:
    """A two-level Show-1 UNet config of the given stage ("keyframes", "interpolation", "sr1")."""
    common = {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "encoder_hid_dim": TEXT_DIM,
        "addition_embed_type_num_heads": 4,
        "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    }
    if stage == "sr1":
        return {**show1_sr1_config(), **common, "layers_per_block": [1, 1], "time_embedding_dim": 64}
    return {**show1_base_config(), **common, "in_channels": 7 if stage == "interpolation" else 3}


def tiny_unet(stage: str, seed: int = 0) -> Show1UNet3DConditionModel:
    """A tiny Show-1 UNet with random, non-zero weights everywhere (zero-initialised layers included)."""
    torch.manual_seed(seed)
    unet = Show1UNet3DConditionModel(**tiny_unet_config(stage))
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.02)
    return unet.eval()


def tiny_scheduler(**overrides) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**{**SHOW1_SCHEDULER_CONFIG, **overrides})


def tiny_noising_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def tiny_sr2(seed: int = 0) -> VideoToVideoSDPipeline:
    """A tiny diffusers VideoToVideoSDPipeline (VAE without downsampling, one-layer CLIP, two-level UNet)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], norm_num_groups=4,
        sample_size=16,
    )  # fmt: skip
    letters = sorted(set("".join(CAPTIONS).replace(" ", "")))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in letters:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )  # fmt: skip
    )
    unet = UNet3DConditionModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4, sample_size=16, in_channels=4, out_channels=4,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipe = VideoToVideoSDPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                  unet=unet.eval(), scheduler=scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_if_superres(seed: int = 0) -> IFSuperResolutionPipeline:
    """A tiny DeepFloyd IF-II super-resolution pipeline without text encoder, on the tiny T5 width."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=6, out_channels=6,
        cross_attention_dim=32, encoder_hid_dim=TEXT_DIM, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
        time_embedding_dim=32, norm_num_groups=8,
    )  # fmt: skip
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", thresholding=True, sample_max_value=1.0,
        variance_type="learned_range",
    )  # fmt: skip
    pipe = IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet.eval(), scheduler=scheduler,
        image_noising_scheduler=tiny_noising_scheduler(), safety_checker=None, feature_extractor=None,
        watermarker=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cascade(tmp_dir: Path, with_sr2: bool = False) -> Show1CascadePipeline:
    """Keyframes, interpolation and SR1 stages of tiny random weights sharing one tiny T5."""
    tokenizer = tiny_tokenizer(tmp_dir)
    keyframes = Show1KeyframesPipeline(
        tokenizer=tokenizer, text_encoder=tiny_text_encoder(len(tokenizer)), unet=tiny_unet("keyframes", 1),
        scheduler=tiny_scheduler(),
    )  # fmt: skip
    interpolation = Show1InterpolationPipeline(
        tokenizer=None, text_encoder=None, unet=tiny_unet("interpolation", 2), scheduler=tiny_scheduler()
    )
    sr1 = Show1SuperResPipeline(
        tokenizer=None, text_encoder=None, unet=tiny_unet("sr1", 3), scheduler=tiny_scheduler(),
        image_noising_scheduler=tiny_noising_scheduler(),
    )  # fmt: skip
    for pipe in (keyframes, interpolation, sr1):
        pipe.set_progress_bar_config(disable=True)
    return Show1CascadePipeline(keyframes, interpolation, sr1, tiny_sr2() if with_sr2 else None)
