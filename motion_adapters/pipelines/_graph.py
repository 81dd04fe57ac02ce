"""Replay a pipeline's UNet calls from a CUDA graph.

The sampling loop calls the UNet with the same shapes at every step, and at Show-1's sizes the GPU finishes a
call's kernels sooner than Python launches them (an SR1 call: 93 ms of kernels in 137 ms,
`benchmarks/results/stage_profile_sr1_cl_h200.json`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["GraphedCall"]


class GraphedCall:
    """Call `fn(*tensors)` eagerly the first time, then capture it in a CUDA graph and replay it.

    One graph per set of input shapes, dtypes and devices (None inputs allowed). Each replay copies the inputs into
    the graph's own buffers and returns a clone of its output, so a caller may keep results across steps. The
    graph bakes in every other tensor `fn` reads (the weights): use one `GraphedCall` per pipeline call and drop
    it afterwards (`close`), which also frees the graph's memory pool. Where capture fails, `strict=False` logs a
    warning and runs `fn` eagerly from then on; `strict=True` raises.

    Example:
        >>> call = GraphedCall(lambda x, t: unet(x, t, text, return_dict=False)[0])  # doctest: +SKIP
        >>> out = call(sample, t)  # eager, the first time; captured and replayed after  # doctest: +SKIP
    """

    def __init__(self, fn: Callable[..., torch.Tensor], strict: bool = False):
        self.fn = fn
        self.strict = strict
        self.eager = False
        self.replays = 0
        self._seen: set = set()
        self._graphs: dict = {}

    def __call__(self, *tensors: torch.Tensor | None) -> torch.Tensor:
        if self.eager:
            return self.fn(*tensors)
        key = tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
        if key not in self._graphs:
            if key not in self._seen:  # the first call runs eagerly: lazy initialisation, cuDNN's choices, Triton
                self._seen.add(key)
                return self.fn(*tensors)
            try:
                self._graphs[key] = self._capture(tensors)
            except Exception as error:
                if self.strict:
                    raise
                logger.warning(f"CUDA graph capture of the UNet call failed, sampling eagerly: {error}")
                self.eager = True
                torch.cuda.synchronize()
                return self.fn(*tensors)
        graph, static, output = self._graphs[key]
        for buffer, t in zip(static, tensors):
            if buffer is not None:
                buffer.copy_(t)
        graph.replay()
        self.replays += 1
        return output.clone()

    def _capture(self, tensors):
        static = [None if t is None else t.clone() for t in tensors]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*static)
        return graph, static, output

    def close(self) -> None:
        """Drop the graphs and their buffers (their memory goes back to the allocator)."""
        self._graphs.clear()
        self._seen.clear()
