"""Each training step's optimizer update deferred to the start of the next, layer by layer (`DeferredUpdates`).

`training_step.StepRunner` uses it where `training_step.OVERLAP_OPTIMIZER` is on: a captured step applies the
previous step's update on a side stream beside its own forward pass, each attention layer's forward pass waiting
for its own weights. This module holds what that needs besides the graph: the gradient buffers that outlive a
replay, the per-layer optimizers sharing the run's optimizer's state, the forward order, the state made before the
capture, and the stacked compute-dtype weights each update writes for the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention

from motion_adapters.frame_attention import (
    STACKED_WEIGHT_ATTR,
    WEIGHT_GRAD_ATTR,
    WEIGHTS_READY_ATTR,
    padded_head,
    write_stacked_weight,
)


def step_dividing_grads(optimizer: torch.optim.Optimizer, grad_scale: torch.Tensor | None) -> None:
    """`optimizer.step()`, a fused AdamW / Adam dividing the gradients by `grad_scale` as it reads them (None: not).

    Example:
        >>> step_dividing_grads(optimizer, torch.tensor(2.0))  # doctest: +SKIP
    """
    if grad_scale is not None:
        optimizer.grad_scale = grad_scale
    try:
        optimizer.step()
    finally:
        if grad_scale is not None:
            del optimizer.grad_scale


class DeferredUpdates:
    """Each step's optimizer update deferred to the start of the next, layer by layer (`OVERLAP_OPTIMIZER`).

    For each attention layer whose q, k and v weights are trained, a float32 buffer that its backward pass writes
    the stacked weight gradient into (`frame_attention.WEIGHT_GRAD_ATTR`: memory outside a CUDA graph's pool, so the
    next replay's forward pass cannot reuse it before the update has read it), an event that its forward pass waits
    for before reading the weights (`frame_attention.WEIGHTS_READY_ATTR`, set while a step is captured), and an
    optimizer of the run's optimizer's class and settings over those three weights that shares its state (so the
    run's optimizer, its checkpoints and a flush see every update). `find` builds one where every trainable
    parameter is such a weight, else returns None.

    Example:
        >>> deferred = DeferredUpdates.find(unet, params, optimizer)  # doctest: +SKIP
    """

    def __init__(self, layers: list[tuple[nn.Module, list[nn.Parameter]]], optimizer: torch.optim.Optimizer,
                 compute_dtype: torch.dtype | None = None, frames: int | None = None):  # fmt: skip
        self.optimizer = optimizer
        self.layers = layers
        self.buffers = {}
        self.stacked = {}  # each layer's weights stacked in the compute dtype, written after its update
        hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        self.optimizers = {}
        for attn, weights in layers:
            out, channels = weights[0].shape
            buffer = weights[0].new_empty((3 * out, channels))
            setattr(attn, WEIGHT_GRAD_ATTR, buffer)
            self.buffers[attn] = buffer
            if compute_dtype is not None and frames is not None:
                width = padded_head(frames, out // attn.heads)
                self.stacked[attn] = weights[0].new_zeros((3 * attn.heads * width, channels), dtype=compute_dtype)
            layer_optimizer = type(optimizer)([{**hyper, "params": weights}], lr=hyper["lr"])
            layer_optimizer.state = optimizer.state  # one state for both: updates by either are the run's
            self.optimizers[attn] = layer_optimizer
        self.events = {attn: torch.cuda.Event() for attn, _ in layers} if layers[0][1][0].is_cuda else {}

    @classmethod
    def find(cls, model: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
             compute_dtype: torch.dtype | None = None, frames: int | None = None):  # fmt: skip
        """`DeferredUpdates` for `params` if each is a q, k or v weight of `model`'s attention layers, else None.

        Each such layer's three weights must all be trained (float32, contiguous, one shape), under a one-group
        AdamW or Adam without amsgrad. With `compute_dtype` and `frames` (the clip's), each layer's update also
        writes its weights stacked in that dtype, as its forward pass reads them (`STACKED_WEIGHT_ATTR`).
        """
        ids = {id(p) for p in params}
        groups = optimizer.param_groups
        if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam) or len(groups) != 1 or groups[0]["amsgrad"]:
            return None
        layers, covered = [], set()
        for module in model.modules():
            if not isinstance(module, Attention):
                continue
            weights = [getattr(getattr(module, name, None), "weight", None) for name in ("to_q", "to_k", "to_v")]
            if not any(w is not None and id(w) in ids for w in weights):
                continue
            if not all(w is not None and id(w) in ids and w.dtype == torch.float32 and w.is_contiguous()
                       and w.shape == weights[0].shape for w in weights):  # fmt: skip
                return None
            layers.append((module, weights))
            covered |= {id(w) for w in weights}
        return cls(layers, optimizer, compute_dtype, frames) if layers and covered == ids else None

    def grads_in_buffers(self) -> bool:
        """Whether every trained weight's `.grad` is its row block of its layer's buffer.

        That is what the backward pass of `projected_frame_attention` leaves where autograd takes its gradient as
        it is.
        """
        for attn, weights in self.layers:
            buffer = self.buffers[attn]
            for i, w in enumerate(weights):
                grad = w.grad
                if grad is None or grad.data_ptr() != buffer[i * w.shape[0]].data_ptr() or grad.shape != w.shape:
                    return False
        return True

    @contextmanager
    def in_forward_order(self) -> Iterator[None]:
        """Inside the block, a backward pass; on exit, the layers put in the order the forward pass reaches them.

        That is the reverse of the order their gradients were accumulated in, so that each layer's update comes as
        early as its forward pass needs it.
        """
        seen: list[nn.Module] = []
        hooks = [w.register_post_accumulate_grad_hook(lambda _, attn=attn: seen.append(attn))
                 for attn, weights in self.layers for w in weights]  # fmt: skip
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        rank = {attn: i for i, attn in enumerate(dict.fromkeys(reversed(seen)))}
        self.layers.sort(key=lambda layer: rank.get(layer[0], len(rank)))

    def initialize_state(self) -> None:
        """Create AdamW's state (step, moments) for weights that have none yet, as its first step would.

        A CUDA graph must not create it: its captured zeroing would run again at every replay.
        """
        try:
            from torch.optim.optimizer import _get_scalar_dtype
        except ImportError:  # pragma: no cover - older or newer PyTorch
            def _get_scalar_dtype(is_fused=None):
                return torch.float32 if is_fused else torch.get_default_dtype()
        group = self.optimizer.param_groups[0]
        for _, weights in self.layers:
            for w in weights:
                state = self.optimizer.state[w]
                if state:
                    continue
                on_device = group["capturable"] or group["fused"]
                state["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]),
                                            device=w.device if on_device else "cpu")  # fmt: skip
                state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)

    def step_layers(self, grad_scale: torch.Tensor | None) -> None:
        """Each layer's update in turn, the gradients divided by `grad_scale`.

        After each, the layer's stacked compute-dtype weights written (where kept) and its event recorded (CUDA).
        """
        for attn, weights in self.layers:
            step_dividing_grads(self.optimizers[attn], grad_scale)
            if attn in self.stacked:
                write_stacked_weight(self.stacked[attn], tuple(weights), attn.heads)
            if attn in self.events:
                self.events[attn].record()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside the block, each layer's forward pass waits for its event and reads its weights as stacked there.

        The block is the forward pass right after `step_layers` (in one captured step). Only there: anywhere else
        (an eager step after a flush) the stacked copies may be an update behind.
        """
        for attn, event in self.events.items():
            setattr(attn, WEIGHTS_READY_ATTR, event)
        for attn, stacked in self.stacked.items():
            setattr(attn, STACKED_WEIGHT_ATTR, stacked)
        try:
            yield
        finally:
            for attn in self.events:
                delattr(attn, WEIGHTS_READY_ATTR)
            for attn in self.stacked:
                delattr(attn, STACKED_WEIGHT_ATTR)

    def close(self) -> None:
        """Take the buffers off the attention layers (the weights' `.grad` still point into them)."""
        for attn in self.buffers:
            if hasattr(attn, WEIGHT_GRAD_ATTR):
                delattr(attn, WEIGHT_GRAD_ATTR)


__all__ = ["DeferredUpdates", "step_dividing_grads"]
