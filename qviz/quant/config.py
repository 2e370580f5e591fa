"""Quantization configs and per-layer plans; frozen, validated, hashable (they key caches)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qviz.quant.methods import METHODS

_FIELDS = ("bits", "group_size", "symmetric", "method", "settings")


@dataclass(frozen=True, init=False)
class QuantConfig:
    """Weight-only quantization of one Linear.

    bits: 2..8. group_size: consecutive input weights of one output row sharing a scale/zero
    (None = one group per output row). symmetric: zero point fixed at 2**(bits-1).
    method: a name in ``qviz.quant.METHODS`` ("rtn": round to nearest, "gptq").
    settings: the method's own settings, as a mapping or (name, value) pairs, or as keywords:
    ``QuantConfig(4, 128, method="gptq", act_order=True, n_seq=32)``. They are validated by the
    method and stored as a sorted tuple of the non-default ones (hashable; default settings
    compare, hash and label exactly as a config without them). ``cfg.setting("damp")`` (or
    ``cfg.damp``) reads one, default included.
    """

    bits: int
    group_size: int | None
    symmetric: bool
    method: str
    settings: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        bits: int,
        group_size: int | None = 128,
        symmetric: bool = False,
        method: str = "rtn",
        settings: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
        **kwargs: Any,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got bits={bits!r}")
        gs = group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise ValueError(
                f"group_size must be a positive int or None (per output channel), got {gs!r}"
            )
        given = dict(settings.items() if isinstance(settings, Mapping) else settings)
        for key in kwargs.keys() & given.keys():
            raise ValueError(f"setting {key!r} is given twice (keyword and settings=)")
        given.update(kwargs)
        normalized = METHODS.get_method(method).normalize(given)
        for name, value in zip(_FIELDS, (bits, gs, symmetric, method, normalized), strict=True):
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, method: str, bits: int, group_size: int | None = 128, **kw: Any) -> QuantConfig:
        """``QuantConfig.of("gptq", 4, 128, act_order=True)``: method first, then its settings."""
        return cls(bits, group_size, method=method, **kw)

    def setting(self, key: str) -> Any:
        """The value of one of the method's settings (the default when not given)."""
        values = METHODS[self.method].resolve(self.settings)
        if key not in values:
            from qviz.quant.methods import _unknown_setting

            raise KeyError(_unknown_setting(key, self.method))
        return values[key]

    def __getattr__(self, key: str) -> Any:  # cfg.act_order: a setting, read as an attribute
        if key.startswith("_") or key in _FIELDS:
            raise AttributeError(key)
        try:
            return self.setting(key)
        except KeyError as err:
            raise AttributeError(err.args[0]) from None

    @classmethod
    def from_spec(cls, spec: str, bits: int, group_size: int | None = 128) -> QuantConfig:
        """The config of a method's CLI / dashboard spelling at ``bits``: ``"rtn"``, ``"hqq"``,
        ``"gptq"``, ``"gguf"`` (the k-quant of ``bits``) or ``"gguf:Q4_K"`` (the type fixes
        the bits and blocks: ``bits`` and ``group_size`` are not used). Errors name the bad
        value and the choices (``qviz.quant.methods.parse_method``)."""
        from qviz.quant.methods import parse_method

        name, settings = parse_method(spec)
        return METHODS[name].spec_config(bits, group_size, settings)

    @classmethod
    def gguf(cls, qtype: str, imatrix: bool = False) -> QuantConfig:
        """``QuantConfig.gguf("Q4_K")``: llama.cpp's GGUF type at its nominal bits;
        ``imatrix=True`` weights the encoder by an importance matrix of the calibration text."""
        from qviz.quant.gguf import gguf_config

        return gguf_config(qtype, imatrix=imatrix)

    @property
    def label(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        suffix = METHODS[self.method].label_suffix(self.settings) if self.settings else ""
        return f"{self.method}{self.bits}-{g}{'-sym' if self.symmetric else ''}{suffix}"


@dataclass(frozen=True)
class QuantPlan:
    """A default config (None = full precision) plus per-decoder-layer overrides.

    ``overrides`` is a sorted tuple of (layer index, config or None). ``embeddings=True`` also
    quantizes the token embedding and unembedding matrices with the default config.
    """

    default: QuantConfig | None = None
    overrides: tuple[tuple[int, QuantConfig | None], ...] = field(default=())
    embeddings: bool = False

    def __post_init__(self) -> None:
        seen = set()
        for item in self.overrides:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"overrides must be (layer, config) pairs, got {item!r}")
            layer, cfg = item
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"override layer must be an int >= 0, got {layer!r}")
            if cfg is not None and not isinstance(cfg, QuantConfig):
                raise TypeError(f"override for layer {layer} must be a QuantConfig or None")
            if layer in seen:
                raise ValueError(f"layer {layer} is overridden twice")
            seen.add(layer)
        object.__setattr__(self, "overrides", tuple(sorted(self.overrides, key=lambda x: x[0])))
        if self.default is not None and not isinstance(self.default, QuantConfig):
            raise TypeError(f"default must be a QuantConfig or None, got {self.default!r}")
        if self.embeddings and self.default is None:
            raise ValueError("embeddings=True needs a default config to quantize them with")

    # constructors -----------------------------------------------------------------------
    @classmethod
    def none(cls) -> QuantPlan:
        """Full precision: nothing quantized."""
        return cls()

    @classmethod
    def uniform(cls, cfg: QuantConfig) -> QuantPlan:
        """Every decoder Linear with ``cfg``."""
        return cls(default=cfg)

    @classmethod
    def protect_first(cls, cfg: QuantConfig, n: int = 2, bits: int = 8) -> QuantPlan:
        """Source protection: layers 0..n-1 at ``bits``, the rest with ``cfg``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got n={n}")
        return cls(default=cfg, overrides=tuple((i, replace(cfg, bits=bits)) for i in range(n)))

    @classmethod
    def only_layers(cls, cfg: QuantConfig, layers: Iterable[int]) -> QuantPlan:
        """Only ``layers`` quantized with ``cfg``; every other layer full precision."""
        return cls(default=None, overrides=tuple((int(i), cfg) for i in sorted(set(layers))))

    # queries --------------------------------------------------------------------------------
    def config_for(self, layer: int) -> QuantConfig | None:
        """The config of decoder layer ``layer`` (None = full precision)."""
        for i, cfg in self.overrides:
            if i == layer:
                return cfg
        return self.default

    def check_layers(self, n_layers: int) -> None:
        """Raise if an override names a layer the model does not have."""
        bad = [i for i, _ in self.overrides if i >= n_layers]
        if bad:
            raise ValueError(
                f"plan overrides layers {bad}, but the model has {n_layers} decoder "
                f"layers (0..{n_layers - 1})"
            )

    @property
    def is_full_precision(self) -> bool:
        return self.default is None and all(c is None for _, c in self.overrides)

    @property
    def label(self) -> str:
        if self.is_full_precision:
            return "fp"
        parts = [self.default.label if self.default else "fp"]
        parts += [f"L{i}:{c.label if c else 'fp'}" for i, c in self.overrides]
        return " ".join(parts) + (" +emb" if self.embeddings else "")
