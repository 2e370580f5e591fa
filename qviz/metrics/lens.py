"""Logit lens: read every layer's residual stream through the final norm and the unembedding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["logit_lens", "target_stats", "topk_tokens"]


def logit_lens(
    states: Tensor,
    final_norm: nn.Module,
    unembed: nn.Module,
    softcap: float | None = None,
) -> Tensor:
    """Logits of each layer's hidden states: final_norm, then unembed, then optional softcap.

    states: [L+1, T, D] or [L+1, D] (any leading dims). Returns logits [L+1, ..., V]; with
    softcap, logits = softcap * tanh(logits / softcap).
    """
    logits = unembed(final_norm(states))
    if softcap is not None:
        if softcap <= 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def target_stats(logits: Tensor, target: int) -> tuple[Tensor, Tensor, Tensor]:
    """Probability, rank (1 = top; ties rank best) and raw logit of one token per layer.

    logits: [L+1, V] (or [..., V]). Returns (prob [L+1], rank [L+1] int64, logit [L+1]).
    """
    vocab = logits.shape[-1]
    if not -vocab <= target < vocab:
        raise IndexError(f"target {target} out of range for vocabulary of size {vocab}")
    target = target % vocab
    logit = logits[..., target]
    prob = torch.softmax(logits.float(), dim=-1)[..., target]
    rank = (logits > logit.unsqueeze(-1)).sum(dim=-1) + 1
    return prob, rank, logit


def topk_tokens(logits: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """The k most probable tokens per layer.

    logits: [L+1, V] (or [..., V]). Returns (ids [L+1, k] int64, probs [L+1, k]), best first.
    """
    k = min(k, logits.shape[-1])
    probs = torch.softmax(logits.float(), dim=-1)
    top, ids = probs.topk(k, dim=-1)
    return ids, top
