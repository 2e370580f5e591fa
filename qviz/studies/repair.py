"""The study's repair table (``Lab.repair_report``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qviz.data import load_facts
from qviz.quant.config import QuantPlan
from qviz.results import RepairReport
from qviz.studies.evaluate import evaluate, facts_of, next_token_stats

if TYPE_CHECKING:
    from qviz.lab import Lab


def repair_report(
    lab: Lab,
    plan: QuantPlan,
    prompts: list[dict] | None = None,
    alphas: Sequence[float] = (1, 2, 3, 5, 7, 9),
    protect_n: int = 2,
    protect_bits: int = 8,
    domino: Sequence[int] = (1, 2, 3, 4, 5, 6),
    calibration: list[dict] | None = None,
) -> RepairReport:
    """The study's repair table: accuracy on ``plan``'s Failure Subset under each repair.

    Failure Subset: the ``prompts`` (default: bundled facts) the reference answers right and
    ``plan`` wrong; its baseline accuracy is 0 by construction. Repairs:
    - source protection: ``QuantPlan.protect_first(plan.default, protect_n, protect_bits)``;
    - peak signal amplification: the residual stream leaving the peak layer multiplied by
      each alpha, on ``plan`` alone and on top of source protection (the study's cumulative
      column: 0 -> 67.91 -> 75.19 on Llama-3.1-8B at 4 bits);
    - domino test: ``QuantPlan.only_layers(plan.default, range(k))`` for each k in
      ``domino`` (also reported on the Robust Subset: reference right, plan right).

    Amplification procedure (the study does not publish its own; this is qviz's). The peak
    layer is chosen once per plan (``Lab.peak_layer``): under the quantized plan, the
    logit-lens probability of the correct answer at the last position is averaged over
    calibration facts and the decoder layer with the highest mean wins. Calibration facts
    are never scored: ``calibration`` if given, else the prompts outside the Failure Subset
    (the Robust Subset and the facts the reference gets wrong; if there are none, the
    bundled facts not among ``prompts``), so no evaluated answer steers the repair. Why
    this layer: it is where the quantized model's answer signal is strongest; later layers
    read the stream through a norm and add their (degraded) updates to it, so scaling the
    stream there by alpha weights the peak signal alpha times more against everything added
    afterwards. The last layer is not eligible: its output goes straight into the final norm,
    which cancels any scale (as scaling the logits cannot change a top-1 answer). Every alpha
    is reported; "best" is the best of them on the evaluated subset, as in the study's table.
    """
    if plan.default is None:
        raise ValueError(
            f"repair_report needs a plan with a default config (e.g. QuantPlan.uniform), "
            f"got {plan.label!r}"
        )
    cfg = plan.default
    facts, texts, tids = facts_of(lab, prompts)
    ev = evaluate(lab, plan, facts)
    fail = ev.failure_subset
    robust = sorted(set(ev.reference_correct) - set(fail))

    def acc(p: QuantPlan, idx: list[int], scale=None) -> float:
        if not idx:
            return float("nan")
        with lab.engine.quantized(p):
            ok, _ = next_token_stats(
                lab, [texts[i] for i in idx], [tids[i] for i in idx], scale=scale
            )
        return float(ok.mean())

    protect = QuantPlan.protect_first(cfg, n=protect_n, bits=protect_bits)
    if calibration is None:
        failed = set(fail)
        calibration = [f for i, f in enumerate(facts) if i not in failed]
        if not calibration:
            seen = set(texts)
            calibration = [f for f in load_facts() if f["prompt"] not in seen]
    peak = lab.peak_layer(plan, calibration)
    peak_p = lab.peak_layer(protect, calibration)
    ks = [int(k) for k in domino if 1 <= int(k) <= lab.n_layers]
    dom_plans = {k: QuantPlan.only_layers(cfg, range(k)) for k in ks}
    return RepairReport(
        plan_label=plan.label,
        n_failures=len(fail),
        baseline=acc(plan, fail),
        protected=acc(protect, fail),
        protect_label=protect.label,
        peak_layer=peak,
        amplification={float(a): acc(plan, fail, scale=(peak, float(a))) for a in alphas},
        protected_amplification={
            float(a): acc(protect, fail, scale=(peak_p, float(a))) for a in alphas
        },
        protected_peak_layer=peak_p,
        domino={k: acc(p, fail) for k, p in dom_plans.items()},
        domino_robust={k: acc(p, robust) for k, p in dom_plans.items()},
        n_robust=len(robust),
    )
