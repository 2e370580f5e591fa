"""The one rule that names a failure mode, with its thresholds and where they come from.

The study (arXiv 2604.19884) reports, for Llama-3.1-8B and three other 7-9B models:
- 4 bits (signal degradation): the CKA diagonal stays clear, and the correct answer stays in the
  logit-lens top 5 at the last layers, with a weaker probability;
- 2 bits (computation collapse): CKA near zero almost everywhere, the answer's rank falls into the
  thousands, FFN gate sign flips exceed 30% ("severe"), and normalized attention entropy exceeds
  0.80 in middle layers.
qviz calls a plan "computation collapse" when at least two of the four collapse signs show,
"signal degradation" when the answer's final rank is worse than reference or the mean CKA
diagonal falls below HEALTHY_CKA, and "healthy" otherwise.
"""

from __future__ import annotations

import numpy as np

COLLAPSE_CKA = 0.5  # mean CKA diagonal over layers below this: "goes dark"
HEALTHY_CKA = 0.95  # mean CKA diagonal at least this (and the answer keeps its rank): healthy
COLLAPSE_RANK = 1000  # the study: "rank in the thousands"
SEVERE_FLIP = 0.30  # the study: gate sign flips above 30% are severe
COLLAPSE_ENTROPY = 0.80  # the study: normalized attention entropy above 0.80 in middle layers
BROKEN_LAYER_COSINE = 0.5  # isolation: a layer's update on a perfect input below this is broken


def verdict(
    cka_diag: np.ndarray,
    ref_rank: int,
    quant_rank: int,
    flip_rate: np.ndarray,
    quant_entropy_mid: float,
    *,
    isolation_delta_cosine: np.ndarray | None = None,
) -> tuple[str, dict]:
    """cka_diag [L+1]; ranks at the last layer; flip_rate [L]; mean entropy of middle layers.

    ``isolation_delta_cosine`` [L] (optional): the cosine of each quantized layer's update with
    the reference layer's, both fed the reference input (``Lab.isolate``). It adds evidence --
    the smallest cosine, how many layers fall below BROKEN_LAYER_COSINE (broken on a perfect
    input: computation collapse) and the first of them (-1: none; every layer computes well and
    is only fed noise: signal degradation) -- without changing the rule that names the mode.
    Returns (mode, evidence); metrics know no result classes, the Lab wraps them in a Verdict.
    """
    cka_mean = float(np.mean(cka_diag[1:]))
    max_flip = float(np.max(flip_rate))
    signs = {
        "cka_dark": cka_mean < COLLAPSE_CKA,
        "rank_thousands": quant_rank >= COLLAPSE_RANK,
        "severe_flips": max_flip > SEVERE_FLIP,
        "entropy_high": quant_entropy_mid > COLLAPSE_ENTROPY,
    }
    evidence = {
        "cka_diag_mean": cka_mean,
        "ref_rank": int(ref_rank),
        "quant_rank": int(quant_rank),
        "max_flip_rate": max_flip,
        "mid_attn_entropy": float(quant_entropy_mid),
        **{f"sign_{k}": v for k, v in signs.items()},
    }
    if isolation_delta_cosine is not None:
        iso = np.asarray(isolation_delta_cosine, dtype=np.float64)
        broken = np.flatnonzero(iso < BROKEN_LAYER_COSINE)
        evidence["isolation_min_cosine"] = float(iso.min())
        evidence["isolation_broken_layers"] = int(len(broken))
        evidence["isolation_first_broken"] = int(broken[0]) if len(broken) else -1
    if sum(signs.values()) >= 2:
        mode = "computation collapse"
    elif cka_mean < HEALTHY_CKA or quant_rank > ref_rank:
        mode = "signal degradation"
    else:
        mode = "healthy"
    return mode, evidence
