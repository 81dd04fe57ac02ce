"""Results of frozen layers on unchanging inputs, computed once and kept for a run.

During training the prompt's embedding is the same tensor at every step and the layers that read only it (the
UNet's text projection and pooled-text embedding, each spatial attention's text keys and values) are frozen, so
their results are the same at every step. `kept` computes such a result once and returns it again while nothing it
depends on has changed: the same input tensors, unmodified (their version counters), the same autocast dtype, and
the modules' parameters unmodified, in place, and not trainable. A memo is a plain dict that a run owns and clears.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
import torch.nn as nn


def frozen_key(tensors: Sequence[torch.Tensor], modules: Sequence[nn.Module], extra: tuple = ()) -> tuple | None:
    """What a frozen result of `modules` on `tensors` depends on, or None where it must not be kept.

    None where an input or a parameter requires a gradient or an input is an inference tensor (no version counter).

    Example:
        >>> frozen_key([torch.zeros(2)], [torch.nn.Linear(2, 2).requires_grad_(False)]) is not None
        True
    """
    params = [t for m in modules for t in m.parameters()]
    if any(t.requires_grad or t.is_inference() for t in tensors) or any(t.requires_grad for t in params):
        return None
    device = tensors[0].device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (tuple((id(t), t._version, t.data_ptr(), t.dtype, tuple(t.shape)) for t in tensors), autocast,
            tuple((t._version, t.data_ptr()) for t in params), extra)  # fmt: skip


def kept(memo: dict | None, name: Hashable, tensors: Sequence[torch.Tensor], modules: Sequence[nn.Module],
         compute: Callable[[], object], extra: tuple = ()) -> object:  # fmt: skip
    """`compute()`, or its result kept in `memo[name]` while `frozen_key` of the same arguments is unchanged.

    The entry holds `tensors` too, so their ids are not reused by other tensors while it lives. With `memo` None,
    or a key of None, `compute()` runs every call.

    Example:
        >>> memo, proj = {}, torch.nn.Linear(2, 2).requires_grad_(False)
        >>> x = torch.ones(2)
        >>> kept(memo, "proj", [x], [proj], lambda: proj(x)) is kept(memo, "proj", [x], [proj], lambda: proj(x))
        True
    """
    key = None if memo is None else frozen_key(tensors, modules, extra)
    if key is None:
        return compute()
    entry = memo.get(name)
    if entry is not None and entry[0] == key:
        return entry[2]
    result = compute()
    memo[name] = (key, tuple(tensors), result)
    return result


__all__ = ["frozen_key", "kept"]
