"""The one way to write a forward hook in qviz: the module I/O accessor and ``attached()``.

Every forward hook of the package is registered through :class:`Hooks` inside ``attached()``,
which removes them all when the block ends, also when the forward raises. Hooks read and write
hidden states only through the accessor (``hidden_in``, ``with_hidden_in``, ``hidden_out``,
``with_hidden_out``, from ``qviz.models.access`` so that quant, a lower floor, shares it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from qviz.models.access import (
    hidden_in,
    hidden_out,
    split_hidden_in,
    with_hidden_in,
    with_hidden_out,
)

__all__ = [
    "Hooks",
    "attached",
    "feed_inputs",
    "hidden_in",
    "hidden_out",
    "record_outputs",
    "scaled_output",
    "split_hidden_in",
    "with_hidden_in",
    "with_hidden_out",
]


class Hooks:
    """Registers forward hooks and remembers their handles for ``remove()``."""

    def __init__(self) -> None:
        self._handles: list = []

    def pre(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, kwargs)`` before ``module`` runs; may return (args, kwargs)."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        """``fn(module, args, out)`` (``fn(module, args, kwargs, out)`` with ``with_kwargs``)
        after ``module`` runs; may return a replacement output."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


@contextmanager
def attached() -> Iterator[Hooks]:
    """``with attached() as h: h.pre(...); h.post(...); model(...)``: no hook outlives the block."""
    h = Hooks()
    try:
        yield h
    finally:
        h.remove()


@contextmanager
def scaled_output(module: nn.Module, alpha: float) -> Iterator[None]:
    """``module``'s hidden-state output multiplied by ``alpha`` inside the block."""

    def hook(mod, args, out):
        return with_hidden_out(out, hidden_out(out) * alpha)

    with attached() as h:
        h.post(module, hook)
        yield


@contextmanager
def record_outputs(
    modules: Sequence[nn.Module], fn: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Iterator[list]:
    """Yields a list that holds, after a forward, ``fn(output hidden states)`` of each module
    (detached; ``fn`` defaults to the identity)."""
    store: list = [None] * len(modules)

    def keep(i):
        def hook(mod, args, out):
            x = hidden_out(out).detach()
            store[i] = fn(x) if fn is not None else x

        return hook

    with attached() as h:
        for i, m in enumerate(modules):
            h.post(m, keep(i))
        yield store


@contextmanager
def feed_inputs(
    modules: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    at: int | slice | tuple | None = None,
) -> Iterator[None]:
    """Each module's hidden-state input replaced by ``inputs[i]`` (cast to its dtype); with
    ``at``, an index into the hidden states [B, T, D] (``1``: batch row 1; ``(0, slice(s,
    e))``: positions s:e of row 0), only that part, ``inputs[i]`` holding just it."""

    def feed(i):
        def pre(mod, args, kwargs):
            x = hidden_in(args, kwargs)
            if at is None:
                return with_hidden_in(args, kwargs, inputs[i].to(x.dtype))
            x = x.clone()  # (the tensor is the previous module's output)
            x[at] = inputs[i].to(x.dtype)
            return with_hidden_in(args, kwargs, x)

        return pre

    with attached() as h:
        for i, m in enumerate(modules):
            h.pre(m, feed(i))
        yield
