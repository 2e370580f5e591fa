"""Feed-forward (MLP) block damage: gate sign flips, top-neuron overlap, output cosine."""

from __future__ import annotations

import torch
from torch import Tensor

from qviz.metrics.residual import mean_token_cosine

__all__ = ["output_cosine", "sign_flip_rate", "topk_jaccard"]


def _check(ref: Tensor, quant: Tensor) -> None:
    if ref.shape != quant.shape:
        raise ValueError(f"shape mismatch: {tuple(ref.shape)} vs {tuple(quant.shape)}")
    if ref.dim() < 2:
        raise ValueError(f"expected [L, N, F] activations, got shape {tuple(ref.shape)}")


def sign_flip_rate(ref_gate: Tensor, quant_gate: Tensor) -> Tensor:
    """Fraction of gate pre-activations whose sign differs (0 counts as positive).

    ref_gate, quant_gate: [L, N, F]. Returns float64 [L] in [0, 1].
    """
    _check(ref_gate, quant_gate)
    flips = (ref_gate >= 0) != (quant_gate.to(ref_gate.device) >= 0)
    return flips.reshape(flips.shape[0], -1).to(torch.float64).mean(dim=1)


def topk_jaccard(ref_act: Tensor, quant_act: Tensor, frac: float = 0.01) -> Tensor:
    """Jaccard overlap of each layer's most active neurons in the two models.

    ref_act, quant_act: [L, N, F]. Neurons are ranked by mean |activation| over the N samples;
    the top k = max(1, round(frac * F)) form each set. Returns float64 [L] in [0, 1].
    """
    _check(ref_act, quant_act)
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    n_feat = ref_act.shape[-1]
    k = max(1, round(frac * n_feat))

    def top_mask(act: Tensor) -> Tensor:
        score = act.detach().to(torch.float64).abs().reshape(act.shape[0], -1, n_feat).mean(1)
        idx = score.topk(k, dim=-1).indices  # [L, k]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)

    a, b = top_mask(ref_act), top_mask(quant_act.to(ref_act.device))
    inter = (a & b).sum(dim=1).to(torch.float64)
    union = (a | b).sum(dim=1).to(torch.float64)
    return inter / union


def output_cosine(ref_out: Tensor, quant_out: Tensor) -> Tensor:
    """Mean per-token cosine of the MLP outputs: [L, N, D] x2 -> float64 [L]."""
    _check(ref_out, quant_out)
    return mean_token_cosine(ref_out, quant_out)
