"""Memory accounting: bytes and effective bits per weight of a plan, overhead included."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from torch import nn

from qviz.models.arch import get_adapter, weight_layout
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.methods import METHODS
from qviz.quant.primitives import group_size_for

FP16_BITS = 16
META_BITS = 16  # scale and zero are stored as 16-bit floats by deployed formats


def storage(cfg: QuantConfig | None, in_f: int) -> tuple[str, float | None]:
    """(format, bits per weight) of a Linear of ``in_f`` inputs under ``cfg``: the method's own
    ``storage(cfg, in_f)`` when it has one (GGUF: the type the row width really gets, e.g.
    ("Q5_0", 5.5); HQQ: codes + 16-bit scale and zero per group); else (cfg.label, None)."""
    if cfg is None:
        return "fp16", float(FP16_BITS)
    own = getattr(METHODS[cfg.method], "storage", None)
    return own(cfg, in_f) if own is not None else (cfg.label, None)


def weight_bits(cfg: QuantConfig | None, out_f: int, in_f: int) -> float:
    """Bits to store one [out_f, in_f] weight: codes plus 16-bit scale (and zero if asymmetric),
    or the method's own bits per weight (GGUF block formats, HQQ)."""
    if cfg is None:
        return out_f * in_f * FP16_BITS
    _, bpw = storage(cfg, in_f)
    if bpw is not None:
        return out_f * in_f * bpw
    g = group_size_for(cfg, in_f)
    groups = out_f * math.ceil(in_f / g)
    return out_f * in_f * cfg.bits + groups * META_BITS * (1 if cfg.symmetric else 2)


@dataclass
class Footprint:
    """Per-weight rows (layer, name, params, bits, format, bytes) plus totals against FP16.

    ``format``: what the Linear is really stored as (a GGUF type after fallback, a label)."""

    rows: list[dict]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    @property
    def params(self) -> int:
        return sum(r["params"] for r in self.rows)

    @property
    def bytes(self) -> float:
        return sum(r["bytes"] for r in self.rows)

    @property
    def fp16_bytes(self) -> float:
        return self.params * FP16_BITS / 8

    @property
    def effective_bits(self) -> float:
        """Average stored bits per weight, scales and zeros included."""
        return self.bytes * 8 / self.params

    def per_layer(self) -> pd.DataFrame:
        df = self.to_frame()
        return (
            df.groupby("layer", sort=True)[["params", "bytes", "fp16_bytes"]]
            .sum()
            .assign(effective_bits=lambda d: d.bytes * 8 / d.params)
        )

    def __repr__(self) -> str:
        return (
            f"Footprint({self.bytes / 2**20:.1f} MiB vs FP16 {self.fp16_bytes / 2**20:.1f} MiB, "
            f"{self.effective_bits:.3f} bits/weight)"
        )


def footprint(model: nn.Module, plan: QuantPlan, include_embeddings: bool = True) -> Footprint:
    """Storage of ``model``'s weight matrices under ``plan``.

    Decoder Linears follow the plan; embeddings/unembedding count as FP16 unless the plan
    quantizes them (tied matrices once). Norms and biases are left out (they stay 16-bit and are
    negligible). Layer -1 is the embedding/unembedding group.
    """
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    plan.check_layers(len(layers))
    rows = []

    def add(layer: int, name: str, shape: tuple[int, int], cfg: QuantConfig | None) -> None:
        out_f, in_f = shape
        bits = weight_bits(cfg, out_f, in_f)
        rows.append(
            {
                "layer": layer,
                "name": name,
                "params": out_f * in_f,
                "bits": cfg.bits if cfg else FP16_BITS,
                "format": storage(cfg, in_f)[0],
                "bytes": bits / 8,
                "fp16_bytes": out_f * in_f * FP16_BITS / 8,
            }
        )

    for i, layer in enumerate(layers):
        for rel in adapter.linears:
            mod = layer.get_submodule(rel)
            shape = tuple(mod.weight.shape)
            if weight_layout(mod) == "in_out":
                shape = shape[::-1]
            add(i, f"{adapter.layers}.{i}.{rel}", shape, plan.config_for(i))
    if include_embeddings:
        seen = set()
        for path in (adapter.embed, adapter.unembed):
            w = model.get_submodule(path).weight
            if id(w) not in seen:
                seen.add(id(w))
                add(-1, path, tuple(w.shape), plan.default if plan.embeddings else None)
    return Footprint(rows)
