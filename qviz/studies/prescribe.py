"""Prescription: the per-layer plan with the least calibration KL under a bits-per-weight budget.

The search, in order:
1. Per-layer sensitivity on calibration text only (the first third of the bundled prose): for
   each decoder layer l and each candidate config c (candidate bits x group sizes x methods),
   the mean KL divergence of the next-token distribution from full precision when only layer l
   is quantized with c (``QuantPlan.only_layers``). The calibration windows run as one batch per
   variant; the full-precision log-probabilities and every layer's input are computed once, and
   a variant of layer l runs only layers l..L-1 from that stored input (the layers before it are
   full precision, so their output is the stored one): about half the work of a full forward.
   The table is cached per (model, options, calibration), so a repeated call (a budget slider)
   re-runs only the allocation.
2. An exact allocation: a multiple-choice knapsack over the layers, costs in stored bits
   (codes plus 16-bit scales and zeros, ``qviz.quant.memory.weight_bits``, the same numbers
   ``footprint(..., include_embeddings=False)`` sums), objective the sum of per-layer KL
   increases. Solved by dynamic programming over Pareto frontiers of (cost, KL): exact.
3. Measured whole: the sum of isolated KLs is only additive-approximate (layers interact), so
   the allocation's plan and every uniform plan of one option that fits are each measured by
   their joint calibration KL (one forward each), and a local search from the best re-measures
   its neighbours (one or two layers' options changed within the budget, in the table's order)
   and takes a move while the joint KL falls, at most ``refine_passes`` forwards. The result is
   never worse on the calibration objective than any uniform plan of its options that fits.
4. A check with the verdict (``lab.compare`` on a bundled fact prompt).
5. Baselines at equal or lower budget on held-out text (the rest of the prose, and facts):
   every uniform plan that fits (candidate bits x group sizes), protect-first-k plans and the
   greedy one-layer-at-a-time KL search, whose forward passes are counted.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from qviz.cancel import check_cancel
from qviz.data import load_facts, load_text, split_text  # noqa: F401 (split_text: re-exported)
from qviz.models.access import hidden_in
from qviz.probes.hooks import attached
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.memory import FP16_BITS, footprint
from qviz.quant.methods import METHODS
from qviz.results import Prescription

if TYPE_CHECKING:
    from qviz.lab import Lab

MAX_BUDGET = 16.0
CHECK_FACT = 0  # the bundled fact the verdict check runs on ("The capital city of France is")
UNIFORM_GROUP_SIZES = (32, 64, 128, None)
GROUP_SIZES = (32, 64, 128)  # the default per-layer group-size choices
SUFFIX_TOL = 1e-4  # max |log p| gap allowed between a suffix run and a full forward


# text ------------------------------------------------------------------------------------------
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


@contextmanager
def layers_from(lab: Lab, start: int) -> Iterator[None]:
    """Inside the block the model's decoder stack is only layers ``start``..L-1 (the ModuleList
    swapped for a slice of the same modules, restored on exit)."""
    path = lab.adapter.layers
    parent_path, _, name = path.rpartition(".")
    parent = lab.model.get_submodule(parent_path) if parent_path else lab.model
    full = getattr(parent, name)
    setattr(parent, name, torch.nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, full)


class KLMeter:
    """Mean KL of a plan from full precision on fixed calibration windows; counts forwards.

    ``meter(plan)``: one full forward. ``meter.isolated(layer, cfg)``: only ``layer`` quantized,
    run from the stored full-precision input of that layer (layers ``layer``..L-1 only); checked
    once (``suffix_checked`` passes) against the full forward, falling back to full forwards
    where the model cannot start from a layer's input (``suffix_ok``)."""

    def __init__(self, lab: Lab, ids: torch.Tensor, check_suffix: bool = True) -> None:
        self.lab, self.ids, self.forward_passes = lab, ids, 0
        layers = lab.adapter.decoder_layers(lab.model)
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)

        def keep(i):
            def pre(mod, args, kwargs):
                self.inputs[i] = hidden_in(args, kwargs).detach()

            return pre

        with lab.engine.quantized(QuantPlan.none()), attached() as h:
            for i, layer in enumerate(layers):
                h.pre(layer, keep(i))
            self.ref = next_token_logp(lab, ids)
        self.forward_passes += 1
        self.suffix_checked = int(check_suffix)
        self.suffix_ok = check_suffix and self._check_suffix()

    def _check_suffix(self) -> bool:
        mid = len(self.inputs) // 2
        try:
            with self.lab.engine.quantized(QuantPlan.none()):
                logp = self._suffix_logp(mid)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return False
        return bool((logp - self.ref).abs().max() <= SUFFIX_TOL)

    def _suffix_logp(self, layer: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """log-probabilities [B, T, V] from layer ``layer`` on, fed ``hidden`` (default: that
        layer's stored full-precision input)."""
        hidden = self.inputs[layer] if hidden is None else hidden
        with layers_from(self.lab, layer), torch.no_grad():
            logits = self.lab.model(inputs_embeds=hidden, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def __call__(self, plan: QuantPlan) -> float:
        with self.lab.engine.quantized(plan):
            q = next_token_logp(self.lab, self.ids)
        self.forward_passes += 1
        return max(mean_kl(self.ref, q), 0.0)

    def joint(
        self,
        plan: QuantPlan | Sequence[QuantPlan],
        start: int = 0,
        inputs: Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[float, list[torch.Tensor | None]]:
        """(KL, every layer's input) of ``plan``, counted as one forward pass.

        ``plan``: one plan, or several swapped in nested, each over the one before (only a
        later one's layers are quantized anew: the plan is the first with the later ones'
        overrides on top). ``inputs``: the layers' inputs under a plan equal to this one on
        layers < ``start``; with them (and ``suffix_ok``) only layers ``start``..L-1 run. The
        returned inputs are the given ones below ``start`` and the new ones from it on."""
        swaps = [plan] if isinstance(plan, QuantPlan) else list(plan)
        layers = self.lab.adapter.decoder_layers(self.lab.model)
        keep: list[torch.Tensor | None] = [None] * len(layers) if inputs is None else list(inputs)
        suffix = self.suffix_ok and inputs is not None and start > 0

        def hook(i):
            def pre(mod, args, kwargs):
                keep[i] = hidden_in(args, kwargs).detach()

            return pre

        with ExitStack() as stack, attached() as h:
            for p in swaps:
                stack.enter_context(self.lab.engine.quantized(p))
            for i in range(start if suffix else 0, len(layers)):
                h.pre(layers[i], hook(i))
            if suffix:
                q = self._suffix_logp(start, inputs[start])
            else:
                q = next_token_logp(self.lab, self.ids)
        self.forward_passes += 1
        return max(mean_kl(self.ref, q), 0.0), keep

    def isolated(self, layer: int, cfg: QuantConfig) -> float:
        """KL with only decoder layer ``layer`` quantized with ``cfg``."""
        plan = QuantPlan.only_layers(cfg, [layer])
        if not self.suffix_ok:
            return self(plan)
        with self.lab.engine.quantized(plan):
            q = self._suffix_logp(layer)
        self.forward_passes += 1
        return max(mean_kl(self.ref, q), 0.0)


# options and costs -----------------------------------------------------------------------------
def group_sizes_of(group_size: int | None | Sequence[int | None]) -> list[int | None]:
    """``group_size`` as a list: one size (an int or None = per output channel) or several."""
    if group_size is None or isinstance(group_size, (int, np.integer)):
        group_size = [group_size]
    sizes = [int(g) if isinstance(g, np.integer) else g for g in dict.fromkeys(group_size)]
    if not sizes:
        raise ValueError(
            f"group_size is empty ({group_size!r}); pass a size or several, e.g. "
            f"group_size={GROUP_SIZES}"
        )
    return sizes


def options_of(
    methods: Sequence[str],
    candidates: Sequence[int],
    group_size: int | None | Sequence[int | None] = GROUP_SIZES,
) -> list[QuantConfig | None]:
    """The per-layer choices: each method at each candidate bit-width and each group size
    (16 = full precision, one option)."""
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
        opts += [
            QuantConfig(int(b), g, method=m) for g in group_sizes_of(group_size) for m in methods
        ]
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


def moves(
    costs: np.ndarray, kl: np.ndarray, choice: Sequence[int], budget: float
) -> list[tuple[float, tuple[tuple[int, int], ...]]]:
    """Every change of one layer's option, or of two layers' options, that keeps the plan
    within ``budget`` (stored bits), as (predicted KL change from the table, ((layer, option),
    ...)), least predicted change first (ties: the smaller changes)."""
    n_layers, n_opts = costs.shape
    rows = np.arange(n_layers)
    choice = np.asarray(choice)
    slack = budget + 1e-9 * max(budget, 1.0) - float(costs[rows, choice].sum())
    d_cost = costs - costs[rows, choice][:, None]
    d_kl = kl - kl[rows, choice][:, None]
    layer, opt = np.nonzero(np.arange(n_opts)[None, :] != choice[:, None])
    dc, dk = d_cost[layer, opt], d_kl[layer, opt]
    out = [(float(dk[k]), ((int(layer[k]), int(opt[k])),)) for k in np.flatnonzero(dc <= slack)]
    a, b = np.nonzero((dc[:, None] + dc[None, :] <= slack) & (layer[:, None] < layer[None, :]))
    out += [
        (float(dk[i] + dk[j]), ((int(layer[i]), int(opt[i])), (int(layer[j]), int(opt[j]))))
        for i, j in zip(a, b, strict=True)
    ]
    out.sort()
    return out


def refine(
    meter: KLMeter,
    costs: np.ndarray,
    kl: np.ndarray,
    starts: Sequence[Sequence[int]],
    budget: float,
    options: Sequence[QuantConfig | None],
    max_passes: int,
    cancel: threading.Event | None = None,
    batch: int = 8,
) -> tuple[list[int], float]:
    """The plan with the least measured joint KL found from ``starts`` (choices [L]: the
    allocation's and the uniform plans that fit), then a local search on the joint KL.

    Each start is measured (one forward each); from the best, the moves within ``budget``
    (``moves``: one or two layers' options changed) are measured in the table's order, ``batch``
    at a time, and the best that lowers the joint KL is taken; then again from the new plan,
    until a full pass over the moves finds none or ``max_passes`` forwards are spent. A move
    runs only the layers from its lowest changed layer on, from the inputs stored under the
    current plan, and quantizes only the changed layers anew: nested swaps over the current
    plan's weights (a change back to full precision swaps the whole plan in). With a calibrated
    method among the options (GPTQ: each layer calibrated on the quantized layers before it) a
    move is a whole calibration run, so only the starts are measured. Returns (choice, its
    measured joint KL)."""
    tol = 1e-9
    seen: set[tuple[int, ...]] = set()
    best = None
    for start in starts:
        if tuple(start) in seen:
            continue
        seen.add(tuple(start))
        check_cancel(cancel, f"before the joint KL of start {len(seen)} of {len(starts)}")
        val, inputs = meter.joint(plan_of(start, options))
        if best is None or val < best[1] * (1 - tol):
            best = (list(start), val, inputs)
    choice, current, inputs = best
    if any(o is not None and METHODS.get_method(o.method).calibrated for o in options):
        return choice, current  # each move would be a whole calibration run (GPTQ: minutes)
    spent, stack = 0, [plan_of(choice, options)]  # the current plan as nested swaps
    while spent < max_passes:
        todo = []
        for _, changes in moves(costs, kl, choice, budget):
            trial = list(choice)
            for layer, o in changes:
                trial[layer] = o
            if tuple(trial) not in seen:
                todo.append((changes, trial))
                if len(todo) >= max_passes - spent:
                    break
        taken = None
        for at in range(0, len(todo), batch):
            for changes, trial in todo[at : at + batch]:
                check_cancel(cancel, f"refinement pass {spent + 1} of at most {max_passes}")
                seen.add(tuple(trial))
                if all(options[o] is not None for _, o in changes):  # only these layers anew
                    swaps = [
                        *stack,
                        QuantPlan(overrides=tuple((i, options[o]) for i, o in changes)),
                    ]
                else:  # back to full precision: a nested swap cannot restore the originals
                    swaps = [plan_of(trial, options)]
                first = min(i for i, _ in changes)
                val, new_inputs = meter.joint(swaps, first, inputs)
                spent += 1
                if val < current * (1 - tol) and (taken is None or val < taken[1]):
                    taken = (trial, val, new_inputs, swaps)
            if taken is not None:
                break
        if taken is None:
            break
        choice, current, inputs, stack = taken
    return choice, current


def sensitivity_table(
    lab: Lab,
    meter: KLMeter,
    options: Sequence[QuantConfig | None],
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """[L, n_options] KL increase when only layer l is quantized with each option
    (``progress(done, total)`` after each measured variant)."""
    n = lab.n_layers
    kl = np.zeros((n, len(options)))
    total, done = n * sum(c is not None for c in options), 0
    if progress is not None:
        progress(0, total)
    for layer in range(n):
        for o, cfg in enumerate(options):
            check_cancel(cancel, f"before sensitivity of layer {layer} of {n}, {option_label(cfg)}")
            if cfg is not None:
                kl[layer, o] = meter.isolated(layer, cfg)
                done += 1
                if progress is not None:
                    progress(done, total)
    frame = pd.DataFrame(kl, columns=[option_label(c) for c in options])
    frame.index.name = "layer"
    return frame


def greedy_search(
    meter: KLMeter,
    costs: np.ndarray,
    options: Sequence[QuantConfig | None],
    budget: float,
    cancel: threading.Event | None = None,
    top_k: int | None = None,
) -> list[int]:
    """The greedy one-layer-at-a-time KL search: every layer at the cheapest option, then
    repeatedly raise the one layer whose next option (options ordered by cost) buys the most
    measured (joint) KL per bit, until no raise fits. Each tried raise is one forward pass on
    the calibration windows: about L per raise.

    ``top_k`` (a bound, None = the full search): after the first step, measure only the raise
    that just became possible (the raised layer's next option) and re-measure the ``top_k``
    others with the best gain measured so far (a lazy greedy: the rest keep their stale
    gain), about ``top_k + 1`` forwards per raise instead of L."""
    order = [int(i) for i in np.argsort(costs.mean(0), kind="stable")]
    n = costs.shape[0]
    rank = [0] * n
    choice = [order[0]] * n
    total = float(costs[np.arange(n), choice].sum())
    current = meter(plan_of(choice, options))
    stale: dict[int, float] = {}  # layer -> last measured gain of its next raise
    step = 0
    while True:
        fits = []
        for layer in range(n):
            if rank[layer] + 1 >= len(order):
                continue
            nxt = order[rank[layer] + 1]
            extra = float(costs[layer, nxt] - costs[layer, choice[layer]])
            if total + extra <= budget + 1e-9 * budget:
                fits.append((layer, nxt, extra))
        if not fits:
            return choice
        if top_k is not None and step > 0:  # new raises, then the best stale ones
            new = [f for f in fits if f[0] not in stale]
            old = sorted((f for f in fits if f[0] in stale), key=lambda f: -stale[f[0]])
            fits = new + old[: max(int(top_k), 1)]
        best = None
        for layer, nxt, extra in fits:
            check_cancel(cancel, f"greedy step {step + 1}, layer {layer}")
            trial = choice.copy()
            trial[layer] = nxt
            val = meter(plan_of(trial, options))
            gain = (current - val) / max(extra, 1e-12)
            stale[layer] = gain
            if best is None or gain > best[0]:
                best = (gain, layer, nxt, val, extra)
        _, layer, nxt, current, extra = best
        choice[layer], rank[layer], total = nxt, rank[layer] + 1, total + extra
        stale.pop(layer, None)  # its next raise is a new one: measure it
        step += 1


# baselines -------------------------------------------------------------------------------------
def baseline_plans(
    lab: Lab,
    methods: Sequence[str],
    candidates: Sequence[int],
    group_size: int | None | Sequence[int | None],
    budget: float,
    params: int,
) -> list[tuple[str, QuantPlan]]:
    """(kind, plan) of every uniform plan (candidate bits x group sizes, the given ones and
    32, 64, 128, per channel) and every protect-first-k plan (k = 1..L-1, low/high candidate
    bits, each given group size) at or under ``budget`` bits/weight; protect-first keeps the
    largest k that fits for each (low, high, group size)."""
    n = lab.n_layers
    out: list[tuple[str, QuantPlan]] = []
    bits = sorted({int(b) for b in candidates if b != FP16_BITS})
    given = group_sizes_of(group_size)
    gss = list(dict.fromkeys([*given, *UNIFORM_GROUP_SIZES]))
    for m in methods:
        for b in bits:
            for g in gss:
                plan = QuantPlan.uniform(QuantConfig(b, g, method=m))
                if footprint(lab.model, plan, include_embeddings=False).effective_bits <= budget:
                    out.append(("uniform", plan))
        for (lo, hi), g in itertools.product(itertools.combinations(bits, 2), given):
            cfg = QuantConfig(lo, g, method=m)
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


def uniform_within(
    lab: Lab, budget: float, method: str = "rtn", group_sizes: Sequence[int | None] = (128,)
) -> tuple[QuantPlan, float] | None:
    """(plan, decoder bits/weight) of the uniform plan of ``method`` (bits 2..8, any of
    ``group_sizes`` it can use) with the most bits per weight within ``budget``, as the footprint
    counts decoder Linears (scales included); None when none fits."""
    best = None
    for bits in range(2, 9):
        for group in dict.fromkeys(group_sizes):
            try:
                plan = QuantPlan.uniform(QuantConfig(bits, group, method=method))
                lab.check(plan)
            except ValueError:  # a group size the method or the model cannot use
                continue
            eff = float(footprint(lab.model, plan, include_embeddings=False).effective_bits)
            if eff <= budget + 1e-9 and (best is None or eff > best[1]):
                best = (plan, eff)
    return best


def held_out(lab: Lab, plan: QuantPlan, text: str, facts: list[dict], cancel) -> dict:
    """Perplexity of the held-out text and accuracy on ``facts`` under ``plan``."""
    ppl = lab.perplexity(plan, text=text, cancel=cancel)
    acc = lab.evaluate(plan, prompts=facts, cancel=cancel).accuracy if facts else float("nan")
    return {"perplexity": ppl, "fact_accuracy": acc}


# the cache (a dashboard slider calls prescribe again and again) ------------------------------
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()
CACHE_ENTRIES = 8  # per model: sensitivity tables (with their meters) and results


def cache_get(lab: Lab, key: tuple):
    with _CACHE_LOCK:
        entries = _CACHE.get(lab.model)
        if entries is None or key not in entries:
            return None
        entries.move_to_end(key)
        return entries[key]


def cache_put(lab: Lab, key: tuple, value) -> None:
    with _CACHE_LOCK:
        entries = _CACHE.setdefault(lab.model, OrderedDict())
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > CACHE_ENTRIES:
            entries.popitem(last=False)


def clear_cache(lab: Lab | None = None) -> None:
    """Forget the cached sensitivity tables and prescriptions (of ``lab``'s model, or all)."""
    with _CACHE_LOCK:
        if lab is None:
            _CACHE.clear()
        else:
            _CACHE.pop(lab.model, None)


def prescribe(
    lab: Lab,
    budget_bits: float,
    methods: Sequence[str] = ("rtn",),
    candidates: Sequence[int] = (2, 3, 4, 8),
    objective: str = "kl",
    group_size: int | None | Sequence[int | None] = GROUP_SIZES,
    cancel: threading.Event | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    n_calib_tokens: int = 256,
    window: int = 128,
    sensitivity: pd.DataFrame | None = None,
    baselines: bool = True,
    greedy: bool = True,
    greedy_top_k: int | None = None,
    n_facts: int = 100,
    eval_chars: int | None = None,
    check: bool = True,
    cache: bool = True,
    refine_passes: int = 64,
) -> Prescription:
    """The cheapest-KL per-layer plan under ``budget_bits`` (see the module docstring).

    ``group_size``: one size or several (default 32, 64 and 128: each layer picks bits and
    group size). ``sensitivity``: a table from an earlier Prescription with the same options,
    reused (no sensitivity passes). ``baselines``: score the plan and the baselines on held-out
    text and ``n_facts`` evenly spaced bundled facts (``eval_chars``: only that much held-out
    prose); ``greedy``: include the greedy KL search (about L forward passes per raise;
    ``greedy_top_k`` bounds it to that many per raise). ``check``: run the verdict on a bundled
    fact prompt. ``refine_passes``: the most forwards the local search on the joint KL may
    spend after the starts (0 = the best of the allocation's plan and the uniform plans).
    ``progress(done, total)``: after each sensitivity variant. ``cache``: keep the
    sensitivity table per (model, options, calibration) and the result per arguments, so a
    repeated call returns at once and a call with another budget runs only the allocation, the
    starts and the refinement, the check and the baselines asked for.
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
    calib_key = (
        "sensitivity",
        tuple(labels),
        int(n_calib_tokens),
        int(window),
        hashlib.sha1(calib_text.encode()).hexdigest(),
    )
    given = None if sensitivity is None else hashlib.sha1(sensitivity.to_numpy().tobytes())
    result_key = (
        "result",
        calib_key,
        budget,
        bool(baselines),
        bool(greedy),
        greedy_top_k,
        int(n_facts),
        eval_chars,
        bool(check),
        None if given is None else given.hexdigest(),
        int(refine_passes),
    )
    if cache and (hit := cache_get(lab, result_key)) is not None:
        return hit
    stored = cache_get(lab, calib_key) if cache else None
    if stored is not None:
        meter, table = stored
    else:
        meter = KLMeter(lab, calibration_ids(lab, calib_text, n_calib_tokens, window))
        table = None
    if sensitivity is None:
        if table is None:
            table = sensitivity_table(lab, meter, options, cancel, progress)
        sensitivity = table
    elif list(sensitivity.columns) != labels or len(sensitivity) != lab.n_layers:
        raise ValueError(
            f"sensitivity has columns {list(sensitivity.columns)} and {len(sensitivity)} rows; "
            f"these options need columns {labels} and {lab.n_layers} rows"
        )
    if cache and table is not None:
        cache_put(lab, calib_key, (meter, table))
    choice, predicted = allocate(costs, sensitivity.to_numpy(), budget * params)
    # the allocation's plan and every uniform plan of one option that fits, measured whole;
    # then the local search from the best (``refine``)
    fits = costs.sum(0) <= budget * params * (1 + 1e-9)
    starts = [choice] + [[int(o)] * lab.n_layers for o in np.flatnonzero(fits)]
    before = meter.forward_passes
    choice, plan_kl = refine(
        meter, costs, sensitivity.to_numpy(), starts, budget * params, options, refine_passes,
        cancel,
    )  # fmt: skip
    plan = plan_of(choice, options)
    # the search's passes, cached or not: reference (+ the suffix check), sensitivity, the
    # starts and the refinement moves
    n_sens = 0 if table is None else sum(c is not None for c in options) * lab.n_layers
    passes = 1 + meter.suffix_checked + n_sens + meter.forward_passes - before
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
            gm = KLMeter(lab, meter.ids, check_suffix=False)
            g_choice = greedy_search(gm, costs, options, budget * params, cancel, greedy_top_k)
            kind = "greedy-kl" if greedy_top_k is None else f"greedy-kl-top{greedy_top_k}"
            plans.append((kind, plan_of(g_choice, options), gm.forward_passes))
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
    out = Prescription(
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
    if cache:
        cache_put(lab, result_key, out)
    return out
