"""Show-1's pixel-space 3D UNet (keyframes, interpolation, super-resolution), loadable from ``showlab/show-1-*``.

The checkpoints' ``unet/config.json`` name the class ``UNet3DConditionModel`` of the ``showone`` package; this
class reads the same config (the typo key ``transfromer_in_opt`` included) and the same state dict on current
diffusers, with processors, gradient checkpointing and eval mode that reach the temporal layers too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.activations import get_activation
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0, AttnProcessor2_0
from diffusers.models.embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from diffusers.utils import BaseOutput
from torch import nn

from ..frozen_memo import kept
from .blocks_show1 import UNetMidBlock3DSimpleCrossAttn
from .config_show1 import DOWN_BLOCKS, EXTENSION_KEYS, UP_BLOCKS, per_block, validate_config
from .extensions import CoordinateEmbedding, widen_temporal_convs


@dataclass
class Show1UNet3DConditionOutput(BaseOutput):
    """Output of [`Show1UNet3DConditionModel`].

    Args:
        sample: The prediction, shape ``(batch, out_channels, num_frames, height, width)``.

    Example:
        >>> Show1UNet3DConditionOutput(sample=torch.zeros(1, 6, 8, 40, 64)).sample.shape
        torch.Size([1, 6, 8, 40, 64])
    """

    sample: torch.Tensor


class Show1UNet3DConditionModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    """Show-1's 3D UNet: an IF UNet whose layers gain temporal convolutions and temporal attention.

    The defaults are the show-1-base configuration ([`show1_base_config`]).

    The constructor takes the keys of the published ``unet/config.json`` (diffusers' IF ``UNet2DConditionModel``
    keys with 3D block names, plus ``transfromer_in_opt``); values that would select an architecture this class does
    not build raise ``ValueError`` naming the key. Three keys are not Show-1's, and their defaults build Show-1
    exactly (``models.extensions``; ``extend_unet`` adds them to a trained UNet):

    - ``frame_embedding_frames`` (default 0, none) gives every attention layer a learned, zero-initialised
      (frames, C) table added to its input frames before the temporal transformer (``*.frame_embeddings.N``), so
      the layers know each frame's index; Show-1 leaves frame order to the zero padding of its temporal
      convolutions.
    - ``temporal_conv_spatial_kernel`` (default 1) widens the first convolution of every temporal convolution
      layer from (3, 1, 1) to (3, k, k), so a frame reads its neighbours' pixels around the same position; the new
      taps start at zero.
    - ``coordinate_frequencies`` (default 0) adds a zero-initialised learned map of each pixel's (x, y) Fourier
      features to the output of ``conv_in`` (``coordinate_embedding.proj``), so the layers know where in the frame
      a pixel is.

    Module names follow the reference, so the published state
    dicts load unchanged and temporal attention lives at ``*.temp_attentions.N.transformer_blocks.0.attn{1,2}``.

    Example:
        >>> unet = Show1UNet3DConditionModel.from_pretrained("showlab/show-1-base", subfolder="unet")
        >>> out = unet(torch.randn(1, 3, 8, 40, 64), 999, torch.randn(1, 77, 4096)).sample  # (1, 6, 8, 40, 64)
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]
    #: While a training run keeps the prompt's frozen results (`frozen_memo.kept`), its memo; else None.
    text_memo: dict | None = None

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = 64,
        in_channels: int = 3,
        out_channels: int = 6,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("ResnetDownsampleBlock3D",) + ("SimpleCrossAttnDownBlock3D",) * 3,
        mid_block_type: str | None = "UNetMidBlock3DSimpleCrossAttn",
        up_block_types: tuple[str, ...] = ("SimpleCrossAttnUpBlock3D",) * 3 + ("ResnetUpsampleBlock3D",),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 960, 1280),
        layers_per_block: int | tuple[int, ...] = 3,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "gelu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        encoder_hid_dim: int | None = 4096,
        encoder_hid_dim_type: str | None = "text_proj",
        attention_head_dim: int = 64,
        num_attention_heads: int | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = "text",
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "scale_shift",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = "group_norm",
        addition_embed_type_num_heads: int = 64,
        transfromer_in_opt: bool = False,
        frame_embedding_frames: int = 0,
        temporal_conv_spatial_kernel: int = 1,
        coordinate_frequencies: int = 0,
    ):
        super().__init__()
        validate_config(dict(self.config))
        # `downsample_padding` only configures conv downsamplers; Show-1's blocks downsample with ResNets.
        if encoder_hid_dim is not None and encoder_hid_dim_type is None:
            encoder_hid_dim_type = "text_proj"  # diffusers' and the reference's default for a given encoder_hid_dim
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        num_blocks = len(down_block_types)
        layers = per_block("layers_per_block", layers_per_block, num_blocks)
        if isinstance(only_cross_attention, bool):
            if mid_block_only_cross_attention is None:
                mid_block_only_cross_attention = only_cross_attention
        only_cross = per_block("only_cross_attention", only_cross_attention, num_blocks)

        # 1. Input and embeddings.
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        self.coordinate_embedding = None
        if coordinate_frequencies:  # not in Show-1: absolute (x, y) features, zero-initialised
            self.coordinate_embedding = CoordinateEmbedding(coordinate_frequencies, block_out_channels[0])
        self.transformer_in = None
        if transfromer_in_opt:
            self.transformer_in = TransformerTemporalModel(
                num_attention_heads=8, attention_head_dim=64, in_channels=block_out_channels[0], num_layers=1
            )
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            block_out_channels[0], time_embed_dim, act_fn=act_fn, post_act_fn=timestep_post_act
        )
        self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim) if encoder_hid_dim_type else None
        self.class_embedding = None
        if class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)
        self.add_embedding = None
        if addition_embed_type == "text":
            text_dim = encoder_hid_dim if encoder_hid_dim is not None else cross_attention_dim
            self.add_embedding = TextTimeEmbedding(text_dim, time_embed_dim, num_heads=addition_embed_type_num_heads)
        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn else None
        blocks_time_embed_dim = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        # 2. Down, mid and up blocks.
        common = dict(
            temb_channels=blocks_time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=resnet_skip_time_act,
            output_scale_factor=resnet_out_scale_factor,
        )
        attention = dict(
            attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            cross_attention_norm=cross_attention_norm,
            frame_embedding_frames=frame_embedding_frames,
        )
        self.down_blocks = nn.ModuleList()
        for i, name in enumerate(down_block_types):
            extra = dict(attention, only_cross_attention=only_cross[i]) if name.startswith("SimpleCrossAttn") else {}
            self.down_blocks.append(
                DOWN_BLOCKS[name](
                    in_channels=block_out_channels[max(i - 1, 0)],
                    out_channels=block_out_channels[i],
                    num_layers=layers[i],
                    add_downsample=i < num_blocks - 1,
                    **common,
                    **extra,
                )
            )
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock3DSimpleCrossAttn(
                in_channels=block_out_channels[-1],
                **dict(common, output_scale_factor=mid_block_scale_factor),
                **attention,
                only_cross_attention=bool(mid_block_only_cross_attention),
            )
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        for i, name in enumerate(up_block_types):
            extra = (
                dict(attention, only_cross_attention=only_cross[-1 - i]) if name.startswith("SimpleCrossAttn") else {}
            )
            self.up_blocks.append(
                UP_BLOCKS[name](
                    in_channels=reversed_channels[min(i + 1, num_blocks - 1)],
                    prev_output_channel=reversed_channels[max(i - 1, 0)],
                    out_channels=reversed_channels[i],
                    num_layers=layers[-1 - i] + 1,
                    add_upsample=i < num_blocks - 1,
                    **common,
                    **extra,
                )
            )
        self.num_upsamplers = num_blocks - 1

        # 3. Output.
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = get_activation(act_fn)
        self.conv_out = nn.Conv2d(
            block_out_channels[0], out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )
        if temporal_conv_spatial_kernel > 1:  # not in Show-1: (3, k, k) temporal convolutions, new taps at zero
            widen_temporal_convs(self, temporal_conv_spatial_kernel)
        self.gradient_checkpointing = False

    def set_default_attn_processor(self) -> None:
        """Restore the PyTorch SDPA processors on every attention, temporal attention included.

        ``AttnAddedKVProcessor2_0`` for the spatial joint attention, ``AttnProcessor2_0`` for every other one.

        Example:
            >>> unet.set_default_attn_processor()
        """
        for module in self.modules():
            if isinstance(module, Attention):
                joint = module.added_kv_proj_dim is not None
                module.set_processor(AttnAddedKVProcessor2_0() if joint else AttnProcessor2_0())

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | float | int | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Show1UNet3DConditionOutput | tuple[torch.Tensor]:
        """Predict the noise (and IF's variance channels) of a video.

        Args:
            sample: Noisy video ``(batch, in_channels, num_frames, height, width)``; ``num_frames`` is read from it.
                Height and width must be multiples of ``2 ** num_upsamplers`` (8 for show-1-base).
            timestep: A number, or a tensor of shape ``()`` or ``(batch,)``.
            encoder_hidden_states: Raw T5 states ``(batch, sequence_length, encoder_hid_dim)``; the model pools them
                into the time embedding and projects them to ``cross_attention_dim`` itself.
            class_labels: The SR stage's noise level (number or ``(batch,)``), embedded like a timestep. Required
                exactly when ``class_embed_type`` is set.
            attention_mask: Optional ``(batch, sequence_length)`` mask of the text tokens, 1 keep / 0 drop, applied
                in the spatial joint attention as in the reference (Show-1's pipelines pass none).
            cross_attention_kwargs: Passed to every attention processor, temporal ones included.
            return_dict: Return a [`Show1UNet3DConditionOutput`] rather than a tuple.

        Returns:
            The prediction ``(batch, out_channels, num_frames, height, width)``.

        Example:
            >>> unet(torch.randn(2, 3, 8, 40, 64), torch.tensor([999, 999]), torch.randn(2, 77, 4096)).sample.shape
            torch.Size([2, 6, 8, 40, 64])
        """
        self._check_inputs(sample, encoder_hidden_states, class_labels, attention_mask)
        batch, _, num_frames, height, width = sample.shape
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. Embedding: timestep (+ noise level) (+ pooled text), repeated for every frame.
        emb = self.time_embedding(self._sinusoidal(timestep, "timestep", batch, sample))
        if self.class_embedding is not None:
            class_emb = self.class_embedding(self._sinusoidal(class_labels, "class_labels", batch, sample))
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        # a memo only while a training run keeps the text's frozen results (training_step.joint_attention_processors)
        text, memo = encoder_hidden_states, self.text_memo
        if self.add_embedding is not None:
            pooled = kept(memo, "unet.add_embedding", [text], [self.add_embedding], lambda: self.add_embedding(text))
            emb = emb + pooled
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        emb = emb.repeat_interleave(num_frames, dim=0)

        def text_states():
            states = text if self.encoder_hid_proj is None else self.encoder_hid_proj(text)
            return states.repeat_interleave(num_frames, dim=0)

        projections = [self.encoder_hid_proj] if self.encoder_hid_proj is not None else []
        encoder_hidden_states = kept(memo, "unet.text_states", [text], projections, text_states, (num_frames,))
        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.repeat_interleave(num_frames, dim=0).unsqueeze(1)

        # 2. Fold frames into the batch: (B, C, F, H, W) -> (B * F, C, H, W).
        sample = sample.permute(0, 2, 1, 3, 4).reshape(batch * num_frames, -1, height, width)
        sample = self.conv_in(sample)
        if self.coordinate_embedding is not None:
            sample = sample + self.coordinate_embedding(*sample.shape[-2:]).to(sample.dtype)
        if self.transformer_in is not None:
            args = (sample, None, None, None, num_frames, cross_attention_kwargs, False)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                sample = self._gradient_checkpointing_func(self.transformer_in, *args)[0]
            else:
                sample = self.transformer_in(*args)[0]

        # 3. Down, mid, up.
        context = (encoder_hidden_states, attention_mask, num_frames, cross_attention_kwargs)
        skips = (sample,)
        for block in self.down_blocks:
            sample, res_samples = block(sample, emb, *context)
            skips += res_samples
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, *context)
        for block in self.up_blocks:
            n = len(block.resnets)
            sample, skips = block(sample, skips[-n:], emb, *context), skips[:-n]

        # 4. Output, unfolded to (B, C_out, F, H, W).
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        sample = sample.reshape(batch, num_frames, -1, height, width).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (sample,)
        return Show1UNet3DConditionOutput(sample=sample)

    def _sinusoidal(self, value: Any, name: str, batch: int, sample: torch.Tensor) -> torch.Tensor:
        """Broadcast a timestep-like value to ``(batch,)`` and project it sinusoidally, in ``sample``'s dtype."""
        if not torch.is_tensor(value):
            if sample.device.type == "mps":
                dtype = torch.float32 if isinstance(value, float) else torch.int32
            else:
                dtype = torch.float64 if isinstance(value, float) else torch.int64
            value = torch.tensor([value], dtype=dtype, device=sample.device)
        value = value.to(sample.device).reshape(-1) if value.ndim == 0 else value.to(sample.device)
        if value.ndim != 1 or value.shape[0] not in (1, batch):
            raise ValueError(
                f"`{name}` must be a number or a tensor of shape () or ({batch},), got shape {tuple(value.shape)}."
            )
        return self.time_proj(value.expand(batch)).to(dtype=sample.dtype)

    def _check_inputs(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        class_labels: Any,
        attention_mask: torch.Tensor | None,
    ) -> None:
        config = self.config
        if sample.ndim != 5 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"`sample` must be (batch, {config.in_channels}, num_frames, height, width), got shape "
                f"{tuple(sample.shape)}; fold or permute video tensors to channels-before-frames."
            )
        factor = 2**self.num_upsamplers
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(
                f"`sample` height and width must be multiples of {factor}, got {tuple(sample.shape[-2:])}; "
                "resize or pad the frames."
            )
        text_dim = config.encoder_hid_dim if self.encoder_hid_proj is not None else config.cross_attention_dim
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"`encoder_hidden_states` must be (batch={sample.shape[0]}, sequence_length, {text_dim}), got "
                f"shape {tuple(encoder_hidden_states.shape)}; repeat the text embeddings per video."
            )
        if encoder_hidden_states.shape[-1] != text_dim:
            raise ValueError(
                f"`encoder_hidden_states` has feature size {encoder_hidden_states.shape[-1]} but this UNet expects "
                f"{text_dim}; pass the raw T5 encoder states."
            )
        if (class_labels is None) != (self.class_embedding is None):
            raise ValueError(
                f"`class_labels` must be given exactly when the UNet has a class embedding (class_embed_type="
                f"{config.class_embed_type!r}); got class_labels={'None' if class_labels is None else 'a value'}."
            )
        if attention_mask is not None and attention_mask.shape != encoder_hidden_states.shape[:2]:
            raise ValueError(
                f"`attention_mask` must be (batch, sequence_length) = {tuple(encoder_hidden_states.shape[:2])}, got "
                f"{tuple(attention_mask.shape)}."
            )


def show1_base_config() -> dict[str, Any]:
    """The ``unet/config.json`` of ``showlab/show-1-base`` (keyframes, 3 -> 6 channels, 8 x 40 x 64).

    These are the constructor's defaults, as a JSON-like dict (lists, not tuples) with every key of the published
    config; this class's own extensions (``EXTENSION_KEYS``) are left out.

    Example:
        >>> with torch.device("meta"):
        ...     unet = Show1UNet3DConditionModel(**show1_base_config())
    """
    parameters = inspect.signature(Show1UNet3DConditionModel.__init__).parameters
    return {
        name: list(p.default) if isinstance(p.default, tuple) else p.default
        for name, p in parameters.items()
        if name not in ("self", *EXTENSION_KEYS)
    }


def show1_interpolation_config() -> dict[str, Any]:
    """The UNet config of ``showlab/show-1-interpolation``: the base config with 7 input channels.

    Input = 3 noisy + 3 condition (end frames interpolated) + 1 mask channel. Everything but ``in_channels`` is
    assumed equal to the base model (unverified).

    Example:
        >>> show1_interpolation_config()["in_channels"]
        7
    """
    return {**show1_base_config(), "in_channels": 7}


def show1_sr1_config() -> dict[str, Any]:
    """The UNet config of ``showlab/show-1-sr1`` (first video super-resolution, 6 -> 6 channels, 160 x 256).

    Verified facts: block channels, block types, layers per block, class embedding, cross-attention and encoder
    dims, channels, scale factors, skipped time activation. The fields marked "unverified" are filled in as
    diffusers' ``scripts/convert_if.py`` builds the IF-II UNet this stage starts from; a mismatch shows up as
    missing or unexpected keys when loading the real weights.

    Example:
        >>> show1_sr1_config()["class_embed_type"]
        'timestep'
    """
    return {
        **show1_base_config(),
        "sample_size": 256,  # unverified
        "in_channels": 6,
        "out_channels": 6,
        "down_block_types": ["ResnetDownsampleBlock3D"] * 3 + ["SimpleCrossAttnDownBlock3D"] * 2,
        "up_block_types": ["SimpleCrossAttnUpBlock3D"] * 2 + ["ResnetUpsampleBlock3D"] * 3,
        "block_out_channels": [128, 256, 512, 768, 768],
        "layers_per_block": [2, 2, 3, 4, 2],
        "mid_block_scale_factor": 1.4142271248762552,
        "resnet_out_scale_factor": 1.4142271248762552,
        "resnet_skip_time_act": True,
        "cross_attention_dim": 768,
        "encoder_hid_dim": 4096,
        "class_embed_type": "timestep",
        "only_cross_attention": True,  # unverified (convert_if.py default for IF super-resolution UNets)
        "time_embedding_dim": 768,  # unverified (convert_if.py: model_channels * last channel multiplier)
        "time_embedding_act_fn": "gelu",  # unverified (convert_if.py)
    }
