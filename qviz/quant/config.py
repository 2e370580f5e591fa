"""Quantization configs and per-layer plans; frozen, validated, hashable (they key caches)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of one Linear.

    bits: 2..8. group_size: consecutive input weights of one output row sharing a scale/zero
    (None = one group per output row). symmetric: zero point fixed at 2**(bits-1).
    method: "rtn" (round to nearest) or "gptq" (damp, act_order are GPTQ's settings).
    """

    bits: int
    group_size: int | None = 128
    symmetric: bool = False
    method: str = "rtn"
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got bits={self.bits!r}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0):
            raise ValueError(
                f"group_size must be a positive int or None (per output channel), got {gs!r}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got method={self.method!r}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got damp={self.damp!r}")

    @property
    def label(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"{self.method}{self.bits}-{g}{'-sym' if self.symmetric else ''}"


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
