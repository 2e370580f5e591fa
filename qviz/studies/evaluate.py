"""Task-level studies: next-token statistics, fact-recall accuracy, perplexity."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from qviz.cancel import check_cancel
from qviz.data import load_facts, load_text
from qviz.probes.batch import left_pad, length_batches
from qviz.probes.hooks import scaled_output
from qviz.quant.config import QuantPlan
from qviz.results import Evaluation

if TYPE_CHECKING:
    from qviz.lab import Lab


def facts_of(lab: Lab, prompts: list[dict] | None) -> tuple[list[dict], list[str], list[int]]:
    """(facts, prompt texts, first token id of each answer); default: the bundled facts."""
    facts = prompts if prompts is not None else load_facts()
    texts = [f["prompt"] for f in facts]
    tids = [lab.tokenizer(f["answer"], add_special_tokens=False).input_ids[0] for f in facts]
    return facts, texts, tids


def next_token_stats(
    lab: Lab,
    prompts: list[str],
    targets: list[int],
    scale: tuple[int, float] | None = None,
    max_tokens: int = 4096,
    cancel: threading.Event | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 correctness [N] and rank [N] of each target after its prompt, active weights.

    Left-padded batches of at most ``max_tokens`` tokens (``qviz.probes.batch``), logits at
    the last position only. ``scale=(p, alpha)`` multiplies the residual stream leaving decoder
    layer p by alpha (peak signal amplification).
    """
    encoded = [lab.encode(p)[0] for p in prompts]
    correct = np.zeros(len(prompts), dtype=bool)
    ranks = np.zeros(len(prompts), dtype=np.int64)
    batches = list(length_batches([len(e) for e in encoded], max_tokens))
    layers = lab.adapter.decoder_layers(lab.model)
    with scaled_output(layers[scale[0]], scale[1]) if scale is not None else nullcontext():
        for b, batch in enumerate(batches):
            check_cancel(cancel, f"before batch {b + 1} of {len(batches)}")
            ids, kw = left_pad([encoded[i] for i in batch], lab.model.device)
            with torch.no_grad():
                logits = lab.model(ids, use_cache=False, logits_to_keep=1, **kw).logits
            logits = logits[:, -1].float()
            tid = torch.tensor([targets[i] for i in batch], device=logits.device)
            tgt = logits.gather(1, tid[:, None])
            r = ((logits > tgt).sum(1) + 1).cpu().numpy()
            ranks[batch] = r
            correct[batch] = r == 1
    return correct, ranks


def reference_stats(
    lab: Lab, texts: list[str], tids: list[int], cancel: threading.Event | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Full-precision correctness and ranks, cached per (prompts, targets) in ``lab``."""
    key = (tuple(texts), tuple(tids))
    hit = lab._ref_stats.get(key)
    if hit is None:
        with lab.engine.quantized(QuantPlan.none()):
            hit = next_token_stats(lab, texts, tids, cancel=cancel)
        lab._ref_stats.put(key, hit)
    return hit


def evaluate(
    lab: Lab,
    plan: QuantPlan,
    prompts: list[dict] | None = None,
    cancel: threading.Event | None = None,
) -> Evaluation:
    """Fact-recall accuracy of ``plan`` (see ``Lab.evaluate``)."""
    facts, texts, tids = facts_of(lab, prompts)
    ref_ok, _ = reference_stats(lab, texts, tids, cancel)
    with lab.engine.quantized(plan):
        ok, ranks = next_token_stats(lab, texts, tids, cancel=cancel)
    frame = pd.DataFrame(
        {
            "prompt": texts,
            "answer": [f["answer"] for f in facts],
            "relation": [f.get("relation", "") for f in facts],
            "reference_correct": ref_ok,
            "correct": ok,
            "rank": ranks,
        }
    )
    return Evaluation(
        plan.label,
        float(ok.mean()),
        float(ref_ok.mean()),
        float(ranks.mean()),
        [int(i) for i in np.flatnonzero(ref_ok)],
        [int(i) for i in np.flatnonzero(ref_ok & ~ok)],
        frame,
    )


def text_nll(
    lab: Lab,
    plan: QuantPlan,
    ids: torch.Tensor,
    window: int = 512,
    cancel: threading.Event | None = None,
) -> tuple[float, int]:
    """(total NLL in nats, tokens predicted) of ``ids`` [1, T] under ``plan``.

    Non-overlapping windows of ``window`` predicted tokens: every token after the first is
    predicted once, from at most ``window`` tokens of its own window (the first token is context
    only). ``cancel`` is checked before each window.
    """
    if window < 1:
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    ids = ids.to(lab.model.device)
    nll, count = 0.0, 0
    starts = range(0, ids.shape[1] - 1, window)
    with lab.engine.quantized(plan), torch.no_grad():
        for k, start in enumerate(starts):
            check_cancel(cancel, f"before window {k + 1} of {len(starts)}")
            chunk = ids[:, start : start + window + 1]
            if chunk.shape[1] < 2:
                break
            logits = lab.model(chunk[:, :-1], use_cache=False).logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits[0], chunk[0, 1:], reduction="sum"
            ).item()
            count += chunk.shape[1] - 1
    return nll, count


def perplexity(
    lab: Lab,
    plan: QuantPlan,
    text: str | None = None,
    window: int = 512,
    cancel: threading.Event | None = None,
) -> float:
    """Perplexity of ``text`` (default: the bundled prose) in non-overlapping windows."""
    ids = lab.tokenizer(text if text is not None else load_text(), return_tensors="pt").input_ids
    nll, count = text_nll(lab, plan, ids, window, cancel)
    return float(np.exp(nll / count))
