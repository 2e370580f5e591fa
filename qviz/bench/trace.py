"""Causal tracing: the batched grid against a fair one-forward-per-cell loop."""

from __future__ import annotations

import time


def fair_per_cell(lab, prompt: str, target: str, plan) -> tuple[object, float]:
    """The fair baseline of causal tracing ("resid", restore): the quantized and reference runs,
    then one forward per cell that computes the last position's logits only, as a plain loop
    would. Returns (prob [L, T], seconds). Uses the probes' own per-cell patch, one cell a call.
    """
    from qviz.probes.patch import per_cell_last, run_cache
    from qviz.quant import QuantPlan

    t0 = time.perf_counter()
    ids, tid = lab.encode(prompt), lab.target_id(target)
    with lab.engine.quantized(plan):
        run_cache(lab.model, lab.adapter, ids, tid, kv=True)
    with lab.engine.quantized(QuantPlan.none()):
        ref = run_cache(lab.model, lab.adapter, ids, tid)
    with lab.engine.quantized(plan):
        grid = per_cell_last(lab.model, lab.adapter, ids, ref, tid, "resid")
    return grid, time.perf_counter() - t0


LONG_PROMPT = (
    "In 1889, for the World's Fair that marked the centennial of the French Revolution, the "
    "engineer Gustave Eiffel finished an iron lattice tower, which still stands in the "
    "city of"
)


def _rank_corr(a, b) -> float:
    """Spearman rank correlation of two arrays (ties broken by order)."""
    import numpy as np

    ra, rb = (np.argsort(np.argsort(x.ravel(), kind="stable")) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fast_vs_exact(lab, plan, prompt: str = LONG_PROMPT, target: str = " Paris", top: int = 32):
    """``lab.trace(mode="fast")`` against the exact batched grid on a ~40-token prompt: time,
    the exact top-10 cells (largest |prob - p_quantized|) found among the fast grid's exact
    cells, the estimate's rank correlation with the exact grid, equality of the exact cells."""
    import numpy as np

    n_tok = lab.encode(prompt).shape[1]
    lab.trace(prompt, target, plan, mode="fast", top=top)  # warm-up
    t = time.perf_counter()
    fast = lab.trace(prompt, target, plan, mode="fast", top=top)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    exact = lab.trace(prompt, target, plan)
    t_exact = time.perf_counter() - t
    effect = np.abs(exact.prob - exact.p_quantized).ravel()
    top10 = np.argsort(-effect, kind="stable")[:10]
    found = int(fast.exact.ravel()[top10].sum())
    corr = _rank_corr(fast.estimate, exact.prob)
    diff = float(np.max(np.abs(fast.prob - exact.prob)[fast.exact]))
    print(
        f"  fast mode, {n_tok} tokens x {lab.n_layers} layers, top {top}: {t_fast:.2f} s "
        f"(target <= 3 s) | exact grid {t_exact:.2f} s | ratio {t_exact / t_fast:.1f}x | "
        f"{int(fast.exact.sum())} exact cells of {fast.prob.size}"
    )
    print(
        f"  exact top-10 cells among the fast grid's exact cells: {found}/10 | rank correlation "
        f"of the estimate with the exact grid {corr:.3f} | best cell {fast.best_cell} vs "
        f"{exact.best_cell} | max |fast - exact| on exact cells {diff:.1e}"
    )
    return {
        "fast_s": t_fast,
        "exact_long_s": t_exact,
        "fast_ratio": t_exact / t_fast,
        "fast_tokens": n_tok,
        "fast_top10_found": found,
        "fast_rank_corr": corr,
        "fast_same_best_cell": fast.best_cell == exact.best_cell,
    }


def bench_trace(model_name: str = "smollm2-135m") -> dict:
    """The full "resid" causal-tracing grid at 4 bits g128: batched vs one forward per cell
    (last-position logits only: the fair loop; and the full-logits loop, the old baseline)."""
    import numpy as np
    import torch

    from qviz import Lab, QuantConfig, QuantPlan

    lab = Lab.load(model_name)
    prompt, target = "The Eiffel Tower is located in the city of", " Paris"
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
    lab.engine.materialize(plan)
    n_tok = lab.encode(prompt).shape[1]
    print(
        f"qviz bench trace: {model_name}, {n_tok} tokens x {lab.n_layers} layers, 4-bit g128, "
        f"component resid, torch threads {torch.get_num_threads()}"
    )
    lab.trace(prompt, target, plan)  # warm-up
    t = time.perf_counter()
    batched = lab.trace(prompt, target, plan)
    t_batched = time.perf_counter() - t
    fair, t_fair = fair_per_cell(lab, prompt, target, plan)
    t = time.perf_counter()
    loop = lab.trace(prompt, target, plan, method="per_cell")
    t_loop = time.perf_counter() - t
    diff = float(np.max(np.abs(batched.prob - loop.prob)))
    diff_fair = float(np.max(np.abs(batched.prob - fair)))
    print(
        f"  batched grid {t_batched:.2f} s | fair per-cell loop (last-position logits) "
        f"{t_fair:.2f} s ({batched.prob.size} forwards) | ratio {t_fair / t_batched:.1f}x "
        f"(target >= 20x)"
    )
    print(
        f"  old baseline, per-cell loop with full logits {t_loop:.2f} s | ratio "
        f"{t_loop / t_batched:.1f}x"
    )
    print(
        f"  max |batched - per-cell| = {max(diff, diff_fair):.2e} (must be <= 1e-4: "
        f"{'equal' if max(diff, diff_fair) <= 1e-4 else 'NOT EQUAL'}); p_reference "
        f"{batched.p_reference:.4f}, p_quantized {batched.p_quantized:.4f}, best recovery "
        f"{batched.best_recovery:.3f} at (layer, position) {batched.best_cell}"
    )
    fast = fast_vs_exact(lab, plan)
    return {
        **fast,
        "ratio": t_fair / t_batched,
        "ratio_of": "fair per-cell loop (last-position logits) / batched grid",
        "batched_s": t_batched,
        "fair_per_cell_s": t_fair,
        "full_logits_per_cell_s": t_loop,
        "full_logits_ratio": t_loop / t_batched,
        "max_diff": max(diff, diff_fair),
    }
