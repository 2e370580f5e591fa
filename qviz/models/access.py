"""How a module's hidden states go in and come out: the one accessor every hook uses.

A decoder layer or sub-module receives its hidden states as the first positional argument or
as the ``hidden_states`` keyword, and returns them alone or first in a tuple (nnsight's Envoy
exposes the same ``input``/``output`` view). This lives on the models floor, below quant and
probes, so GPTQ's calibration capture (quant) and every probe hook share it; ``qviz.probes.hooks``
re-exports it with the hook context manager.
"""

from __future__ import annotations

from typing import Any

import torch


def hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module was called with: ``args[0]`` or ``kwargs["hidden_states"]``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError(
        f"no hidden states in the call: no positional argument and no 'hidden_states' keyword "
        f"(keywords: {sorted(kwargs)})"
    )


def with_hidden_in(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with the hidden states replaced by ``x`` (where they were found)."""
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def split_hidden_in(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, the other positional arguments, the other keywords)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def hidden_out(out: Any) -> torch.Tensor:
    """The hidden states a module returned: ``out`` or its first element (tuple or list)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def with_hidden_out(out: Any, x: torch.Tensor) -> Any:
    """``out`` with its hidden states replaced by ``x`` (the same container kind)."""
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    return x
