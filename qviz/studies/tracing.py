"""Causal tracing, layer isolation and the peak layer of signal amplification."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from qviz.cancel import check_cancel
from qviz.data import load_facts
from qviz.metrics.lens import logit_lens
from qviz.metrics.residual import residual_drift
from qviz.metrics.tracing import RECOVERY_EPS, recovery
from qviz.metrics.tracing import peak_layer as choose_peak
from qviz.probes.attrib import cells_to_refine, estimate_grid, target_grads
from qviz.probes.batch import left_pad
from qviz.probes.capture import isolated_outputs, last_states
from qviz.probes.patch import check_args, run_cache, trace_grid
from qviz.quant.config import QuantPlan
from qviz.results import Isolation, PatchGrid
from qviz.studies.evaluate import facts_of

if TYPE_CHECKING:
    from qviz.lab import Lab


def trace(
    lab: Lab,
    prompt: str,
    target: str | int,
    plan: QuantPlan,
    component: str = "resid",
    direction: str = "restore",
    window: int = 1,
    eps: float = RECOVERY_EPS,
    method: str = "batched",
    max_tokens: int = 4096,
    cancel: threading.Event | None = None,
    mode: str = "exact",
    top: int = 32,
) -> PatchGrid:
    """Causal tracing over every (decoder layer, position); see ``Lab.trace``. ``cancel`` is
    checked before each run and before each chunk of patched cells."""
    check_args(component, direction, window)
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode must be 'exact' or 'fast', got mode={mode!r}")
    if mode == "fast" and method != "batched":
        raise ValueError(f"mode='fast' patches its cells batched, got method={method!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an int >= 0, got top={top!r}")
    ids = lab.encode(prompt)
    tid = lab.target_id(target)
    restore = direction == "restore"
    check_cancel(cancel, "before the quantized run")
    with lab.engine.quantized(plan):
        q = run_cache(lab.model, lab.adapter, ids, tid, kv=restore)
    check_cancel(cancel, "before the reference run")
    with lab.engine.quantized(QuantPlan.none()):
        r = run_cache(lab.model, lab.adapter, ids, tid, kv=not restore)
    base, source, base_plan = (q, r, plan) if restore else (r, q, QuantPlan.none())
    exact = estimate = cells = None
    with lab.engine.quantized(base_plan):
        if mode == "fast":
            check_cancel(cancel, "before the attribution run")
            grads = target_grads(lab.model, lab.adapter, ids, tid)
            estimate = estimate_grid(base, source, grads, component, window)
            cells = cells_to_refine(estimate, base.prob, r.prob, q.prob, top)
        prob = trace_grid(
            lab.model,
            lab.adapter,
            ids,
            base,
            source,
            tid,
            component=component,
            window=window,
            max_tokens=max_tokens,
            method=method,
            cancel=cancel,
            cells=cells,
        )
    if estimate is not None:
        exact = ~np.isnan(prob)
        prob = np.where(exact, prob, estimate)
    rec, note = recovery(prob, r.prob, q.prob, eps=eps)
    return PatchGrid(
        prob=prob,
        recovery=rec,
        recovery_note=note,
        p_reference=r.prob,
        p_quantized=q.prob,
        tokens=[lab.tokenizer.decode([int(i)]) for i in ids[0]],
        target=lab.tokenizer.decode([tid]),
        component=component,
        direction=direction,
        window=window,
        plan_label=plan.label,
        exact=exact,
        estimate=estimate,
    )


def isolate(lab: Lab, prompt: str, plan: QuantPlan) -> Isolation:
    """The "perfect input" test (see ``Lab.isolate``)."""
    ids = lab.encode(prompt)
    cap = lab._acts.get((prompt, QuantPlan.none()))
    if cap is not None and cap.resid is not None:  # reuse compare()'s reference capture
        ref = cap.resid.to(lab.model.device, lab.model.dtype)
    else:
        with lab.engine.quantized(QuantPlan.none()):
            ref = run_cache(lab.model, lab.adapter, ids, 0).resid  # [L+1, T, D]
    with lab.engine.quantized(plan):
        q_out = isolated_outputs(lab.model, lab.adapter, ids, ref[:-1])
    cos, rel = residual_drift(ref[1:], q_out)
    dcos, drel = residual_drift(ref[1:] - ref[:-1], q_out - ref[:-1])
    return Isolation(
        cos.numpy(),
        rel.numpy(),
        plan.label,
        delta_cosine=dcos.numpy(),
        delta_rel_error=drel.numpy(),
    )


def lens_probs(lab: Lab, texts: list[str], tids: list[int], max_tokens: int = 4096) -> np.ndarray:
    """Logit-lens probability [N, L+1] of each target at its prompt's last position, under the
    active weights (left-padded batches of at most ``max_tokens`` tokens)."""
    norm, head = lab.adapter.unembedding(lab.model)
    softcap = lab.adapter.logit_softcap(lab.model)
    out = np.zeros((len(texts), lab.n_layers + 1))
    encoded = [lab.encode(p)[0] for p in texts]
    rows_per = max(1, max_tokens // max(len(e) for e in encoded))
    for s in range(0, len(texts), rows_per):
        chunk = list(range(s, min(s + rows_per, len(texts))))
        ids, kw = left_pad([encoded[i] for i in chunk], lab.model.device)
        states = last_states(lab.model, lab.adapter, ids, **kw)  # [L+1, B, D]
        tid = torch.tensor([tids[i] for i in chunk], device=lab.model.device)
        with torch.no_grad():
            for j, st in enumerate(states):
                logits = logit_lens(st, norm, head, softcap).float()
                prob = torch.softmax(logits, -1).gather(1, tid[:, None])[:, 0]
                out[chunk, j] = prob.cpu().numpy()
    return out


def peak_layer(
    lab: Lab, plan: QuantPlan, calibration: list[dict] | None = None, n_max: int = 32
) -> int:
    """The decoder layer whose output carries the most answer probability under ``plan``."""
    facts = calibration if calibration is not None else load_facts()
    if not facts:
        raise ValueError("peak_layer needs at least one calibration fact")
    if len(facts) > n_max:
        facts = [facts[i] for i in np.linspace(0, len(facts) - 1, n_max).round().astype(int)]
    _, texts, tids = facts_of(lab, facts)
    with lab.engine.quantized(plan):
        probs = lens_probs(lab, texts, tids)
    return choose_peak(probs)
