"""The 3D blocks of Show-1's UNet: 2D ResNets and IF joint attention interleaved with temporal layers.

Every layer of a block runs, in this order (the reference order, which the checkpoints depend on):
``resnets[i]`` (diffusers ``ResnetBlock2D``) -> ``temp_convs[i]`` (diffusers ``TemporalConvLayer``) ->
``attentions[i]`` (IF joint self + cross attention with added key/value projections) -> ``temp_attentions[i]``
(diffusers ``TransformerTemporalModel``, self-attention over frames at every pixel). ``Resnet*`` blocks stop after
the temporal convolution. Hidden states travel folded as ``(batch * num_frames, channels, height, width)``.

Unlike the reference code, gradient checkpointing covers every sub-layer of every block, temporal attention and
temporal convolutions included; ``ModelMixin.enable_gradient_checkpointing`` switches it on.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0
from diffusers.models.resnet import ResnetBlock2D, TemporalConvLayer
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel
from torch import nn

# The reference builds its temporal convolutions with the diffusers-0.19 ``TemporalConvLayer`` defaults: 32 groups
# whatever the UNet's ``norm_num_groups``, and dropout 0.1 (active in train mode only).
TEMPORAL_CONV_NORM_GROUPS = 32
TEMPORAL_CONV_DROPOUT = 0.1

__all__ = [
    "ResnetDownsampleBlock3D",
    "ResnetUpsampleBlock3D",
    "SimpleCrossAttnDownBlock3D",
    "SimpleCrossAttnUpBlock3D",
    "UNetMidBlock3DSimpleCrossAttn",
]


def joint_attention(
    channels: int,
    attention_head_dim: int,
    cross_attention_dim: int,
    norm_num_groups: int,
    only_cross_attention: bool = False,
    cross_attention_norm: str | None = "group_norm",
) -> Attention:
    """Build the IF-style spatial attention: the text's keys and values are concatenated with the pixels' own.

    ``channels // attention_head_dim`` heads of ``attention_head_dim``, group norm on the input, ``norm_cross`` on
    the text states, the PyTorch SDPA processor (``AttnAddedKVProcessor2_0``).

    Example:
        >>> attn = joint_attention(64, 32, cross_attention_dim=32, norm_num_groups=8)
        >>> attn.heads
        2
    """
    return Attention(
        query_dim=channels,
        cross_attention_dim=channels,
        heads=channels // attention_head_dim,
        dim_head=attention_head_dim,
        added_kv_proj_dim=cross_attention_dim,
        norm_num_groups=norm_num_groups,
        bias=True,
        upcast_softmax=True,
        only_cross_attention=only_cross_attention,
        cross_attention_norm=cross_attention_norm,
        processor=AttnAddedKVProcessor2_0(),
    )


def temporal_attention(channels: int, attention_head_dim: int, norm_num_groups: int) -> TransformerTemporalModel:
    """Build Show-1's temporal attention: ``attention_head_dim`` heads of ``channels // attention_head_dim``.

    The split is the reverse of the spatial one (64 heads of C/64 for the published checkpoints) and the numerics
    depend on it. One transformer layer whose ``attn1`` and ``attn2`` are both self-attention over frames
    (``double_self_attention``), q/k/v without bias, GEGLU feed-forward, no frame position embedding.

    Example:
        >>> temporal_attention(128, 64, norm_num_groups=32).transformer_blocks[0].attn1.heads
        64
    """
    return TransformerTemporalModel(
        num_attention_heads=attention_head_dim,
        attention_head_dim=channels // attention_head_dim,
        in_channels=channels,
        num_layers=1,
        norm_num_groups=norm_num_groups,
        cross_attention_dim=None,
        double_self_attention=True,
    )


def add_frame_embedding(hidden_states: torch.Tensor, table: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Add row ``f`` of ``table`` (max_frames, C) to every pixel of frame ``f`` of folded (B * F, C, H, W) states.

    Example:
        >>> add_frame_embedding(torch.zeros(2 * 3, 4, 1, 1), torch.arange(8.0).view(2, 4).repeat(2, 1), 3)[3:, :, 0, 0]
        tensor([[0., 1., 2., 3.],
                [4., 5., 6., 7.],
                [0., 1., 2., 3.]])
    """
    if num_frames > table.shape[0]:
        raise ValueError(
            f"num_frames={num_frames} is more than this UNet's frame embedding has rows ({table.shape[0]}, config "
            f"`frame_embedding_frames`); generate at most {table.shape[0]} frames with this stage."
        )
    folded = hidden_states.unflatten(0, (-1, num_frames))
    return (folded + table[:num_frames, :, None, None].to(folded.dtype)).flatten(0, 1)


class _Show1Block3D(nn.Module):
    """Shared construction and per-layer forward of the Show-1 3D blocks."""

    _with_attention = False

    def __init__(
        self,
        resnet_in_channels: list[int],
        out_channels: int,
        temb_channels: int,
        *,
        num_attentions: int,
        resnet_eps: float,
        resnet_act_fn: str,
        resnet_groups: int,
        resnet_time_scale_shift: str,
        skip_time_act: bool,
        output_scale_factor: float,
        attention_head_dim: int | None = None,
        cross_attention_dim: int | None = None,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        frame_embedding_frames: int = 0,
    ):
        super().__init__()
        self.has_cross_attention = num_attentions > 0
        self._resnet_kwargs = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            dropout=0.0,
            time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
            skip_time_act=skip_time_act,
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=c, out_channels=out_channels, **self._resnet_kwargs) for c in resnet_in_channels
        )
        self.temp_convs = nn.ModuleList(
            TemporalConvLayer(
                out_channels, out_channels, dropout=TEMPORAL_CONV_DROPOUT, norm_num_groups=TEMPORAL_CONV_NORM_GROUPS
            )
            for _ in resnet_in_channels
        )
        self.attentions = nn.ModuleList(
            joint_attention(
                out_channels,
                attention_head_dim,
                cross_attention_dim,
                resnet_groups,
                only_cross_attention=only_cross_attention,
                cross_attention_norm=cross_attention_norm,
            )
            for _ in range(num_attentions)
        )
        self.temp_attentions = nn.ModuleList(
            temporal_attention(out_channels, attention_head_dim, resnet_groups) for _ in range(num_attentions)
        )
        # Not in Show-1 (off by default): a learned per-frame vector added before each temporal transformer.
        self.frame_embeddings = None
        if frame_embedding_frames and num_attentions:
            self.frame_embeddings = nn.ParameterList(
                nn.Parameter(torch.zeros(frame_embedding_frames, out_channels)) for _ in range(num_attentions)
            )
        self.gradient_checkpointing = False

    def _sampler(self, channels: int, up: bool = False, down: bool = False) -> nn.ModuleList:
        return nn.ModuleList(
            [ResnetBlock2D(in_channels=channels, out_channels=channels, up=up, down=down, **self._resnet_kwargs)]
        )

    @classmethod
    def _check_attention_kwargs(cls, attention_kwargs: dict[str, Any]) -> None:
        if attention_kwargs and not cls._with_attention:
            raise TypeError(
                f"{cls.__name__} has no attention layers, so it takes no {sorted(attention_kwargs)}; use the "
                f"SimpleCrossAttn* block for attention."
            )

    def _run(self, module: Any, *args: Any) -> Any:
        """Call ``module(*args)``, through the gradient checkpointing function when it is enabled."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(module, *args)
        return module(*args)

    def _resnet_layer(self, i: int, hidden_states: torch.Tensor, temb: torch.Tensor, num_frames: int) -> torch.Tensor:
        hidden_states = self._run(self.resnets[i], hidden_states, temb)
        return self._run(self.temp_convs[i], hidden_states, num_frames)

    def _attention_layer(
        self,
        i: int,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        num_frames: int,
        cross_attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        attn = self.attentions[i]
        if cross_attention_kwargs:
            attn = functools.partial(attn, **cross_attention_kwargs)
        hidden_states = self._run(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.frame_embeddings is not None:
            hidden_states = add_frame_embedding(hidden_states, self.frame_embeddings[i], num_frames)
        # TransformerTemporalModel.forward(hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
        # cross_attention_kwargs, return_dict): no encoder states, so attn2 is self-attention too.
        temp_attn = self.temp_attentions[i]
        return self._run(temp_attn, hidden_states, None, None, None, num_frames, cross_attention_kwargs, False)[0]


class ResnetDownsampleBlock3D(_Show1Block3D):
    """Down block of ResNet + temporal convolution layers, downsampling with a ResNet (``down=True``).

    All blocks share one call signature, so the UNet calls them alike; blocks without attention ignore the text.

    Example:
        >>> block = ResnetDownsampleBlock3D(32, 64, temb_channels=128, resnet_groups=8)
        >>> out, skips = block(torch.randn(2 * 4, 32, 8, 8), torch.randn(8, 128), num_frames=4)
        >>> out.shape, len(skips)
        (torch.Size([8, 64, 4, 4]), 2)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        **attention_kwargs: Any,
    ):
        self._check_attention_kwargs(attention_kwargs)
        super().__init__(
            [in_channels] + [out_channels] * (num_layers - 1),
            out_channels,
            temb_channels,
            num_attentions=num_layers if self._with_attention else 0,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=skip_time_act,
            output_scale_factor=output_scale_factor,
            **attention_kwargs,
        )
        self.downsamplers = self._sampler(out_channels, down=True) if add_downsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the layers, then the downsampler; return the output and every layer's output for the skips."""
        output_states = ()
        for i in range(len(self.resnets)):
            hidden_states = self._resnet_layer(i, hidden_states, temb, num_frames)
            if self.has_cross_attention:
                hidden_states = self._attention_layer(
                    i, hidden_states, encoder_hidden_states, attention_mask, num_frames, cross_attention_kwargs
                )
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self._run(self.downsamplers[0], hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class SimpleCrossAttnDownBlock3D(ResnetDownsampleBlock3D):
    """Down block whose layers add IF joint attention and temporal attention after the temporal convolution.

    Example:
        >>> block = SimpleCrossAttnDownBlock3D(32, 64, temb_channels=128, resnet_groups=8, attention_head_dim=32,
        ...                                    cross_attention_dim=16)
        >>> text = torch.randn(8, 7, 16)
        >>> out, _ = block(torch.randn(8, 32, 8, 8), torch.randn(8, 128), text, num_frames=4)
        >>> out.shape
        torch.Size([8, 64, 4, 4])
    """

    _with_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 1280,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        **resnet_kwargs: Any,
    ):
        super().__init__(
            in_channels,
            out_channels,
            temb_channels,
            num_layers,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            only_cross_attention=only_cross_attention,
            cross_attention_norm=cross_attention_norm,
            **resnet_kwargs,
        )


class ResnetUpsampleBlock3D(_Show1Block3D):
    """Up block of ResNet + temporal convolution layers fed with the skips, upsampling with a ResNet (``up=True``).

    Example:
        >>> block = ResnetUpsampleBlock3D(32, 64, 64, temb_channels=128, num_layers=2, resnet_groups=8)
        >>> skips = (torch.randn(8, 32, 4, 4), torch.randn(8, 64, 4, 4))
        >>> block(torch.randn(8, 64, 4, 4), skips, torch.randn(8, 128), num_frames=4).shape
        torch.Size([8, 64, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        **attention_kwargs: Any,
    ):
        resnet_in_channels = [
            (prev_output_channel if i == 0 else out_channels) + (in_channels if i == num_layers - 1 else out_channels)
            for i in range(num_layers)
        ]
        self._check_attention_kwargs(attention_kwargs)
        super().__init__(
            resnet_in_channels,
            out_channels,
            temb_channels,
            num_attentions=num_layers if self._with_attention else 0,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=skip_time_act,
            output_scale_factor=output_scale_factor,
            **attention_kwargs,
        )
        self.upsamplers = self._sampler(out_channels, up=True) if add_upsample else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Concatenate the last skip before each layer (last in, first out), then upsample."""
        if len(res_hidden_states_tuple) != len(self.resnets):
            raise ValueError(
                f"res_hidden_states_tuple has {len(res_hidden_states_tuple)} skips but this block has "
                f"{len(self.resnets)} layers; pass exactly one skip per layer."
            )
        for i in range(len(self.resnets)):
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1 - i]], dim=1)
            hidden_states = self._resnet_layer(i, hidden_states, temb, num_frames)
            if self.has_cross_attention:
                hidden_states = self._attention_layer(
                    i, hidden_states, encoder_hidden_states, attention_mask, num_frames, cross_attention_kwargs
                )
        if self.upsamplers is not None:
            hidden_states = self._run(self.upsamplers[0], hidden_states, temb)
        return hidden_states


class SimpleCrossAttnUpBlock3D(ResnetUpsampleBlock3D):
    """Up block whose layers add IF joint attention and temporal attention after the temporal convolution.

    Example:
        >>> block = SimpleCrossAttnUpBlock3D(32, 64, 64, temb_channels=128, resnet_groups=8, attention_head_dim=32,
        ...                                  cross_attention_dim=16)
        >>> text = torch.randn(8, 7, 16)
        >>> block(torch.randn(8, 64, 4, 4), (torch.randn(8, 32, 4, 4),), torch.randn(8, 128), text, num_frames=4).shape
        torch.Size([8, 64, 8, 8])
    """

    _with_attention = True

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 1280,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        **resnet_kwargs: Any,
    ):
        super().__init__(
            in_channels,
            prev_output_channel,
            out_channels,
            temb_channels,
            num_layers,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            only_cross_attention=only_cross_attention,
            cross_attention_norm=cross_attention_norm,
            **resnet_kwargs,
        )


class UNetMidBlock3DSimpleCrossAttn(_Show1Block3D):
    """Mid block: a ResNet layer, then per attention (joint attention, temporal attention, ResNet layer).

    The order is ``resnets[0]`` -> ``temp_convs[0]``, then for each ``j``: ``attentions[j]`` ->
    ``temp_attentions[j]`` -> ``resnets[j + 1]`` -> ``temp_convs[j + 1]``.

    Example:
        >>> block = UNetMidBlock3DSimpleCrossAttn(64, temb_channels=128, resnet_groups=8, attention_head_dim=32,
        ...                                       cross_attention_dim=16)
        >>> block(torch.randn(8, 64, 4, 4), torch.randn(8, 128), torch.randn(8, 7, 16), num_frames=4).shape
        torch.Size([8, 64, 4, 4])
    """

    _with_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_time_scale_shift: str = "default",
        skip_time_act: bool = False,
        output_scale_factor: float = 1.0,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 1280,
        only_cross_attention: bool = False,
        cross_attention_norm: str | None = None,
        frame_embedding_frames: int = 0,
    ):
        super().__init__(
            [in_channels] * (num_layers + 1),
            in_channels,
            temb_channels,
            num_attentions=num_layers,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=skip_time_act,
            output_scale_factor=output_scale_factor,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            only_cross_attention=only_cross_attention,
            cross_attention_norm=cross_attention_norm,
            frame_embedding_frames=frame_embedding_frames,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_frames: int = 1,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Run the first ResNet layer, then (attention, ResNet layer) pairs."""
        hidden_states = self._resnet_layer(0, hidden_states, temb, num_frames)
        for j in range(len(self.attentions)):
            hidden_states = self._attention_layer(
                j, hidden_states, encoder_hidden_states, attention_mask, num_frames, cross_attention_kwargs
            )
            hidden_states = self._resnet_layer(j + 1, hidden_states, temb, num_frames)
        return hidden_states
