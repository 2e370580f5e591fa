"""The study's diagnostics of one plan against full precision (``Lab.compare``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from qviz import metrics
from qviz.data import load_facts
from qviz.metrics.cka import cka_with_reference
from qviz.probes.capture import AttentionReference, Capture, attention_params, capture
from qviz.quant.config import QuantPlan
from qviz.results import (
    AttentionStats,
    Comparison,
    FFNStats,
    LayerMap,
    LensCurve,
    LensTrajectory,
    ResidualStats,
    Verdict,
)

if TYPE_CHECKING:
    from qviz.lab import Lab


def activations(lab: Lab, prompt: str, plan: QuantPlan) -> Capture:
    """Residual, gate and MLP activations of ``prompt`` under ``plan`` plus per-layer attention
    statistics, computed as the forward runs: ``extra["entropy"]`` [L, H] and, for a plan other
    than full precision, ``extra["js"]`` [L, H] against the reference (whose capture also keeps
    ``attn_in`` [L, T, D] so the reference maps can be recomputed one layer at a time).
    Cached in ``lab`` per (prompt, plan)."""
    key = (prompt, plan)
    hit = lab._acts.get(key)
    if hit is not None:
        return hit
    ids = lab.encode(prompt)
    n, h = lab.n_layers, lab.model.config.num_attention_heads
    ent = np.zeros((n, h), dtype=np.float32)
    js = np.zeros((n, h), dtype=np.float32)

    def stats(i: int, probs: torch.Tensor, ref: torch.Tensor | None) -> None:
        ent[i] = metrics.normalized_entropy(probs)[0].cpu().numpy()
        if ref is not None:
            js[i] = metrics.js_divergence(ref, probs)[0].cpu().numpy()

    if plan == QuantPlan.none():
        with lab.engine.quantized(plan):
            what = ("resid", "gate", "mlp_out", "attn_in", "attn_stats")
            cap = capture(lab.model, lab.adapter, ids, what, on_attention=stats)
        if not torch.isfinite(cap.logits).all():
            raise RuntimeError(
                f"the full-precision forward of {lab.name!r} gave NaN or infinite logits: its "
                "weights file is most likely corrupt (e.g. a damaged download); delete the "
                "cached model files or run `qviz fetch` again"
            )
        cap.extra["entropy"] = torch.from_numpy(ent)
    else:
        ref_cap = activations(lab, prompt, QuantPlan.none())
        with lab.engine.quantized(QuantPlan.none()):
            params = attention_params(lab.model, lab.adapter)
        reference = AttentionReference(ref_cap.attn_in, params)
        with lab.engine.quantized(plan):
            cap = capture(lab.model, lab.adapter, ids, on_attention=stats, reference=reference)
        cap.extra["entropy"] = torch.from_numpy(ent)
        cap.extra["js"] = torch.from_numpy(js)
    lab._acts.put(key, cap)
    return cap


def lens_curve(lab: Lab, cap: Capture, tid: int) -> LensCurve:
    """Logit lens of ``tid`` at the last position of every residual state of ``cap``."""
    norm, head = lab.adapter.unembedding(lab.model)
    softcap = lab.adapter.logit_softcap(lab.model)
    states = cap.resid[:, -1].to(lab.model.device, next(head.parameters()).dtype)
    with torch.no_grad():
        logits = metrics.logit_lens(states, norm, head, softcap=softcap).float().cpu()
    prob, rank, logit = metrics.target_stats(logits, tid)
    ids, _ = metrics.topk_tokens(logits, k=5)
    tops = [[lab.tokenizer.decode([int(t)]) for t in row] for row in ids]
    return LensCurve(prob.numpy(), rank.numpy(), logit.numpy(), tops)


def context_prompts(n: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` bundled fact prompts, evenly spaced over the facts, none of ``exclude``."""
    seen = set(exclude)
    pool = [f["prompt"] for f in load_facts() if f["prompt"] not in seen]
    if n > len(pool):
        raise ValueError(f"cka_context={n} asks for more than the {len(pool)} bundled prompts")
    return [pool[i] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)]


def context_resid(lab: Lab, plan: QuantPlan, prompts: list[str]) -> torch.Tensor:
    """Residual states [L+1, N, D] of the context ``prompts`` under ``plan``, each prompt's
    first (attention-sink) position left out; cached in ``lab`` per (plan, prompts)."""
    key = ("context", plan, tuple(prompts))
    hit = lab._acts.get(key)
    if hit is None:
        parts = []
        with lab.engine.quantized(plan):
            for p in prompts:
                parts.append(capture(lab.model, lab.adapter, lab.encode(p), ("resid",)).resid)
        hit = Capture(logits=torch.zeros(0), resid=torch.cat([r[:, 1:] for r in parts], dim=1))
        lab._acts.put(key, hit)
    return hit.resid


def per_layer(metric, ref: torch.Tensor, quant: torch.Tensor) -> np.ndarray:
    """``metric`` [L] of [L, N, F] pairs, one layer at a time (bounded float64 temporaries)."""
    return torch.cat([metric(ref[i : i + 1], quant[i : i + 1]) for i in range(len(ref))]).numpy()


def compare(
    lab: Lab,
    prompt: str | Sequence[str],
    target: str | int,
    plan: QuantPlan,
    cka_estimator: str = "biased",
    drop_first: bool = False,
    isolation: bool = True,
    cka_context: int = 0,
) -> Comparison:
    """Every diagnostic of ``plan`` against full precision (see ``Lab.compare``)."""
    from qviz.studies.tracing import isolate

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("compare needs at least one prompt")
    if isinstance(cka_context, bool) or not isinstance(cka_context, int) or cka_context < 0:
        raise ValueError(f"cka_context must be an int >= 0, got cka_context={cka_context!r}")
    tid = lab.target_id(target)
    n = lab.n_layers
    ref = [activations(lab, p, QuantPlan.none()) for p in prompts]
    qnt = [activations(lab, p, plan) for p in prompts]
    s = 1 if drop_first else 0

    def pool(caps, field, start=s):  # one prompt: a view, no copy
        parts = [getattr(c, field)[:, start:] for c in caps]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    ref_res, q_res = pool(ref, "resid"), pool(qnt, "resid")
    if cka_context:
        ctx = context_prompts(cka_context, exclude=prompts)
        cka_r = torch.cat([pool(ref, "resid", 1), context_resid(lab, QuantPlan.none(), ctx)], 1)
        cka_q = torch.cat([pool(qnt, "resid", 1), context_resid(lab, plan, ctx)], 1)
    else:
        cka_r, cka_q = ref_res, q_res
    if cka_estimator == "biased":  # one pass, Gram rows in blocks
        values, self_map = cka_with_reference(cka_r, cka_q)
    else:
        values = metrics.cka_matrix(cka_r, cka_q, estimator=cka_estimator)
        self_map = metrics.cka_matrix(cka_r, cka_r, estimator=cka_estimator)
    cka = LayerMap(
        values.numpy(),
        n_samples=cka_r.shape[1],
        estimator=cka_estimator,
        reference=self_map.numpy(),
        n_prompts=len(prompts) + cka_context,
        drop_first=bool(drop_first or cka_context),
    )
    lens = LensTrajectory(
        lens_curve(lab, ref[0], tid), lens_curve(lab, qnt[0], tid), lab.tokenizer.decode([tid])
    )
    ent_r = np.mean([c.extra["entropy"].numpy() for c in ref], axis=0)
    ent_q = np.mean([c.extra["entropy"].numpy() for c in qnt], axis=0)
    js = np.mean([c.extra.get("js", torch.zeros(ent_q.shape)).numpy() for c in qnt], axis=0)
    attention = AttentionStats(ent_r, ent_q, js)
    rg, qg = pool(ref, "gate"), pool(qnt, "gate")
    ffn = FFNStats(
        per_layer(metrics.sign_flip_rate, rg, qg),
        per_layer(metrics.topk_jaccard, rg, qg),
        per_layer(metrics.output_cosine, pool(ref, "mlp_out"), pool(qnt, "mlp_out")),
    )
    drift = [metrics.residual_drift(ref_res[i : i + 1], q_res[i : i + 1]) for i in range(n + 1)]
    residual = ResidualStats(*(torch.cat(x).numpy() for x in zip(*drift, strict=True)))
    mid = slice(n // 3, max(n // 3 + 1, 2 * n // 3))
    iso = isolate(lab, prompts[0], plan) if isolation else None
    verdict = Verdict(
        *metrics.verdict(
            cka.values.diagonal(),
            int(lens.reference.rank[-1]),
            int(lens.quantized.rank[-1]),
            ffn.flip_rate,
            float(ent_q[mid].mean()),
            isolation_delta_cosine=None if iso is None else iso.delta_cosine,
            p_reference=float(lens.reference.prob[-1]),
            p_quantized=float(lens.quantized.prob[-1]),
            target=lens.target,
            reference_entropy_mid=float(ent_r[mid].mean()),
        )
    )
    return Comparison(
        plan.label, prompts, cka, lens, attention, ffn, residual, verdict, isolation=iso
    )
