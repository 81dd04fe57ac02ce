"""Channels-last activations through a Show-1 UNet while it samples, so cuDNN converts no layout.

cuDNN's fast convolution kernels on a Hopper GPU take NHWC data. A UNet whose activations are NCHW pays a layout
conversion before each convolution and another after it: in an H200 profile of an SR1 call, 26 ms of 141 ms
(`benchmarks/results/stage_profile_sr1_h200.json`). Storing the convolution weights channels-last alone moves the
conversions instead of removing them (PyTorch's CUDA group norm takes and returns NCHW). Here, for the run:

- every `Conv2d` / `Conv3d` weight (and `FrameConv`'s, the temporal kernels' swap) is stored channels-last
  (`torch.channels_last` / `torch.channels_last_3d`), so a convolution of a channels-last input returns a
  channels-last output (the Triton temporal convolution reads NCFHW, so `FrameConv` runs such input on cuDNN);
- every group norm that its module calls directly (the spatial attention's, the temporal transformers', the one
  before `conv_out`) runs on the channels-last kernels of `motion_adapters.fused_norm`, which keep the layout;
  the norm -> activation pairs keep it too when they run fused (`fused_norm_activations`);
- every diffusers `TransformerTemporalModel` writes its output channels-last, its copy back from the frames-last
  sequences and the residual addition in one pass.

The first convolution (`conv_in`) turns the input into channels-last and everything after it keeps the layout:
the spatial attention reads and writes the (B, H * W, C) sequences without the transposing copies of NCHW. Same
function, same parameters; outputs differ by bf16 rounding. `channels_last_sampling` is for sampling (with
gradients on, its group norms run as their modules do); `channels_last_training` keeps the layout through the
training step's forward and backward passes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from motion_adapters.fused_norm import channels_last_rows, fused_norm_available, group_norm_act_forward
from motion_adapters.lean_backward import (
    _forwards_replaced,
    _norm_in_compute_dtype,
    _unless_grad,
    frozen_add_layer_norm,
    frozen_layer_norm_applies,
    group_norm_act_keeping_input,
)
from motion_adapters.training_step import FrameConv


def _format_of(weight: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if weight.ndim == 4 else torch.channels_last_3d


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` on the channels-last kernels where `x` is channels-last and Triton runs on its device."""
    if channels_last_rows(x) is None or not fused_norm_available(x):
        return type(norm).forward(norm, x)
    weight = None if norm.weight is None else norm.weight.to(x.dtype)
    bias = None if norm.bias is None else norm.bias.to(x.dtype)
    return group_norm_act_forward(x, weight, bias, None, None, norm.num_groups, norm.eps, "none")[0]


def _group_norm_training(norm: nn.GroupNorm, half_norms: bool, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` in training: a frozen norm of a channels-last `x` on the channels-last kernels.

    It keeps only `x` (as `frozen_activations="recompute"` keeps the pairs' inputs) and runs in the dtype that
    `norm_dtype` asks for.
    """
    if not torch.is_grad_enabled():
        return _group_norm(norm, x)
    frozen = not any(p.requires_grad for p in norm.parameters())
    if frozen and channels_last_rows(x) is not None and fused_norm_available(x):
        return group_norm_act_keeping_input(norm, x, "none", not half_norms, fused=True)
    return _norm_in_compute_dtype(norm, x) if half_norms else type(norm).forward(norm, x)


def _plain_block(block: nn.Module) -> bool:
    """Whether `block` is a `BasicTransformerBlock` that `_temporal_block_rows` runs: every step per token but one.

    Layer norms, self-attention over frames on `FrameAttnProcessor` (the only step across tokens) and a
    feed-forward, with nothing else configured.
    """
    from diffusers.models.attention import BasicTransformerBlock

    from motion_adapters.frame_attention import FrameAttnProcessor

    attentions = [a for a in (block.attn1, block.attn2) if a is not None]
    return (type(block) is BasicTransformerBlock and block.norm_type == "layer_norm" and block.pos_embed is None
            and not block.only_cross_attention and block._chunk_size is None and "forward" not in vars(block)
            and all(type(a.processor) is FrameAttnProcessor and not a.is_cross_attention and a.spatial_norm is None
                    and a.group_norm is None and getattr(a, "norm_q", None) is None for a in attentions))  # fmt: skip


def _frame_self_attention_rows(attn: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """`attn` over the frames of (frames * pixels, C) token rows in frames-first order, output in the same order."""
    from motion_adapters.frame_attention import (
        STACKED_WEIGHT_ATTR,
        WEIGHT_GRAD_ATTR,
        WEIGHTS_READY_ATTR,
        attend,
        attention_output,
        projected_frame_attention,
        projected_frame_attention_supported,
    )

    projections = (attn.to_q, attn.to_k, attn.to_v)
    if FUSED_QKV and all(type(p) is nn.Linear and p.bias is None for p in projections) and \
            projected_frame_attention_supported(x, attn.to_q.out_features, frames, attn.heads) is None:  # fmt: skip
        out = projected_frame_attention(x, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, frames, attn.heads,
                                        weight_grad=getattr(attn, WEIGHT_GRAD_ATTR, None),
                                        ready=getattr(attn, WEIGHTS_READY_ATTR, None),
                                        stacked=getattr(attn, STACKED_WEIGHT_ATTR, None))  # fmt: skip
        return attention_output(attn, out, x)
    q, k, v = (project(x).unflatten(0, (frames, -1)).transpose(0, 1) for project in projections)
    return attention_output(attn, attend(attn, q, k, v).transpose(0, 1).flatten(0, 1), x)


def _temporal_block_rows(block: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """Diffusers' `BasicTransformerBlock` forward (layer norms, self-attention, feed-forward) on token rows.

    In training, where its norms are frozen, each residual addition and the norm after it run as one pass
    (`frozen_add_layer_norm`).
    """
    attentions = [a for a in (block.attn1, block.attn2) if a is not None]
    norms = [block.norm1, *([block.norm2] if block.attn2 is not None else []), block.norm3]
    if all(frozen_layer_norm_applies(norm, x) for norm in norms):
        h = frozen_add_layer_norm(norms[0], None, x)
        for attn, norm in zip(attentions, norms[1:]):
            x, h = frozen_add_layer_norm(norm, _frame_self_attention_rows(attn, h, frames), x)
        return block.ff(h) + x
    x = _frame_self_attention_rows(block.attn1, block.norm1(x), frames) + x
    if block.attn2 is not None:
        x = _frame_self_attention_rows(block.attn2, block.norm2(x), frames) + x
    return block.ff(block.norm3(x)) + x


def _temporal_transformer_rows(model: nn.Module, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """The rest of a batch-1 `TransformerTemporalModel` on its tokens in memory order (frames, pixels).

    The norms, projections and feed-forwards are per token and the frame attention reads any sequence strides, so
    the (frames x pixels, C) rows of the channels-last memory go through as they are: no copy into frames-last
    sequences and back, and gradients arrive in the layout of the activations they belong to. `normed` is the
    group norm's (1, C, F, H, W) output, channels-last-3d.
    """
    frames, channels, height, width = residual.shape
    rows = model.proj_in(normed.permute(0, 2, 3, 4, 1).reshape(-1, channels))  # a view: memory order
    for block in model.transformer_blocks:
        rows = _temporal_block_rows(block, rows, frames)
    rows = model.proj_out(rows).view(frames, height, width, channels).permute(0, 3, 1, 2)  # channels-last
    return residual + rows


def _temporal_transformer(model: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states=None, timestep=None,
                          class_labels=None, num_frames: int = 1, cross_attention_kwargs=None,
                          return_dict: bool = True):  # fmt: skip
    """Diffusers' `TransformerTemporalModel` forward, writing its output channels-last with the residual added.

    At batch 1 (training) with plain blocks, and `TOKEN_ROWS` on, the tokens stay in memory order
    (`_temporal_transformer_rows`).
    """
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

    batch_frames, channels, height, width = hidden_states.shape
    batch = batch_frames // num_frames
    residual = hidden_states
    hidden_states = hidden_states.reshape(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
    hidden_states = model.norm(hidden_states)
    if TOKEN_ROWS and batch == 1 and encoder_hidden_states is None and not cross_attention_kwargs and \
            residual.is_contiguous(memory_format=torch.channels_last) and \
            hidden_states.is_contiguous(memory_format=torch.channels_last_3d) and \
            all(_plain_block(block) for block in model.transformer_blocks):  # fmt: skip
        output = _temporal_transformer_rows(model, residual, hidden_states)
        return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)
    hidden_states = hidden_states.permute(0, 3, 4, 2, 1).reshape(batch * height * width, num_frames, channels)
    hidden_states = model.proj_in(hidden_states)
    for block in model.transformer_blocks:
        hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                              cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)  # fmt: skip
    hidden_states = model.proj_out(hidden_states).reshape(batch, height, width, num_frames, channels)
    # the residual first: the addition's output takes its (channels-last) layout, so the copy back from the
    # frames-last sequences and the addition are one pass, with or without autograd (at batch 1 a reshape of the
    # sequences would be a view, and the sum would keep their frames-interleaved layout)
    hidden_states = hidden_states.permute(0, 3, 4, 1, 2)  # (B, F, C, H, W) view
    output = (residual.view(hidden_states.shape) + hidden_states).view(batch_frames, channels, height, width)
    if not return_dict:
        return (output,)
    return TransformerTemporalModelOutput(sample=output)


#: Whether a batch-1 temporal transformer runs on its tokens in memory order (`_temporal_transformer_rows`): training
#: steps 1.03 times faster on an H200 (benchmarks/results/training_token_rows_h200.json; `full_frames_last_tokens`
#: switches it off there).
TOKEN_ROWS = True
#: Whether the temporal self-attention of token rows projects q, k and v in one GEMM each way with the attention
#: kernels in one function (`frame_attention.projected_frame_attention`), where its projections are bias-free
#: `nn.Linear` layers (full fine-tuning and sampling; LoRA-wrapped projections run as before): training steps 1.04
#: times faster on an H200 (benchmarks/results/training_qkv_final_h200.json; `full_separate_qkv` switches it off).
FUSED_QKV = True


@contextmanager
def _channels_last(unet: nn.Module, norm_forward, frozen_convs_only: bool) -> Iterator[int]:
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    convs = [
        m for m in unet.modules()
        if isinstance(m, (nn.Conv2d, nn.Conv3d, FrameConv)) and m.weight.ndim in (4, 5)
        and not (frozen_convs_only and m.weight.requires_grad)
    ]  # fmt: skip
    chosen = {}
    for m in unet.modules():
        if hasattr(m, "_hf_hook"):
            continue
        if type(m) is nn.GroupNorm:
            chosen[m] = functools.partial(norm_forward, m)
        elif type(m) is TransformerTemporalModel and type(m).forward is TransformerTemporalModel.forward:
            chosen[m] = functools.partial(_temporal_transformer, m)
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=_format_of(conv.weight))
    try:
        with _forwards_replaced(list(chosen), chosen.__getitem__) as count:
            yield count + len(convs)
    finally:
        for conv in convs:
            conv.weight.data = conv.weight.data.contiguous()


@contextmanager
def channels_last_sampling(unet: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Keep `unet`'s activations channels-last while it samples (see the module), then restore it.

    With gradients on, the group norms run as their modules do (PyTorch's, which convert the layout back; train
    with `channels_last_training`). The convolution weights go back to contiguous storage on exit (safetensors
    saves contiguous tensors). Yields the number of modules changed (weights stored
    channels-last count too).

    Example:
        >>> with torch.no_grad(), fused_norm_activations(unet), channels_last_sampling(unet):  # doctest: +SKIP
        ...     sample = unet(x, t, text).sample
    """
    if not enabled:
        yield 0
        return
    with _channels_last(unet, lambda m, *a, **k: _unless_grad(m, functools.partial(_group_norm, m), *a, **k),
                        frozen_convs_only=False) as count:  # fmt: skip
        yield count


@contextmanager
def channels_last_training(unet: nn.Module, enabled: bool = True, half_norms: bool = False) -> Iterator[int]:
    """Keep `unet`'s activations channels-last while `train_motion` trains it (`memory_format="channels_last"`).

    As `channels_last_sampling`, with gradients: frozen convolution weights are stored channels-last (a weight
    that trains keeps its layout), the norms its modules call directly run on the channels-last kernels keeping
    only their input (in autocast's dtype when `half_norms`, as `norm_dtype="compute"` runs them), and the
    temporal transformers write their output channels-last. Enter it outside `norms_in_compute_dtype` (which
    leaves the norms changed here alone). Yields the number of modules changed.

    Example:
        >>> with channels_last_training(unet, True, half_norms=True):  # doctest: +SKIP
        ...     loss = step(unet)
    """
    if not enabled:
        yield 0
        return
    with _channels_last(unet, lambda m, x: _group_norm_training(m, half_norms, x), frozen_convs_only=True) as count:
        yield count


__all__ = ["channels_last_sampling", "channels_last_training"]
