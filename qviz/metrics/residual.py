"""Residual-stream drift between the reference and the quantized model."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_token_cosine", "residual_drift"]


def _flat(x: Tensor) -> Tensor:
    """[L, ..., D] -> float64 [L, N, D]."""
    if x.dim() < 2:
        raise ValueError(f"expected [L, N, D] activations, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64).reshape(x.shape[0], -1, x.shape[-1])


def mean_token_cosine(ref: Tensor, quant: Tensor) -> Tensor:
    """Per-token cosine similarity averaged over tokens: [L, N, D] x2 -> [L] (float64).

    A token whose two vectors are both zero counts as cosine 1; one zero vector counts as 0.
    """
    if ref.shape != quant.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(quant.shape)}")
    r, q = _flat(ref), _flat(quant.to(ref.device))
    nr, nq = r.norm(dim=-1), q.norm(dim=-1)
    dot = (r * q).sum(dim=-1)
    cos = dot / (nr * nq).clamp_min(torch.finfo(torch.float64).tiny)
    both_zero = (nr == 0) & (nq == 0)
    cos = torch.where(both_zero, torch.ones_like(cos), cos).clamp(-1.0, 1.0)
    return cos.mean(dim=1)


def residual_drift(ref: Tensor, quant: Tensor) -> tuple[Tensor, Tensor]:
    """Per-layer drift of the residual stream.

    ref, quant: [L+1, N, D]. Returns (cosine [L+1]: mean per-token cosine,
    rel_l2 [L+1]: ||quant - ref||_F / ||ref||_F per layer; 0 where both are zero, inf where
    only ref is zero), both float64.
    """
    cosine = mean_token_cosine(ref, quant)
    r, q = _flat(ref), _flat(quant.to(ref.device))
    diff = (q - r).flatten(1).norm(dim=1)
    base = r.flatten(1).norm(dim=1)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / base)
    return cosine, rel
