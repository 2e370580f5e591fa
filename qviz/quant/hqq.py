"""HQQ (Badri & Shaji 2023, Half-Quadratic Quantization) through the ``hqq`` package.

Each weight is quantized by the library itself (``Quantizer.quantize(W, nbits, group_size,
axis=1, optimize=True, compute_dtype=float32, bitpack=False)``, then ``dequantize``): groups of
``group_size`` consecutive inputs of one output row, asymmetric, the scale and zero found by the
half-quadratic solver (no calibration data). The solver takes seconds per matrix on a CPU, so
``HQQ`` runs off the engine's lock like a calibrated method, reports progress per decoder layer,
stops at the next layer when cancelled, and keeps its results in the verified disk cache of
``calibrated.py`` (a second selection, also in a new process, is a load).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from qviz.cancel import check_cancel
from qviz.quant.calibrated import load_cache, model_fingerprint, save_cache
from qviz.quant.config import QuantConfig
from qviz.quant.methods import Method, Request, apply

BITS = (2, 3, 4, 5, 6, 8)  # of 2..8, what hqq's Quantizer.SUPPORTED_BITS holds
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)  # offered in errors (any divisor works)


def _hqq():
    """The ``hqq`` package's Quantizer, or an ImportError that says how to install it."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as err:
        raise ImportError(
            "method='hqq' needs the hqq package (pip install hqq; qviz pins hqq==0.2.8.post1)"
        ) from err
    return Quantizer


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """w [out, in] -> HQQ-dequantized [out, in] (w's dtype and device; ``w`` untouched).

    group_size None: one group per output row."""
    quantizer = _hqq()
    g = w.shape[1] if group_size is None else group_size
    with torch.inference_mode():
        wq, meta = quantizer.quantize(
            w.detach().float(),
            nbits=bits,
            group_size=g,
            axis=1,
            optimize=True,
            compute_dtype=torch.float32,
            bitpack=False,
            device=str(w.device),
        )
        meta["compute_dtype"] = torch.float32
        out = quantizer.dequantize(wq, meta)
    return out.to(device=w.device, dtype=w.dtype).clone()


class HQQ(Method):
    """HQQ via the ``hqq`` package: ``QuantConfig(4, 64, method="hqq")``; no settings.

    The group size must divide a Linear's input width (None: one group per row); scale and zero
    are stored per group (16-bit each, as HQQ keeps them in the compute dtype)."""

    name = "hqq"
    calibrated = True  # no calibration data, but slow: runs off the lock, with progress

    def group_size_ok(self, group_size: int | None, in_features: int) -> bool:
        return group_size is None or in_features % group_size == 0

    def check_group_size(self, cfg: QuantConfig, in_features: int, name: str) -> None:
        g = cfg.group_size
        if self.group_size_ok(g, in_features):
            return
        fits = [s for s in GROUP_SIZES if in_features % s == 0] + [None]
        raise ValueError(
            f"group_size={g} cannot be used by method='hqq' on {name} (in_features="
            f"{in_features}): HQQ's groups must divide the row; choices there: {fits}"
        )

    def check_plan(self, cfgs: list[QuantConfig]) -> None:
        _hqq()
        for cfg in cfgs:
            if cfg.bits not in BITS:
                raise ValueError(f"method='hqq' cannot use bits={cfg.bits}; choices: {BITS}")
            if cfg.symmetric:
                raise ValueError("method='hqq' is asymmetric only: use symmetric=False")

    def storage(self, cfg: QuantConfig, in_features: int) -> tuple[str, float]:
        """(a format label, bits per weight: codes + 16-bit scale and zero per group)."""
        g = in_features if cfg.group_size is None else cfg.group_size
        return cfg.label, cfg.bits + 32 / g

    def quantize_weight(self, w: torch.Tensor, cfg: QuantConfig, name: str) -> torch.Tensor:
        """w [out, in] -> dequantized [out, in], exactly the library's result."""
        return hqq_quantize(w, cfg.bits, cfg.group_size)

    def materialize(self, req: Request) -> dict[str, torch.Tensor]:
        """Every item through :func:`hqq_quantize`, per decoder layer (embeddings last), with
        progress, cancellation and the disk cache (a cancelled run writes nothing)."""
        self.check_plan([c for _, c, _ in req.items])
        key = cache_key(req.model, req.items)
        path = cache_path(key)
        loaded = load_cache(path, key)
        if loaded is not None:
            return {
                t.name: loaded[t.name].to(device=w.device, dtype=w.dtype) for t, _, w in req.items
            }
        from tqdm.auto import tqdm

        layers: dict[int, list] = {}
        for item in req.items:
            layers.setdefault(item[0].layer, []).append(item)
        order = sorted(layers, key=lambda i: (i < 0, i))
        total, out = len(order), {}
        if req.on_progress is not None:
            req.on_progress(0, total)
        for k, i in enumerate(tqdm(order, desc="HQQ", disable=not req.progress)):
            where = "embeddings" if i < 0 else f"decoder layer {i}"
            check_cancel(req.cancel, f"before {where} ({k} of {total} done)")
            for t, cfg, w in layers[i]:
                out[t.name] = apply(self, w, t.layout, cfg, t.name)
            if req.on_progress is not None:
                req.on_progress(k + 1, total)
        try:
            save_cache(path, key, out)
        except OSError as err:
            warnings.warn(f"could not write HQQ cache {path}: {err}", stacklevel=2)
        return out


def cache_key(model, items) -> str:
    """Model fingerprint + hqq version + every (name, shape, bits, group size) quantized."""
    import hqq

    spec = sorted((t.name, list(w.shape), c.bits, c.group_size) for t, c, w in items)
    raw = json.dumps([model_fingerprint(model), getattr(hqq, "__version__", "?"), spec])
    return hashlib.sha256(raw.encode()).hexdigest()


def cache_path(key: str) -> Path:
    from qviz.models.load import cache_dir

    return cache_dir() / "hqq" / f"{key}.safetensors"
