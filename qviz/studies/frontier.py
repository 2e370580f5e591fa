"""Memory across models: weight memory against quality for every (model, plan) on one table.

Quality is measured the same way whatever the tokenizer: bits per byte of the bundled held-out
prose (total NLL in bits over its UTF-8 bytes; perplexity per token is not comparable across
tokenizers) and fact accuracy (the answer's first token is the top-1 next token, as
``Lab.evaluate`` counts it). Memory is ``qviz.footprint`` of the plan on that model. A row is on
the Pareto front when no other row needs no more memory and reaches no worse bits per byte,
better in at least one of the two.
"""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from qviz.cancel import check_cancel
from qviz.data import load_facts, split_text
from qviz.models.load import EMBEDDED
from qviz.quant.config import QuantPlan
from qviz.quant.memory import footprint
from qviz.studies.evaluate import facts_of, next_token_stats, text_nll
from qviz.studies.memory import plan_bits

if TYPE_CHECKING:
    from qviz.lab import Lab

COLUMNS = [
    "model",
    "plan",
    "bits",
    "method",
    "group_size",
    "params",
    "weight_mib",
    "embed_mib",
    "effective_bits",
    "bits_per_byte",
    "fact_accuracy",
    "n_bytes",
    "n_tokens",
    "n_facts",
    "pareto",
]

# the verdict's (prompt, target) per embedded model: one its full-precision model answers top-1
# (tests/models/test_models.py: Gemma 3 270M ranks " Paris" third after the default prompt)
VERDICT_PROMPT = ("The capital of France is", " Paris")
VERDICT_PROMPTS = {"gemma3-270m": ("Paris is the capital of", " France")}


def verdict_prompt(
    name: str, verdict: bool | tuple[str, str | int] | Mapping[str, tuple[str, str | int]]
) -> tuple[str, str | int]:
    """The (prompt, target) of model ``name``'s verdict: ``verdict`` itself when a pair, its
    entry when a mapping (``VERDICT_PROMPT`` for a name it lacks), else ``VERDICT_PROMPTS``'s
    entry or ``VERDICT_PROMPT``."""
    if isinstance(verdict, tuple):
        if len(verdict) != 2 or not isinstance(verdict[0], str):
            raise ValueError(f"verdict must be a (prompt, target) pair, got {verdict!r}")
        return verdict
    table = verdict if isinstance(verdict, Mapping) else VERDICT_PROMPTS
    return tuple(table.get(name, VERDICT_PROMPT))


def held_out_text(max_chars: int | None = None) -> str:
    """The bundled prose after its calibration third (``prescribe.split_text``: GPTQ-free held-out
    text of prescription), cut at the last whitespace before ``max_chars`` when given."""
    text = split_text()[1]
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be a positive number of characters, got {max_chars}")
        if len(text) > max_chars:
            cut = text[:max_chars]
            space = max(cut.rfind(" "), cut.rfind("\n"))
            text = cut[:space] if space > 0 else cut
    return text


def prefix_token(tokenizer) -> int | None:
    """The token every text is scored after: BOS, else EOS (as lm-evaluation-harness does), so
    the text's first token is predicted too; None when the tokenizer has neither."""
    for attr in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def text_ids(tokenizer, text: str) -> torch.Tensor:
    """input_ids [1, T]: ``prefix_token`` then ``text`` without the tokenizer's own specials."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    first = prefix_token(tokenizer)
    return torch.tensor([([first] if first is not None else []) + ids], dtype=torch.long)


def bits_per_byte(
    lab: Lab,
    plan: QuantPlan,
    text: str,
    window: int = 512,
    cancel: threading.Event | None = None,
) -> dict:
    """Bits per UTF-8 byte of ``text`` under ``plan``: {"bits_per_byte", "nll_bits", "n_bytes",
    "n_tokens"}. Every token of ``text`` is predicted (after ``prefix_token``; with neither BOS
    nor EOS the first token is context only) in windows of ``window`` tokens
    (``studies.evaluate.text_nll``)."""
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise ValueError("the text is empty: bits per byte needs at least one byte")
    nll, count = text_nll(lab, plan, text_ids(lab.tokenizer, text), window, cancel)
    nll_bits = nll / math.log(2)
    return {
        "bits_per_byte": nll_bits / n_bytes,
        "nll_bits": nll_bits,
        "n_bytes": n_bytes,
        "n_tokens": count,
    }


def pareto_mask(memory: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """bool [N]: rows that no other row dominates (memory <= and loss <=, one of them <).
    Rows with a NaN are never on the front; equal rows are both on it."""
    mem = np.asarray(memory, dtype=float)
    los = np.asarray(loss, dtype=float)
    on = np.zeros(len(mem), dtype=bool)
    ok = np.flatnonzero(~(np.isnan(mem) | np.isnan(los)))
    order = ok[np.lexsort((los[ok], mem[ok]))]  # by memory, then loss; NaN rows left out
    best, i = math.inf, 0
    while i < len(order):  # rows of equal memory together: the least loss among them wins
        j = i + 1
        while j < len(order) and mem[order[j]] == mem[order[i]]:
            j += 1
        low = los[order[i]]  # sorted: the group's least loss comes first
        on[order[i:j]] = (los[order[i:j]] == low) & (low < best)
        best = min(best, low)
        i = j
    return on


def is_lab(m: object) -> bool:
    """A Lab (duck-typed: studies sit below ``qviz.lab`` and never import it)."""
    return all(hasattr(m, a) for a in ("model", "tokenizer", "engine", "adapter"))


def check_models(models: Sequence) -> None:
    """ValueError naming a model that is neither a Lab, an embedded name nor a local folder."""
    if isinstance(models, str) or not models:
        raise ValueError(
            f"models must be a non-empty list, got {models!r}; choices: {', '.join(EMBEDDED)}"
        )
    for m in models:
        if is_lab(m):
            continue
        if not isinstance(m, str) or not (m in EMBEDDED or Path(m).expanduser().is_dir()):
            raise ValueError(
                f"unknown model {m!r}; choices: {', '.join(EMBEDDED)} (or a local model folder "
                "or a qviz.Lab)"
            )


def check_plans(plans: Sequence[QuantPlan]) -> None:
    """ValueError for an empty plan list or an entry that is not a QuantPlan."""
    if not plans:
        raise ValueError(
            "plans is empty; pass QuantPlans, e.g. [QuantPlan.uniform(QuantConfig(4))] or "
            "QuantPlan.none() for full precision"
        )
    for p in plans:
        if not isinstance(p, QuantPlan):
            raise ValueError(
                f"plans must be QuantPlans, got {p!r} ({type(p).__name__}); wrap a config as "
                "QuantPlan.uniform(cfg)"
            )


def _release(lab: Lab) -> None:
    """Free a model loaded here: its engine's plan cache and the engine registry's entry
    (the engine holds the model, so the weak registry alone would keep it alive)."""
    from qviz.quant.engine import release

    lab.engine.clear()
    release(lab.model)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_frontier(
    models: Sequence[str | Lab],
    plans: Sequence[QuantPlan],
    load: Callable[..., Lab] | None = None,
    max_chars: int | None = None,
    n_facts: int | None = None,
    window: int = 512,
    device: str | torch.device | None = None,
    on_progress: Callable[[int, int, str], None] | None = None,
    progress: bool = False,
    cancel: threading.Event | None = None,
    verdict: bool | tuple[str, str | int] | Mapping[str, tuple[str, str | int]] = False,
) -> pd.DataFrame:
    """One row per (model, plan): weight memory against bits per byte and fact accuracy.

    ``models``: embedded names (``qviz.models.EMBEDDED``), local folders or Labs; names are
    loaded with ``load(name, device=device)`` (``Lab.load``; ``qviz.memory_frontier`` passes
    it) one at a time and freed before the next; Labs given are used as they are. ``plans``:
    QuantPlans (``QuantPlan.none()`` for the full-precision row). Quality: bits per byte of
    ``held_out_text(max_chars)`` in windows of ``window`` tokens, and top-1 accuracy on the
    first ``n_facts`` bundled facts (all when None; 0 skips them: NaN).

    Columns: model, plan (label), bits (16 = full precision), method ("fp" for none),
    group_size, params, weight_mib (``qviz.footprint``: embedding and unembedding included),
    embed_mib (their part), effective_bits, bits_per_byte, fact_accuracy, n_bytes, n_tokens,
    n_facts, pareto (bool: no other row needs no more memory at no worse bits per byte, see
    ``pareto_mask``). ``verdict`` (off by default): also a ``verdict`` column, the mode of
    ``lab.compare(prompt, target, plan, cka_context=0)`` (no pooled context: one prompt's
    forwards), with (prompt, target) from ``verdict_prompt``: True for each embedded model's
    own pair, one pair for every model, or a mapping model name -> pair.
    ``on_progress(done, total, "model plan")`` after each cell, or a tqdm bar with
    ``progress``; ``cancel`` is checked before each model, plan and window.
    """
    check_models(models)
    check_plans(plans)
    if load is None and any(isinstance(m, str) for m in models):
        raise ValueError("model names need load=Lab.load (qviz.memory_frontier passes it)")
    text = held_out_text(max_chars)
    facts = load_facts()[:n_facts] if n_facts is None or n_facts > 0 else []
    total, done, rows = len(models) * len(plans), 0, []
    bar = None
    if progress and on_progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="frontier", unit="cell")
    try:
        for m in models:
            name = str(m) if isinstance(m, str) else getattr(m, "name", "model")
            check_cancel(cancel, f"before model {name}")
            lab = m if is_lab(m) else load(m, device=device)
            try:
                _, prompts, tids = facts_of(lab, facts)
                probe = verdict_prompt(name, verdict) if verdict is not False else None
                for plan in plans:
                    check_cancel(cancel, f"before {name} {plan.label}")
                    lab.check(plan)
                    fp = footprint(lab.model, plan)
                    bpb = bits_per_byte(lab, plan, text, window, cancel)
                    acc = float("nan")
                    if facts:
                        with lab.engine.quantized(plan):
                            ok, _ = next_token_stats(lab, prompts, tids, cancel=cancel)
                        acc = float(ok.mean())
                    cfg = plan.default
                    if probe is not None:
                        cmp = lab.compare(*probe, plan, cka_context=0, cancel=cancel)
                        mode = cmp.verdict.mode
                    rows.append(
                        {
                            "model": name,
                            "plan": plan.label,
                            "bits": plan_bits(plan),
                            "method": cfg.method if cfg is not None else "fp",
                            "group_size": cfg.group_size if cfg is not None else None,
                            "params": fp.params,
                            "weight_mib": fp.bytes / 2**20,
                            "embed_mib": sum(r["bytes"] for r in fp.rows if r["layer"] == -1)
                            / 2**20,
                            "effective_bits": fp.effective_bits,
                            "bits_per_byte": bpb["bits_per_byte"],
                            "fact_accuracy": acc,
                            "n_bytes": bpb["n_bytes"],
                            "n_tokens": bpb["n_tokens"],
                            "n_facts": len(facts),
                        }
                        | ({"verdict": mode} if probe is not None else {})
                    )
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total, f"{name} {plan.label}")
                    if bar is not None:
                        bar.update(1)
            finally:
                if lab is not m:
                    _release(lab)
                    del lab
                    gc.collect()
    finally:
        if bar is not None:
            bar.close()
    frame = pd.DataFrame(rows, columns=COLUMNS[:-1])  # "verdict" (when asked) added after
    frame["pareto"] = pareto_mask(frame["weight_mib"], frame["bits_per_byte"])
    if verdict is not False:
        frame["verdict"] = pd.Series([r["verdict"] for r in rows], dtype=object)
    return frame


def bigger_vs_smaller(frame: pd.DataFrame, big_bits: int = 4, small_bits: int = 8) -> pd.DataFrame:
    """The frontier's question on a ``memory_frontier`` table: for every pair of models, is the
    one with more parameters at ``big_bits`` better than the smaller at ``small_bits``?

    One row per pair with both rows present: big, small (model names), big_plan, small_plan,
    big_mib, small_mib, big_bpb, small_bpb, big_facts, small_facts, and the booleans
    less_memory (big needs fewer MiB), better_bpb (big has lower bits per byte), better_facts.
    Of several plans at one bit-width, the first row is taken.
    """
    cols = ["big", "small", "big_plan", "small_plan", "big_mib", "small_mib", "big_bpb"]
    cols += ["small_bpb", "big_facts", "small_facts", "less_memory", "better_bpb", "better_facts"]
    params = frame.groupby("model", sort=False)["params"].first().sort_values(ascending=False)
    out = []
    for i, big in enumerate(params.index):
        for small in params.index[i + 1 :]:
            b = frame[(frame["model"] == big) & (frame["bits"] == big_bits)]
            s = frame[(frame["model"] == small) & (frame["bits"] == small_bits)]
            if b.empty or s.empty or params[big] == params[small]:
                continue
            b, s = b.iloc[0], s.iloc[0]
            out.append(
                [big, small, b["plan"], s["plan"], b["weight_mib"], s["weight_mib"]]
                + [b["bits_per_byte"], s["bits_per_byte"], b["fact_accuracy"], s["fact_accuracy"]]
                + [b["weight_mib"] < s["weight_mib"], b["bits_per_byte"] < s["bits_per_byte"]]
                + [b["fact_accuracy"] > s["fact_accuracy"]]
            )
    return pd.DataFrame(out, columns=cols)
