"""Pure quantization primitives: round-to-nearest per group, and its exact inverse.

A weight ``w`` of shape [out, in] is split into groups of ``group_size`` consecutive input
weights of one output row. Each group stores unsigned ``codes`` in [0, 2**bits - 1], a float32
``scale`` and a float32 ``zero`` (an offset in weight units), and dequantizes as
``w' = codes * scale + zero``.

- asymmetric (as GGUF Q4_1): scale = (max - min) / (2**bits - 1), zero = min;
- symmetric: zero point fixed at 2**(bits-1) codes, scale = max|w| / (2**(bits-1) - 1), so
  zero = -2**(bits-1) * scale.
A constant group gets scale 1 (asymmetric: every code 0, w' = min exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qviz.quant.config import QuantConfig

_CHUNK = 1 << 18  # elements per chunk of fake_quantize: stays in cache, bounds temporaries


@dataclass(frozen=True)
class QTensor:
    """codes: uint8 [out, in]; scale, zero: float32 [out, n_groups].

    Column j belongs to group j // group_size.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def group_size_ok(group_size: int | None, in_features: int) -> bool:
    """Whether ``group_size`` fits a Linear of ``in_features`` inputs: None (one group per output
    row), a divisor of ``in_features``, or a multiple of 32 (ragged last group)."""
    return group_size is None or in_features % group_size == 0 or group_size % 32 == 0


def group_size_error(group_size: int, in_features: int, name: str, method: str = "") -> str:
    """The message for a group size that fits neither rule, with what would fit."""
    divisors = [d for d in range(1, min(in_features, 256) + 1) if in_features % d == 0][-4:]
    of = f" for method={method!r}" if method else ""
    return (
        f"group_size={group_size} does not divide in_features={in_features} of {name} and is "
        f"not a multiple of 32{of}; use a divisor such as {divisors}, a multiple of 32, or "
        f"group_size=None (one group per output row)"
    )


def group_size_for(cfg: QuantConfig, in_features: int, name: str = "weight") -> int:
    """The effective group size of a layer with ``in_features`` inputs.

    It must divide ``in_features``, or be a multiple of 32 (as deployed block formats are), in
    which case the last group of each row is shorter, as GPTQ's ``g_idx = column // group_size``
    does (e.g. 128 on SmolLM2's 576-wide layers: 4 groups of 128 and one of 64). Otherwise a
    ValueError names the layer.
    """
    if not group_size_ok(cfg.group_size, in_features):
        raise ValueError(group_size_error(cfg.group_size, in_features, name))
    g = in_features if cfg.group_size is None else cfg.group_size
    return min(g, in_features)


def _divide(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x / d`` as an IEEE float32 division on every device: a CUDA kernel given a Python number
    multiplies by its float32 reciprocal instead (one ulp off for about half the scales, seen on
    an H200), which neither the CPU nor the fused kernel does."""
    return x / torch.full((), float(d), dtype=x.dtype, device=x.device)


def _scale_zero(x: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x: float32 [..., g] -> scale, zero [..., 1]."""
    if cfg.symmetric:
        half = 2 ** (cfg.bits - 1)
        scale = _divide(x.abs().amax(-1, keepdim=True), half - 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, scale * -half
    mn, mx = torch.aminmax(x, dim=-1, keepdim=True)
    scale = _divide(mx - mn, 2**cfg.bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, mn


def _pieces(w: torch.Tensor, g: int):
    """Split [rows, in] column-wise into (full groups [rows, k, g], ragged tail [rows, 1, r])."""
    k = w.shape[1] // g
    full = w[:, : k * g].reshape(w.shape[0], k, g)
    if k * g == w.shape[1]:
        return [full]
    return [full, w[:, k * g :].reshape(w.shape[0], 1, -1)]


def _check(w: torch.Tensor, name: str) -> None:
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")


def quantize(w: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> QTensor:
    """Round-to-nearest quantization of ``w`` [out, in] (any float dtype) per ``cfg``."""
    _check(w, name)
    g = group_size_for(cfg, w.shape[1], name)
    codes, scales, zeros = [], [], []
    for x in _pieces(w.detach().float(), g):
        scale, zero = _scale_zero(x, cfg)
        codes.append(
            torch.sub(x, zero)
            .div_(scale)
            .round_()
            .clamp_(0, 2**cfg.bits - 1)
            .to(torch.uint8)
            .reshape(w.shape[0], -1)
        )
        scales.append(scale[..., 0])
        zeros.append(zero[..., 0])
    return QTensor(torch.cat(codes, 1), torch.cat(scales, 1), torch.cat(zeros, 1), g, cfg.bits)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale + zero, per group, as a [out, in] tensor of ``dtype``."""
    idx = torch.arange(q.codes.shape[1], device=q.codes.device) // q.group_size
    return (q.codes.float() * q.scale[:, idx] + q.zero[:, idx]).to(dtype)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> torch.Tensor:
    """dequantize(quantize(w)) computed over cache-sized row chunks, equal to it bit for bit.

    w: [out, in] -> new tensor [out, in] of w's dtype, on w's device. ``w`` is never modified.
    """
    _check(w, name)
    g = group_size_for(cfg, w.shape[1], name)
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    rows = max(1, _CHUNK // w.shape[1]) if w.device.type == "cpu" else w.shape[0]
    qmax = 2**cfg.bits - 1
    for start in range(0, w.shape[0], rows):
        src = w[start : start + rows].detach().float()
        dst = out[start : start + rows]
        col = 0
        for x in _pieces(src, g):
            scale, zero = _scale_zero(x, cfg)
            o = torch.sub(x, zero).div_(scale).round_().clamp_(0, qmax).mul_(scale).add_(zero)
            dst[:, col : col + o.shape[1] * o.shape[2]] = o.reshape(o.shape[0], -1)
            col += o.shape[1] * o.shape[2]
    return out.to(w.dtype)
