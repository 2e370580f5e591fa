"""Prescription: the per-layer plan with the least calibration KL under a bits-per-weight budget.

The search, in order:
1. Per-layer sensitivity on calibration text only (the first third of the bundled prose): for
   each decoder layer l and each candidate config c, the mean KL divergence of the next-token
   distribution from full precision when only layer l is quantized with c
   (``QuantPlan.only_layers``). The calibration windows run as one batch per variant, and the
   full-precision log-probabilities are computed once.
2. An exact allocation: a multiple-choice knapsack over the layers, costs in stored bits
   (codes plus 16-bit scales and zeros, ``qviz.quant.memory.weight_bits``, the same numbers
   ``footprint(..., include_embeddings=False)`` sums), objective the sum of per-layer KL
   increases. Solved by dynamic programming over Pareto frontiers of (cost, KL): exact.
3. A check with the verdict (``lab.compare`` on a bundled fact prompt).
4. Baselines at equal or lower budget on held-out text (the rest of the prose, and facts):
   every uniform plan that fits (candidate bits x group sizes), protect-first-k plans and the
   greedy one-layer-at-a-time KL search, whose forward passes are counted.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from qviz.cancel import check_cancel
from qviz.data import load_facts, load_text
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.memory import FP16_BITS, footprint
from qviz.results import Prescription

if TYPE_CHECKING:
    from qviz.lab import Lab

MAX_BUDGET = 16.0
CHECK_FACT = 0  # the bundled fact the verdict check runs on ("The capital city of France is")
UNIFORM_GROUP_SIZES = (32, 64, 128, None)


# text ------------------------------------------------------------------------------------------
def split_text(text: str | None = None, calib_fraction: float = 1 / 3) -> tuple[str, str]:
    """(calibration, evaluation): the prose cut at the first paragraph break after
    ``calib_fraction`` of its characters; the two parts share no character."""
    text = text if text is not None else load_text()
    at = text.find("\n\n", int(len(text) * calib_fraction))
    at = at if at > 0 else int(len(text) * calib_fraction)
    return text[:at], text[at:].lstrip("\n")


def calibration_ids(lab: Lab, text: str, n_tokens: int, window: int) -> torch.Tensor:
    """input_ids [n_windows, window] of the first ``n_tokens`` tokens of ``text``."""
    ids = lab.tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(int(n_tokens), len(ids)) // window * window
    if n == 0:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of {window}"
        )
    return ids[:n].view(-1, window).to(lab.model.device)


def next_token_logp(lab: Lab, ids: torch.Tensor) -> torch.Tensor:
    """log-probabilities [B, T, V] (float32) under the active weights."""
    with torch.no_grad():
        logits = lab.model(ids, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1)


def mean_kl(ref_logp: torch.Tensor, q_logp: torch.Tensor) -> float:
    """KL(reference || quantized) per position, averaged over [B, T]."""
    return float((ref_logp.exp() * (ref_logp - q_logp)).sum(-1).mean())


class KLMeter:
    """Mean KL of a plan from full precision on fixed calibration windows; counts forwards."""

    def __init__(self, lab: Lab, ids: torch.Tensor) -> None:
        self.lab, self.ids, self.forward_passes = lab, ids, 0
        with lab.engine.quantized(QuantPlan.none()):
            self.ref = next_token_logp(lab, ids)
        self.forward_passes += 1

    def __call__(self, plan: QuantPlan) -> float:
        with self.lab.engine.quantized(plan):
            q = next_token_logp(self.lab, self.ids)
        self.forward_passes += 1
        return max(mean_kl(self.ref, q), 0.0)


# options and costs -----------------------------------------------------------------------------
def options_of(
    methods: Sequence[str], candidates: Sequence[int], group_size: int | None
) -> list[QuantConfig | None]:
    """The per-layer choices: each method at each candidate bit-width (16 = full precision)."""
    if not methods:
        raise ValueError("methods is empty; pass at least one, e.g. methods=('rtn',)")
    cands = sorted(set(candidates)) if candidates is not None else []
    if not cands:
        raise ValueError(
            f"candidates is empty ({candidates!r}); pass bit-widths in 2..8 (or 16 for full "
            "precision), e.g. candidates=(2, 3, 4, 8)"
        )
    opts: list[QuantConfig | None] = []
    for b in cands:
        if b == FP16_BITS:
            opts.append(None)
            continue
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= 8:
            raise ValueError(
                f"candidate bits {b!r} is not valid; candidates are ints in 2..8, or 16"
            )
        opts += [QuantConfig(int(b), group_size, method=m) for m in methods]
    return opts


def option_label(cfg: QuantConfig | None) -> str:
    return "fp16" if cfg is None else cfg.label


def layer_costs(lab: Lab, options: Sequence[QuantConfig | None]) -> np.ndarray:
    """[L, n_options] stored bits of each decoder layer's Linears under each option, as
    ``footprint(..., include_embeddings=False)`` counts them (scales and zeros included)."""
    cols = []
    for cfg in options:
        per = footprint(lab.model, QuantPlan(default=cfg), include_embeddings=False).per_layer()
        cols.append((per["bytes"] * 8).to_numpy())
    return np.stack(cols, axis=1)


def decoder_params(lab: Lab) -> int:
    return footprint(lab.model, QuantPlan.none(), include_embeddings=False).params


def plan_of(choice: Sequence[int], options: Sequence[QuantConfig | None]) -> QuantPlan:
    """A QuantPlan giving decoder layer i ``options[choice[i]]`` (the most common one as the
    default, the others as overrides)."""
    counts = np.bincount(np.asarray(choice), minlength=len(options))
    default = int(np.argmax(counts))
    overrides = tuple((i, options[c]) for i, c in enumerate(choice) if c != default)
    return QuantPlan(default=options[default], overrides=overrides)


def check_budget(budget_bits: float, min_bits: float, cheapest: str) -> float:
    """ValueError for a budget that is not a number in [min_bits, 16]."""
    try:
        b = float(budget_bits)
    except (TypeError, ValueError):
        raise ValueError(
            f"budget_bits must be a number of bits per weight, got {budget_bits!r}"
        ) from None
    if not np.isfinite(b) or b > MAX_BUDGET:
        raise ValueError(
            f"budget_bits={budget_bits!r} is above {MAX_BUDGET:g} bits per weight (full "
            f"precision); pass a budget between {min_bits:.4g} and {MAX_BUDGET:g}"
        )
    if b < min_bits:
        raise ValueError(
            f"budget_bits={budget_bits!r} is below {min_bits:.4g} bits per weight, the cost of "
            f"the cheapest candidate ({cheapest}) with its scales and zeros; pass at least "
            f"{min_bits:.4g} or add a cheaper candidate"
        )
    return b


# the allocation --------------------------------------------------------------------------------
def allocate(costs: np.ndarray, kl: np.ndarray, budget: float) -> tuple[list[int], float]:
    """Exact multiple-choice knapsack: one option per layer, total cost <= ``budget``, least
    total KL. costs, kl: [L, n_options]. Returns (choice [L], total KL).

    Dynamic programming over the Pareto frontier of (cost, KL) partial sums, layer by layer;
    dominated states (no cheaper and no better) are dropped, so the answer is exact. Ties go to
    the cheaper state, then to the lexicographically smaller choice: deterministic.
    """
    n_layers, _ = costs.shape
    slack = 1e-9 * max(budget, 1.0)
    rest_min = np.concatenate([np.cumsum(costs.min(1)[::-1])[::-1], [0.0]])
    frontier: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for layer in range(n_layers):
        states = []
        for cost, val, choice in frontier:
            for o in range(costs.shape[1]):
                c = cost + float(costs[layer, o])
                if c + rest_min[layer + 1] <= budget + slack:
                    states.append((c, val + float(kl[layer, o]), choice + (o,)))
        if not states:
            raise ValueError(f"no allocation fits the budget of {budget} bits")
        states.sort(key=lambda s: (s[0], s[1], s[2]))
        frontier, best = [], np.inf
        for s in states:
            if s[1] < best - 1e-15:
                frontier.append(s)
                best = s[1]
    top = min(frontier, key=lambda s: (s[1], s[0], s[2]))
    return list(top[2]), top[1]


def brute_force(costs: np.ndarray, kl: np.ndarray, budget: float) -> tuple[list[int], float]:
    """Every combination (for tests on tiny cases): (choice, total KL) of the best that fits."""
    best, arg = np.inf, None
    rows = range(costs.shape[0])
    for choice in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        if sum(costs[i, c] for i, c in zip(rows, choice, strict=True)) <= budget:
            v = sum(kl[i, c] for i, c in zip(rows, choice, strict=True))
            if v < best:
                best, arg = v, list(choice)
    if arg is None:
        raise ValueError("nothing fits")
    return arg, float(best)


def sensitivity_table(
    lab: Lab,
    meter: KLMeter,
    options: Sequence[QuantConfig | None],
    cancel: threading.Event | None = None,
) -> pd.DataFrame:
    """[L, n_options] KL increase when only layer l is quantized with each option."""
    n = lab.n_layers
    kl = np.zeros((n, len(options)))
    for layer in range(n):
        for o, cfg in enumerate(options):
            check_cancel(cancel, f"before sensitivity of layer {layer} of {n}, {option_label(cfg)}")
            if cfg is not None:
                kl[layer, o] = meter(QuantPlan.only_layers(cfg, [layer]))
    frame = pd.DataFrame(kl, columns=[option_label(c) for c in options])
    frame.index.name = "layer"
    return frame


def greedy_search(
    meter: KLMeter,
    costs: np.ndarray,
    options: Sequence[QuantConfig | None],
    budget: float,
    cancel: threading.Event | None = None,
) -> list[int]:
    """The greedy one-layer-at-a-time KL search: every layer at the cheapest option, then
    repeatedly raise the one layer whose next option buys the most measured (joint) KL per bit,
    until no raise fits. Each tried raise is one forward pass on the calibration windows."""
    order = [int(i) for i in np.argsort(costs.mean(0), kind="stable")]
    rank = [0] * costs.shape[0]
    choice = [order[0]] * costs.shape[0]
    total = float(costs[np.arange(len(choice)), choice].sum())
    current = meter(plan_of(choice, options))
    step = 0
    while True:
        best = None
        for layer in range(len(choice)):
            if rank[layer] + 1 >= len(order):
                continue
            nxt = order[rank[layer] + 1]
            extra = float(costs[layer, nxt] - costs[layer, choice[layer]])
            if total + extra > budget + 1e-9 * budget:
                continue
            check_cancel(cancel, f"greedy step {step + 1}, layer {layer}")
            trial = choice.copy()
            trial[layer] = nxt
            val = meter(plan_of(trial, options))
            gain = (current - val) / max(extra, 1e-12)
            if best is None or gain > best[0]:
                best = (gain, layer, nxt, val, extra)
        if best is None:
            return choice
        _, layer, nxt, current, extra = best
        choice[layer], rank[layer], total = nxt, rank[layer] + 1, total + extra
        step += 1


# baselines -------------------------------------------------------------------------------------
def baseline_plans(
    lab: Lab,
    methods: Sequence[str],
    candidates: Sequence[int],
    group_size: int | None,
    budget: float,
    params: int,
) -> list[tuple[str, QuantPlan]]:
    """(kind, plan) of every uniform plan (candidate bits x group sizes) and every
    protect-first-k plan (k = 1..L-1, low/high candidates) at or under ``budget`` bits/weight;
    protect-first keeps the largest k that fits for each (low, high) pair."""
    n = lab.n_layers
    out: list[tuple[str, QuantPlan]] = []
    bits = sorted({int(b) for b in candidates if b != FP16_BITS})
    gss = list(dict.fromkeys([group_size, *UNIFORM_GROUP_SIZES]))
    for m in methods:
        for b in bits:
            for g in gss:
                plan = QuantPlan.uniform(QuantConfig(b, g, method=m))
                if footprint(lab.model, plan, include_embeddings=False).effective_bits <= budget:
                    out.append(("uniform", plan))
        for lo, hi in itertools.combinations(bits, 2):
            cfg = QuantConfig(lo, group_size, method=m)
            fits = [
                k
                for k in range(1, n)
                if footprint(
                    lab.model, QuantPlan.protect_first(cfg, k, hi), include_embeddings=False
                ).effective_bits
                <= budget
            ]
            if fits:
                out.append(
                    (f"protect-first-{max(fits)}", QuantPlan.protect_first(cfg, max(fits), hi))
                )
    return out


def held_out(lab: Lab, plan: QuantPlan, text: str, facts: list[dict], cancel) -> dict:
    """Perplexity of the held-out text and accuracy on ``facts`` under ``plan``."""
    ppl = lab.perplexity(plan, text=text, cancel=cancel)
    acc = lab.evaluate(plan, prompts=facts, cancel=cancel).accuracy if facts else float("nan")
    return {"perplexity": ppl, "fact_accuracy": acc}


def prescribe(
    lab: Lab,
    budget_bits: float,
    methods: Sequence[str] = ("rtn",),
    candidates: Sequence[int] = (2, 3, 4, 8),
    objective: str = "kl",
    group_size: int | None = 128,
    cancel: threading.Event | None = None,
    *,
    n_calib_tokens: int = 512,
    window: int = 128,
    sensitivity: pd.DataFrame | None = None,
    baselines: bool = True,
    greedy: bool = True,
    n_facts: int = 100,
    eval_chars: int | None = None,
    check: bool = True,
) -> Prescription:
    """The cheapest-KL per-layer plan under ``budget_bits`` (see the module docstring).

    ``sensitivity``: a table from an earlier Prescription with the same options, reused (no
    sensitivity passes). ``baselines``: score the plan and the baselines on held-out text and
    ``n_facts`` evenly spaced bundled facts (``eval_chars``: only that much held-out prose);
    ``greedy``: include the greedy KL search (about
    L forward passes per raise). ``check``: run the verdict on a bundled fact prompt.
    """
    if objective != "kl":
        raise ValueError(f"objective={objective!r} is not known; the only objective is 'kl'")
    options = options_of(methods, candidates, group_size)
    costs = layer_costs(lab, options)
    params = decoder_params(lab)
    cheapest = int(np.argmin(costs.sum(0)))
    budget = check_budget(
        budget_bits, costs.sum(0)[cheapest] / params, option_label(options[cheapest])
    )
    labels = [option_label(c) for c in options]
    calib_text, eval_text = split_text()
    eval_text = eval_text[:eval_chars] if eval_chars else eval_text
    meter = KLMeter(lab, calibration_ids(lab, calib_text, n_calib_tokens, window))
    if sensitivity is None:
        sensitivity = sensitivity_table(lab, meter, options, cancel)
    elif list(sensitivity.columns) != labels or len(sensitivity) != lab.n_layers:
        raise ValueError(
            f"sensitivity has columns {list(sensitivity.columns)} and {len(sensitivity)} rows; "
            f"these options need columns {labels} and {lab.n_layers} rows"
        )
    choice, predicted = allocate(costs, sensitivity.to_numpy(), budget * params)
    plan = plan_of(choice, options)
    plan_kl = meter(plan)
    passes = meter.forward_passes
    verdict = None
    if check:
        fact = load_facts()[CHECK_FACT]
        tid = lab.tokenizer(fact["answer"], add_special_tokens=False).input_ids[0]
        verdict = lab.compare(fact["prompt"], int(tid), plan).verdict
    rows = []
    if baselines:
        facts_all = load_facts()
        idx = np.linspace(0, len(facts_all) - 1, min(n_facts, len(facts_all))).round()
        facts = [facts_all[int(i)] for i in dict.fromkeys(idx.astype(int))] if n_facts else []
        plans = [("prescribed", plan, passes), ("full precision", QuantPlan.none(), 0)]
        plans += [
            (k, p, 0)
            for k, p in baseline_plans(lab, methods, candidates, group_size, budget, params)
        ]
        if greedy:
            gm = KLMeter(lab, meter.ids)
            g_choice = greedy_search(gm, costs, options, budget * params, cancel)
            plans.append(("greedy-kl", plan_of(g_choice, options), gm.forward_passes))
        for kind, p, fwd in plans:
            check_cancel(cancel, f"before scoring {p.label}")
            rows.append(
                {
                    "kind": kind,
                    "plan": p.label,
                    "effective_bits": footprint(
                        lab.model, p, include_embeddings=False
                    ).effective_bits,
                    "calib_kl": plan_kl if kind == "prescribed" else meter(p),
                    **held_out(lab, p, eval_text, facts, cancel),
                    "forward_passes": fwd,
                }
            )
    return Prescription(
        plan=plan,
        budget_bits=budget,
        options=labels,
        choice=[labels[c] for c in choice],
        bits=[FP16_BITS if options[c] is None else options[c].bits for c in choice],
        effective_bits=footprint(lab.model, plan, include_embeddings=False).effective_bits,
        sensitivity=sensitivity,
        predicted_kl=predicted,
        calib_kl=plan_kl,
        forward_passes=passes,
        verdict=verdict,
        baselines=pd.DataFrame(rows),
    )
