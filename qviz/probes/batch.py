"""Batches of prompts, written once: left-padded (evaluation, logit-lens probabilities,
captures) or packed end to end in one row (the CKA context's residual states)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def length_batches(
    lengths: Sequence[int], max_tokens: int = 4096, max_pad: int | None = None
) -> Iterator[list[int]]:
    """Indices grouped into batches, shortest first, each at most ``max_tokens`` padded tokens
    (a batch is as wide as its longest prompt; a prompt longer than the limit goes alone).

    ``max_pad``: also start a new batch when taking the next (longer) prompt would add more than
    ``max_pad`` padding tokens to the rows already in the batch (padding costs the Linears as
    much as real tokens do; one more forward costs about a fixed number of tokens)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * lengths[order[stop]] <= max_tokens:
            grow = (stop - start) * (lengths[order[stop]] - lengths[order[stop - 1]])
            if max_pad is not None and grow > max_pad:
                break
            stop += 1
        yield order[start:stop]
        start = stop


def left_pad(
    seqs: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, dict]:
    """(input_ids [B, W], forward keywords) for 1-D token tensors, left-padded to the longest.

    The keywords hold ``attention_mask`` and explicit ``position_ids`` (so padding changes
    nothing) when any row is padded, and nothing when none is: the last position of every row
    is its prompt's last token.
    """
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    device = device if device is not None else seqs[0].device
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, width - len(s) :] = s
        mask[row, width - len(s) :] = 1
    if mask.min() == 1:
        return ids, {}
    return ids, {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp_min(0)}


def token_batches(lengths: Sequence[int], max_tokens: int = 512) -> Iterator[list[int]]:
    """Indices in order, grouped so that each group's total length is at most ``max_tokens``
    (a longer one goes alone): the batches of ``pack``, which has no padding to balance."""
    group: list[int] = []
    total = 0
    for i, n in enumerate(lengths):
        if group and total + n > max_tokens:
            yield group
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        yield group


def pack(
    seqs: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, dict, list[slice]]:
    """(input_ids [1, N], forward keywords, one slice of the N positions per sequence) for 1-D
    token tensors laid end to end in one row, N their total length: no padding. The keywords
    hold ``position_ids`` restarting at 0 for each sequence and no attention mask,
    transformers' packed-sequence format, where the causal mask becomes block-diagonal (no
    sequence sees another; whether a model honours it: ``qviz.probes.capture.packs``)."""
    if not seqs:
        raise ValueError("pack needs at least one sequence")
    device = device if device is not None else seqs[0].device
    ids = torch.cat([s.reshape(-1) for s in seqs])[None].to(device)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(device)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()
    slices = [slice(e - len(s), e) for s, e in zip(seqs, ends, strict=True)]
    return ids, {"position_ids": pos}, slices
