"""Prescription: the sensitivity table + exact allocation against the greedy one-layer-at-a-time
KL search, in the same run, on the same calibration windows and options."""

from __future__ import annotations

import os
import time

BUDGET = 3.5
CANDIDATES = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
CALIB_TOKENS = 256
WINDOW = 128
EVAL_CHARS = 10_000


def greedy_top_k(n_layers: int) -> int | None:
    """The greedy's bound: QVIZ_BENCH_GREEDY_TOP_K (0 = the full search), else the full search
    up to 8 layers and 2 re-measures per raise above (the full search on a 30-layer model is
    about L forwards per raise, over a hundred raises: hours on a CPU)."""
    given = os.environ.get("QVIZ_BENCH_GREEDY_TOP_K")
    if given is not None:
        return int(given) or None
    return None if n_layers <= 8 else 2


def bench_prescribe(model_name: str = "smollm2-135m") -> dict:
    """``lab.prescribe`` at 3.5 bits (rtn x bits 2,3,4,8 x group sizes 32,64,128) vs the greedy
    KL search over the same options: seconds and forward passes of each, the ratio, and both
    plans' calibration KL and held-out perplexity; then the cached repeat and a new budget
    (what a dashboard slider costs)."""
    import torch

    from qviz import Lab
    from qviz.quant.memory import footprint
    from qviz.studies import prescribe as P

    lab = Lab.load(model_name)
    top_k = greedy_top_k(lab.n_layers)
    greedy_name = "full greedy" if top_k is None else f"greedy bounded to top-{top_k} per raise"
    print(
        f"qviz bench prescribe: {model_name}, {lab.n_layers} layers, budget {BUDGET} bits/weight, "
        f"candidates {CANDIDATES} x group sizes {GROUP_SIZES}, {CALIB_TOKENS} calibration "
        f"tokens, {greedy_name}, torch threads {torch.get_num_threads()}"
    )
    P.clear_cache(lab)
    kw = {
        "candidates": CANDIDATES,
        "group_size": GROUP_SIZES,
        "n_calib_tokens": CALIB_TOKENS,
        "window": WINDOW,
    }
    t = time.perf_counter()
    rx = lab.prescribe(BUDGET, baselines=False, check=False, **kw)
    t_rx = time.perf_counter() - t
    t = time.perf_counter()
    lab.prescribe(BUDGET, baselines=False, check=False, **kw)
    t_repeat = time.perf_counter() - t
    t = time.perf_counter()
    lab.prescribe(BUDGET - 0.5, baselines=False, check=False, **kw)
    t_new_budget = time.perf_counter() - t

    options = P.options_of(("rtn",), CANDIDATES, GROUP_SIZES)
    costs = P.layer_costs(lab, options)
    budget = BUDGET * P.decoder_params(lab)
    ids = P.calibration_ids(lab, P.split_text()[0], CALIB_TOKENS, WINDOW)
    t = time.perf_counter()
    meter = P.KLMeter(lab, ids, check_suffix=False)
    g_plan = P.plan_of(P.greedy_search(meter, costs, options, budget, top_k=top_k), options)
    t_greedy = time.perf_counter() - t
    g_passes = meter.forward_passes

    held = P.split_text()[1][:EVAL_CHARS]
    scores = {}
    for name, plan in (("prescribed", rx.plan), ("greedy", g_plan)):
        scores[name] = {
            "effective_bits": footprint(lab.model, plan, include_embeddings=False).effective_bits,
            "calib_kl": meter(plan),
            "perplexity": lab.perplexity(plan, text=held),
        }
    for name, secs, passes in (
        ("prescribe", t_rx, rx.forward_passes),
        (greedy_name, t_greedy, g_passes),
    ):
        s = scores["prescribed" if name == "prescribe" else "greedy"]
        print(
            f"  {name}: {secs:.1f} s, {passes} forward passes -> {s['effective_bits']:.4f} "
            f"bits/weight, calibration KL {s['calib_kl']:.4f}, held-out perplexity "
            f"{s['perplexity']:.1f}"
        )
    print(
        f"  ratio greedy / prescribe: {t_greedy / t_rx:.1f}x time, "
        f"{g_passes / rx.forward_passes:.1f}x forward passes"
    )
    print(
        f"  slider: the same call again {1000 * t_repeat:.1f} ms (cached), budget "
        f"{BUDGET - 0.5} next {t_new_budget:.2f} s (allocation, its plan and the uniform "
        "plans measured whole, the refinement)"
    )
    return {
        "ratio": t_greedy / t_rx,
        "ratio_of": f"{greedy_name} / prescribe (seconds)",
        "prescribe_s": t_rx,
        "greedy_s": t_greedy,
        "prescribe_forward_passes": rx.forward_passes,
        "greedy_forward_passes": g_passes,
        "greedy_top_k": top_k,
        "repeat_call_s": t_repeat,
        "new_budget_s": t_new_budget,
        "scores": scores,
    }
