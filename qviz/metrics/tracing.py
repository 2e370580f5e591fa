"""Causal-tracing arithmetic and the peak-layer rule of signal amplification (pure functions)."""

from __future__ import annotations

import numpy as np

from qviz.probes.patch import window_layers  # where patching windows are decided

__all__ = ["RECOVERY_EPS", "peak_layer", "recovery", "window_layers"]

RECOVERY_EPS = 1e-4  # |p_reference - p_quantized| below this: recovery is undefined


def recovery(
    prob: np.ndarray, p_reference: float, p_quantized: float, eps: float = RECOVERY_EPS
) -> tuple[np.ndarray | None, str]:
    """(prob - p_quantized) / (p_reference - p_quantized), elementwise, or None with a note.

    prob: any shape (the [L, T] grid). Returns (recovery of prob's shape, or None when
    |p_reference - p_quantized| < eps, i.e. the plan does not move the target probability and
    "how much is recovered" has no meaning; note: one line saying which case holds).
    """
    gap = float(p_reference) - float(p_quantized)
    if not np.isfinite(gap) or abs(gap) < eps:
        return None, (
            f"recovery undefined: p_reference={p_reference:.6g} and p_quantized="
            f"{p_quantized:.6g} differ by {abs(gap):.3g} < eps={eps:g} (the plan does not change "
            "the target probability)"
        )
    rec = (np.asarray(prob, dtype=np.float64) - float(p_quantized)) / gap
    return rec, (
        f"recovery = (p - p_quantized) / (p_reference - p_quantized), p_reference="
        f"{p_reference:.6g}, p_quantized={p_quantized:.6g}"
    )


def peak_layer(lens_prob: np.ndarray, exclude_last: bool = True) -> int:
    """The decoder layer whose output carries the most answer probability, on average.

    lens_prob: [N, L+1] (or [L+1]) logit-lens probability of each calibration prompt's correct
    answer at every residual state (index 0 = embeddings, i = output of decoder layer i - 1).
    Returns the decoder layer p (0-based) maximizing the mean over prompts of state p + 1. With
    ``exclude_last`` the last layer is not eligible: its output goes straight into the final
    norm, which undoes any rescaling, so amplifying it can change nothing.
    """
    p = np.asarray(lens_prob, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        raise ValueError(f"lens_prob must be [N, L+1] with N >= 1, L >= 1; got {p.shape}")
    mean = np.nan_to_num(p.mean(axis=0)[1:], nan=-1.0)  # [L]: outputs of decoder layers
    if exclude_last and len(mean) > 1:
        mean = mean[:-1]
    return int(np.argmax(mean))
