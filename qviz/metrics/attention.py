"""Attention-pattern metrics over causal attention probabilities."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["js_divergence", "normalized_entropy"]


def _queries(probs: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``dtype`` probs restricted to queries attending >= 2 keys, and their key counts.

    probs: [L, H, Tq, Tk] causal (query q sees keys 0 .. q + Tk - Tq). Returns
    (p [L, H, Q, Tk], n_keys [Q]) where Q = queries with q >= 1 (when Tq == Tk).
    """
    if probs.dim() != 4:
        raise ValueError(f"expected attention probs [L, H, Tq, Tk], got {tuple(probs.shape)}")
    tq, tk = probs.shape[-2:]
    if tk < tq:
        raise ValueError(f"causal attention needs Tk >= Tq, got Tq={tq}, Tk={tk}")
    n_keys = torch.arange(tq, device=probs.device) + (tk - tq) + 1
    keep = n_keys >= 2
    if not keep.any():
        raise ValueError("no query attends to more than one key (need a sequence of length >= 2)")
    first = int(keep.nonzero()[0])  # key counts grow with q: the kept queries are a suffix
    return probs.detach()[..., first:, :].to(dtype), n_keys[first:]


def normalized_entropy(probs: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Attention entropy per head, normalized by its maximum.

    probs: [L, H, Tq, Tk] causal. For each query q >= 1, H(p_q) / log(q + 1) (in [0, 1]: 1 =
    uniform over the attended keys, 0 = one-hot), averaged over q >= 1. Returns ``dtype`` [L, H]
    (float32 by default: within 1e-6 of float64 at 1,024 tokens; call it one layer at a time,
    probs [1, H, T, T], to keep memory at one layer's maps).
    """
    p, n_keys = _queries(probs, dtype)
    ent = -torch.xlogy(p, p).sum(dim=-1)  # 0 log 0 = 0
    norm = ent / torch.log(n_keys.to(dtype))
    return norm.clamp(0.0, 1.0).mean(dim=-1)


def js_divergence(p_ref: Tensor, p_quant: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) between two attention patterns.

    p_ref, p_quant: [L, H, Tq, Tk] causal. Per query q >= 1, averaged over queries.
    Returns ``dtype`` [L, H] (float32 by default).
    """
    if p_ref.shape != p_quant.shape:
        raise ValueError(f"shape mismatch: {tuple(p_ref.shape)} vs {tuple(p_quant.shape)}")
    p, _ = _queries(p_ref, dtype)
    q, _ = _queries(p_quant.to(p_ref.device), dtype)
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=-1)
    js = 0.5 * (kl_pm + kl_qm)
    return js.clamp(0.0, math.log(2.0)).mean(dim=-1)
