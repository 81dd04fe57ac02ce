"""The frozen layers a training step runs before its first trainable one, run for the next step during this one.

VMC trains only the temporal attention's projections, so what the UNet computes before the first of them (in
show-1-base: the time embedding, `conv_in`, the whole first down block at 40 x 64 and the start of the second)
depends on nothing but the step's timestep and noise. `FrozenPrefix` finds those layers on one traced forward pass:
the largest modules that finish before any module's output requires a gradient, are called once a pass, return
tensors, and whose outputs no operation keeps for the backward pass. It can then run them alone for a given input
("recording": the forward pass stops after the last of them, their outputs copied into buffers of its own), and
have a forward pass read those buffers instead of computing them ("replaying": each module's `forward` returns
its buffers). `StepRunner` records the next step's prefix on a side stream while the current step's backward pass
and optimizer run, inside the same CUDA graph, so the prefix's kernels fill the GPU where the backward pass's small
ones leave it idle.

Nothing the backward pass reads is ever overwritten early: a module whose output (or any view of its storage) an
operation saves for the backward pass is never a prefix module, and recording starts only after the forward pass
that replayed the buffers has finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_unflatten


class _Stop(Exception):
    """Raised by the last prefix module's hook to end a recording forward pass."""


@dataclass
class PrefixModule:
    """A module of the prefix: its name, its output's structure, and where each tensor of it is kept.

    `leaves` holds, for each leaf of the flattened output, an index into `FrozenPrefix.buffers` or ("const", value)
    for a leaf that is not a tensor (None, a number).
    """

    name: str
    module: nn.Module
    spec: object
    leaves: list = field(default_factory=list)


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its memory without gaps or overlaps, in any order of its dimensions."""
    if t.numel() <= 1:
        return True
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


class FrozenPrefix:
    """The frozen prefix of `model`'s forward pass, found by `tracing`, run by `record`, read back by `replaying`.

    Args:
        model: the module whose forward pass is traced (the UNet); its submodules are the candidates.

    Example:
        >>> prefix = FrozenPrefix(unet)  # doctest: +SKIP
        >>> with prefix.tracing():  # one ordinary training forward pass  # doctest: +SKIP
        ...     unet(noisy, t, encoder_hidden_states=text).sample.sum().backward()
        >>> prefix.record(lambda: unet(next_noisy, next_t, encoder_hidden_states=text))  # doctest: +SKIP
        >>> with prefix.replaying():  # reads what `record` computed  # doctest: +SKIP
        ...     out = unet(next_noisy, next_t, encoder_hidden_states=text)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules: list[PrefixModule] = []
        self.buffers: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        """Bytes the prefix's output buffers take."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    @contextmanager
    def tracing(self) -> Iterator[None]:
        """Watch one forward pass (and what it saves for its backward pass); on exit, set the prefix from it.

        The pass must be an ordinary training forward pass, with gradients enabled, so that the first output that
        requires a gradient marks where the trainable layers begin.
        """
        names = {id(m): name for name, m in self.model.named_modules() if name}
        calls: dict[int, int] = {}
        done: list[tuple[str, nn.Module, object, list]] = []  # modules finished before the first trainable output
        storages: dict[StorageWeakRef, list[tuple[StorageWeakRef, str]]] = {}  # a storage -> who returned it
        saved: set[str] = set()
        trainable_seen = False

        def after(module: nn.Module, args, output) -> None:
            nonlocal trainable_seen
            calls[id(module)] = calls.get(id(module), 0) + 1
            if trainable_seen:
                return
            leaves, spec = tree_flatten(output)
            if any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
                trainable_seen = True
                return
            name = names[id(module)]
            done.append((name, module, spec, leaves))
            for x in leaves:
                if isinstance(x, torch.Tensor):
                    ref = StorageWeakRef(x.untyped_storage())
                    storages.setdefault(ref, []).append((ref, name))

        def pack(t: torch.Tensor) -> torch.Tensor:
            if not isinstance(t, torch.Tensor):
                return t
            # a freed storage's weak reference may equal a later one's (same address): only live ones count
            found = storages.get(StorageWeakRef(t.untyped_storage()), ())
            saved.update(name for ref, name in found if not ref.expired())
            return t

        handles = [m.register_forward_hook(after) for m in self.model.modules() if id(m) in names]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()
        self._choose(done, calls, saved)

    def _choose(self, done: list, calls: dict[int, int], saved: set[str]) -> None:
        """Keep the largest eligible modules of those that finished before the first trainable output."""
        eligible = []
        for name, module, spec, leaves in done:
            tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
            if (calls.get(id(module)) != 1 or name in saved or not tensors
                    or any(p.requires_grad for p in module.parameters())
                    or not all(isinstance(x, torch.Tensor) and _dense(x) or isinstance(x, (type(None), bool, int,
                                                                                          float, str))
                               for x in leaves)):  # fmt: skip
                continue
            eligible.append((name, module, spec, leaves))
        names = [e[0] for e in eligible]
        chosen = [e for e in eligible if not any(e[0].startswith(other + ".") for other in names)]
        self.modules, self.buffers = [], []
        for name, module, spec, leaves in chosen:
            entry = PrefixModule(name, module, spec)
            seen: dict[int, int] = {}  # the same tensor twice in one output (a block's output and last skip) -> one
            for x in leaves:
                if not isinstance(x, torch.Tensor):
                    entry.leaves.append(("const", x))
                    continue
                if id(x) not in seen:
                    seen[id(x)] = len(self.buffers)
                    self.buffers.append(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device))
                entry.leaves.append(seen[id(x)])
            self.modules.append(entry)

    def record(self, forward: Callable[[], object]) -> None:
        """Run `forward` until the prefix's last module has finished, its modules' outputs copied into the buffers.

        Modules of the prefix that this pass does not call (a result a run computes once, say) are dropped from it
        for good, and the pass then runs to its end; later passes stop at the new last module.

        Raises:
            RuntimeError: a prefix module returned a tensor of another shape, dtype or layout than when traced.
        """
        if not self.modules:
            return
        last = self.modules[-1].module
        entries = {id(e.module): e for e in self.modules}
        called: set[int] = set()

        def after(module: nn.Module, args, output) -> None:
            entry = entries[id(module)]
            leaves, _ = tree_flatten(output)
            if len(leaves) != len(entry.leaves):
                raise RuntimeError(f"frozen prefix module {entry.name!r} returned {len(leaves)} values, not "
                                   f"{len(entry.leaves)} as when it was traced.")  # fmt: skip
            for x, slot in zip(leaves, entry.leaves):
                if isinstance(slot, tuple):
                    continue
                buffer = self.buffers[slot]
                if (x.shape, x.stride(), x.dtype) != (buffer.shape, buffer.stride(), buffer.dtype):
                    raise RuntimeError(
                        f"frozen prefix module {entry.name!r} returned {tuple(x.shape)} {x.dtype} with strides "
                        f"{x.stride()}, traced as {tuple(buffer.shape)} {buffer.dtype} with {buffer.stride()}."
                    )
                if x.data_ptr() != buffer.data_ptr():
                    buffer.copy_(x)
            called.add(id(module))
            if module is last:
                raise _Stop

        handles = [e.module.register_forward_hook(after) for e in self.modules]
        try:
            forward()
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        kept = [e for e in self.modules if id(e.module) in called]
        if len(kept) < len(self.modules):  # free the dropped modules' buffers, renumbering the others'
            used = sorted({slot for e in kept for slot in e.leaves if not isinstance(slot, tuple)})
            renumbered = {old: new for new, old in enumerate(used)}
            for e in kept:
                e.leaves = [slot if isinstance(slot, tuple) else renumbered[slot] for slot in e.leaves]
            self.buffers = [self.buffers[i] for i in used]
        self.modules = kept

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Within the block, each prefix module returns its buffers (what `record` last wrote) instead of running."""
        replaced = []
        for entry in self.modules:
            previous = vars(entry.module).get("forward")
            entry.module.forward = self._replay(entry)
            replaced.append((entry.module, previous))
        try:
            yield
        finally:
            for module, previous in replaced:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    def _replay(self, entry: PrefixModule) -> Callable[..., object]:
        def forward(*args, **kwargs):
            values = [slot[1] if isinstance(slot, tuple) else self.buffers[slot] for slot in entry.leaves]
            return tree_unflatten(values, entry.spec)

        return forward


__all__ = ["FrozenPrefix", "PrefixModule"]
