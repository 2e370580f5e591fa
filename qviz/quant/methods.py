"""The quantization-method registry: ``METHODS`` maps a name to the method object that owns it.

As torchao's ``quantize_`` dispatches on the config's type, the engine dispatches on
``METHODS[cfg.method]``. A method says whether it needs calibration data, which settings it
takes (names, defaults, validation, how they show in a label), which group sizes it can use for
a Linear of ``in_features`` inputs, and how it materializes its share of a plan.

A new method is one file in ``qviz/quant/`` defining a :class:`Method` subclass, plus one line
in ``_BUILTIN`` below ("name": "module:Class"); built-in methods are imported on first use, so
``config.py`` can validate names without importing torch-heavy method modules. At run time
``METHODS.register(obj)`` / ``METHODS.unregister(name)`` add and remove one (tests, plugins).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qviz.cancel import Cancelled

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qviz.models.arch import Adapter
    from qviz.quant.config import QuantConfig, QuantPlan

# the one registration line per built-in method
_BUILTIN = {
    "rtn": "qviz.quant.rtn:RTN",
    "gptq": "qviz.quant.gptq:GPTQ",
    "hqq": "qviz.quant.hqq:HQQ",
    "gguf": "qviz.quant.gguf:GGUF",
}


@dataclass
class Request:
    """What a method gets to materialize its share of a plan.

    items: [(Target, QuantConfig, original weight)] of this method's targets (a weight of layout
    "in_out" is [in, out], else [out, in]). done: {name: dequantized weight} already materialized
    for the plan by the other (uncalibrated) methods, for a calibrated method to run the layers
    it does not own as the plan says. model: for a calibrated method, a private copy of the
    model holding the original weights (so it may run forwards without the engine's lock).
    """

    model: nn.Module
    adapter: Adapter
    plan: QuantPlan
    items: list
    done: dict[str, torch.Tensor] = field(default_factory=dict)
    tokenizer: Any = None
    cancel: threading.Event | None = None
    on_progress: Callable[[int, int], None] | None = None
    progress: bool = True  # a tqdm bar for slow methods


class Method:
    """Base class of a quantization method; subclasses set ``name`` and override what differs.

    ``defaults``: {setting: default}; a default of None means "resolved when used" (e.g. from an
    environment variable), see :meth:`resolve`.
    """

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False  # needs calibration data (slow; runs off the lock)
    defaults: ClassVar[dict[str, Any]] = {}
    cancelled: ClassVar[type[Cancelled]] = Cancelled  # what a cancelled run raises

    # settings ---------------------------------------------------------------------------------
    def check_setting(self, key: str, value: Any) -> Any:
        """Validate one setting's value; return it normalized (hashable). Override per method."""
        return value

    def normalize(self, settings: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """Sorted (name, value) pairs of the settings that differ from their defaults."""
        for key in settings:
            if key not in self.defaults:
                raise ValueError(_unknown_setting(key, self.name))
        out = []
        for key in sorted(settings):
            value = self.check_setting(key, settings[key])
            if value != self.defaults[key]:
                out.append((key, value))
        return tuple(out)

    def resolve(self, settings: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
        """Every setting of this method with its value (given, else default)."""
        return {**self.defaults, **dict(settings)}

    def label_suffix(self, settings: tuple[tuple[str, Any], ...]) -> str:
        """What non-default settings add to a config's label ("" for the defaults)."""
        return "".join(f"-{k}{v}" for k, v in settings)

    # group sizes ------------------------------------------------------------------------------
    def group_size_ok(self, group_size: int | None, in_features: int) -> bool:
        """Whether this method can quantize a Linear of ``in_features`` inputs with
        ``group_size`` (None: one group per output row). Default: it divides ``in_features`` or
        is a multiple of 32 (ragged last group, as deployed block formats and GPTQ allow)."""
        from qviz.quant.primitives import group_size_ok

        return group_size_ok(group_size, in_features)

    def check_group_size(self, cfg: QuantConfig, in_features: int, name: str) -> None:
        """Raise ValueError naming ``name``, the value and what would fit."""
        g = cfg.group_size
        if self.group_size_ok(g, in_features):
            return
        if type(self).group_size_ok is Method.group_size_ok:  # the default rule: its own hint
            from qviz.quant.primitives import group_size_error

            raise ValueError(group_size_error(g, in_features, name, self.name))
        fits = [d for d in range(1, in_features + 1) if self.group_size_ok(d, in_features)]
        fits += [None] if self.group_size_ok(None, in_features) else []
        raise ValueError(
            f"group_size={g} cannot be used by method={self.name!r} on {name} "
            f"(in_features={in_features}); sizes it can use there: {fits[-5:] or 'none'}"
        )

    def check_plan(self, cfgs: list[QuantConfig]) -> None:
        """Raise ValueError if this method's configs cannot run together in one plan."""

    # the CLI / dashboard spelling "name[:arg]" -----------------------------------------------
    def parse_spec(self, arg: str) -> dict[str, Any]:
        """The settings that ``arg`` of the spelling ``name:arg`` means (default: none taken)."""
        takers = [n for n in METHODS if type(METHODS[n]).parse_spec is not Method.parse_spec]
        raise ValueError(
            f"method {self.name!r} takes no ':' argument, got {self.name}:{arg}; "
            f"methods that take one: {', '.join(f'{n}:...' for n in takers) or 'none'}"
        )

    def spec_config(self, bits: int, group_size: int | None, settings: dict) -> QuantConfig:
        """The config of the spelling ``name[:arg]`` (its ``settings``) at ``bits``."""
        from qviz.quant.config import QuantConfig

        return QuantConfig(bits, group_size, method=self.name, **settings)

    # materialize ------------------------------------------------------------------------------
    def quantize_weight(self, w: torch.Tensor, cfg: QuantConfig, name: str) -> torch.Tensor:
        """w [out, in] -> dequantized [out, in] (new tensor; ``w`` untouched). Uncalibrated only."""
        raise NotImplementedError(
            f"method={self.name!r} needs calibration data: use QuantEngine.materialize, "
            "not quantize_weight"
        )

    def materialize(self, req: Request) -> dict[str, torch.Tensor]:
        """{name: dequantized weight} of every item of ``req`` (same layout as the original).

        Default: :meth:`quantize_weight` per weight. ``req.cancel`` / ``req.on_progress``
        matter to slow methods, which check cancellation at each step (``qviz.cancel``)."""
        return {t.name: apply(self, w, t.layout, c, t.name) for t, c, w in req.items}


def apply(method: Method, w: torch.Tensor, layout: str, cfg: QuantConfig, name: str):
    """``method.quantize_weight`` along the input dimension of ``w`` whatever its layout."""
    if layout == "in_out":
        return method.quantize_weight(w.t(), cfg, name).t().contiguous()
    return method.quantize_weight(w, cfg, name)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """The CLI / dashboard spelling of a method: ``"gguf:Q4_K"`` -> ``("gguf", {"type": "Q4_K"})``,
    ``"hqq"`` -> ``("hqq", {})``. A ValueError names the bad value and the choices (an unknown
    method, an unknown GGUF type, an argument given to a method that takes none)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"method must be one of {tuple(METHODS)} (gguf:TYPE), got {spec!r}")
    name, sep, arg = spec.strip().partition(":")
    method = METHODS.get_method(name.strip().lower())
    if not sep:
        return method.name, {}
    if not arg.strip():
        raise ValueError(f"nothing after ':' in method {spec!r}")
    return method.name, method.parse_spec(arg.strip())


def _unknown_setting(key: str, method: str) -> str:
    owners = []
    for name in METHODS:
        try:
            if key in METHODS[name].defaults:
                owners.append(name)
        except Exception:  # a broken plugin must not hide the real error
            continue
    known = sorted(METHODS[method].defaults) if method in METHODS else []
    if owners:
        return (
            f"{key} is a setting of method {' / '.join(repr(o) for o in owners)}, not of "
            f"method={method!r} (its settings: {known or 'none'})"
        )
    return f"unknown setting {key!r} for method={method!r} (its settings: {known or 'none'})"


class MethodRegistry(Mapping[str, Method]):
    """name -> Method; iterating yields the names (so ``list(METHODS)`` are the choices)."""

    def __init__(self, builtin: Mapping[str, str]) -> None:
        self._specs: dict[str, str | Method] = dict(builtin)
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Method:
        with self._lock:
            spec = self._specs[name]
            if isinstance(spec, str):
                module, cls = spec.split(":")
                spec = getattr(importlib.import_module(module), cls)()
                self._specs[name] = spec
            return spec

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self._specs)})"

    def get_method(self, name: str) -> Method:
        """``self[name]``, or a ValueError listing the registered names."""
        if name not in self._specs:
            raise ValueError(f"method must be one of {tuple(self)}, got method={name!r}")
        return self[name]

    def register(self, method: Method) -> Method:
        """Add ``method`` under ``method.name`` (an error if the name is taken)."""
        if not isinstance(method, Method) or not method.name:
            raise TypeError(f"expected a Method instance with a name, got {method!r}")
        with self._lock:
            if method.name in self._specs:
                raise ValueError(f"method {method.name!r} is already registered")
            self._specs[method.name] = method
        return method

    def unregister(self, name: str) -> None:
        """Remove ``name`` (built-in ones included: tests only)."""
        with self._lock:
            del self._specs[name]


METHODS = MethodRegistry(_BUILTIN)
