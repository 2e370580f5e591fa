"""The study's diagnostics of one plan against full precision (``Lab.compare``)."""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from qviz import metrics
from qviz.cancel import check_cancel
from qviz.data import load_facts
from qviz.metrics.cka import GramSide, cka_with_reference
from qviz.probes.batch import left_pad, length_batches, token_batches
from qviz.probes.capture import (
    AttentionReference,
    Capture,
    attention_params,
    capture_batch,
    capture_packed,
    isolated_outputs,
    packs,
    pad_states,
)
from qviz.quant.config import QuantPlan
from qviz.results import (
    AttentionStats,
    Comparison,
    FFNStats,
    Isolation,
    LayerMap,
    LensCurve,
    LensTrajectory,
    ResidualStats,
    Verdict,
)

if TYPE_CHECKING:
    from qviz.lab import Lab

BATCH_TOKENS = 512  # padded tokens per batched capture: ~0.4 MB of activations per token
PAD_TOKENS = 32  # padding worth one more forward (see length_batches' max_pad)
LAYER_ELEMENTS = 1 << 21  # activation elements per call of a float64 per-layer metric (16 MB)
STATS_ELEMENTS = 1 << 20  # attention-map elements per entropy/JS call (4 MB in float32)


def weights_key(lab: Lab) -> str:
    """The model's current weights, as cache keys see them: a digest of each parameter's
    storage and version (an in-place edit bumps it; a swapped-in plan changes the storage).
    Read under the engine's lock: never the weights of another thread's ``quantized`` block."""
    with lab.engine.lock:
        pairs = [(p.data_ptr(), p._version) for p in lab.model.parameters()]
    return hashlib.blake2b(np.asarray(pairs, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def _keeps_maps(lab: Lab, n_tokens: int) -> bool:
    """Whether a reference capture of ``n_tokens`` keeps its attention maps [L, H, T, T] rather
    than the attention inputs [L, T, D]: when T H <= D, the maps are no larger, and the
    quantized run then needs no recomputation of the reference's attention (its q/k/v/o
    projections: a quarter of a forward's Linear work)."""
    cfg = lab.model.config
    return n_tokens * cfg.num_attention_heads <= cfg.hidden_size


def _stats_of(lengths: list[int], ent: list, js: list, ref_maps: list | None = None):
    """An ``on_attention`` callback filling per-prompt entropy and JS [L, H] of a left-padded
    batch (row b's maps: its last n_b queries and keys; neighbouring rows of one length in one
    call). The reference maps of row b are ``ref_maps[b][layer]`` [H, n_b, n_b] where every row
    of its run has them, else the recomputed ones."""

    def put(out: list, b0: int, i: int, hs: slice, values: torch.Tensor) -> None:
        for b, v in enumerate(values.cpu().numpy(), start=b0):
            out[b][i, hs] = v

    runs: list[tuple[int, int]] = []  # rows of equal length next to each other: one call each
    for b, n in enumerate(lengths):
        if runs and lengths[runs[-1][0]] == n:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))

    def stats(i: int, probs: torch.Tensor, ref: torch.Tensor | None) -> None:
        width, heads = probs.shape[-1], probs.shape[1]
        for b0, b1 in runs:
            n = lengths[b0]
            own = slice(width - n, None)
            kept = None
            if ref_maps is not None and all(ref_maps[b] is not None for b in range(b0, b1)):
                kept = torch.stack([ref_maps[b][i] for b in range(b0, b1)])
            # a few heads at a time: the metrics' float32 temporaries (~5 maps for JS) stay at
            # ~STATS_ELEMENTS each instead of [rows, H, n, n] (at 1,024 tokens 38 MB apiece)
            step = max(1, STATS_ELEMENTS // ((b1 - b0) * n * n))
            for h0 in range(0, heads, step):
                hs = slice(h0, h0 + step)
                p = probs[b0:b1, hs, own, own]
                put(ent, b0, i, hs, metrics.normalized_entropy(p))
                if kept is not None:
                    r = kept[:, hs]
                elif ref is not None:
                    r = ref[b0:b1, hs, own, own]
                else:
                    continue
                put(js, b0, i, hs, metrics.js_divergence(r, p))

    return stats


def _capture_batch(
    lab: Lab, prompts: list[str], plan: QuantPlan, key: tuple, isolate: str | None = None
) -> list[Capture]:
    """One left-padded forward of ``prompts`` under ``plan`` (see ``activations``); the
    isolation test of ``isolate`` rides along as one more row when it widens nothing (see
    ``activations_many``)."""
    seqs = [lab.encode(p)[0] for p in prompts]
    lengths = [len(s) for s in seqs]
    n, h = lab.n_layers, lab.model.config.num_attention_heads
    ent = [np.zeros((n, h), dtype=np.float32) for _ in prompts]
    js = [np.zeros((n, h), dtype=np.float32) for _ in prompts]
    if plan == QuantPlan.none():
        maps = [_keeps_maps(lab, t) for t in lengths]
        what = ("resid", "gate", "mlp_out", "attn_stats")
        what += ("attn",) * any(maps) + ("attn_in",) * (not all(maps))
        with lab.engine.quantized(plan):
            caps = capture_batch(
                lab.model, lab.adapter, seqs, what, on_attention=_stats_of(lengths, ent, js)
            )
        for cap, keep in zip(caps, maps, strict=True):  # each keeps one of the two
            if keep:
                cap.attn_in = None
            else:
                cap.attn = None
        if not all(torch.isfinite(c.logits).all() for c in caps):
            raise RuntimeError(
                f"the full-precision forward of {lab.name!r} gave NaN or infinite logits: its "
                "weights file is most likely corrupt (e.g. a damaged download); delete the "
                "cached model files or run `qviz fetch` again"
            )
    else:
        refs = activations_many(lab, prompts, QuantPlan.none())
        ref_maps = [r.attn for r in refs]
        reference = None
        if any(m is None for m in ref_maps):  # recompute the maps of the long ones
            with lab.engine.quantized(QuantPlan.none()):
                params = attention_params(lab.model, lab.adapter)
            ins = [
                r.attn_in if r.attn_in is not None else r.resid.new_zeros(r.resid[1:].shape)
                for r in refs
            ]  # (a short one's zeros are never read: its kept maps are)
            reference = AttentionReference(ins[0] if len(ins) == 1 else pad_states(ins), params)
        fed, iso_ref = None, None
        if isolate is not None and reference is None:
            iso_ref = activations(lab, isolate, QuantPlan.none())
            n_iso = iso_ref.resid.shape[1]
            if iso_ref.attn is not None and n_iso <= max(lengths):  # a row that widens nothing
                seqs.append(lab.encode(isolate)[0])
                lengths.append(n_iso)
                ref_maps.append(iso_ref.attn)
                ent.append(np.zeros((n, h), dtype=np.float32))
                js.append(np.zeros((n, h), dtype=np.float32))
                fed = {len(seqs) - 1: iso_ref.resid[:-1]}
        stats = _stats_of(lengths, ent, js, ref_maps)
        with lab.engine.quantized(plan):
            caps = capture_batch(
                lab.model, lab.adapter, seqs, on_attention=stats, reference=reference, fed=fed
            )
        if fed is not None:
            out = caps.pop().resid[1:]
            lab._acts.put(
                ("isolation", isolate, plan, key), isolation_of(iso_ref.resid, out, plan.label)
            )
    for b, cap in enumerate(caps):
        cap.extra["entropy"] = torch.from_numpy(ent[b])
        if plan != QuantPlan.none():
            cap.extra["js"] = torch.from_numpy(js[b])
        cap.extra["weights"] = key
    return caps


def activations_many(
    lab: Lab,
    prompts: Sequence[str],
    plan: QuantPlan,
    max_tokens: int = BATCH_TOKENS,
    isolate: str | None = None,
) -> list[Capture]:
    """``activations`` of each prompt; the ones not cached run in left-padded batches of at
    most ``max_tokens`` padded tokens, a new batch rather than pad the rows already in one by
    more than ``PAD_TOKENS`` at once (one forward per batch, equal to one-prompt forwards up to
    float rounding).

    ``isolate``: a prompt whose isolation test under ``plan`` (``isolation_many``) is not
    cached yet rides along in the first batch as one more row, fed the reference's inputs,
    when the reference keeps its attention maps and the row widens nothing (a forward saved:
    short prompts cost a forward's weight reads whatever their rows); cached as
    ``isolation_many`` caches it."""
    key = weights_key(lab)
    found: dict[str, Capture] = {}
    for p in dict.fromkeys(prompts):
        cap = lab._acts.get((p, plan))
        if cap is not None and cap.extra.get("weights") == key:
            found[p] = cap
    missing = [p for p in dict.fromkeys(prompts) if p not in found]
    lengths = [lab.encode(p).shape[1] for p in missing]
    if isolate is not None and (
        plan == QuantPlan.none() or ("isolation", isolate, plan, key) in lab._acts
    ):
        isolate = None
    for batch in length_batches(lengths, max_tokens, PAD_TOKENS):
        group = [missing[i] for i in batch]
        caps = _capture_batch(lab, group, plan, key, isolate)
        isolate = None
        for p, cap in zip(group, caps, strict=True):
            lab._acts.put((p, plan), cap)
            found[p] = cap
    return [found[p] for p in prompts]


def activations(lab: Lab, prompt: str, plan: QuantPlan) -> Capture:
    """Residual, gate and MLP activations of ``prompt`` under ``plan`` plus per-layer attention
    statistics, computed as the forward runs: ``extra["entropy"]`` [L, H] and, for a plan other
    than full precision, ``extra["js"]`` [L, H] against the reference (whose capture also keeps
    either its attention maps ``attn`` [L, H, T, T] when T H <= D, or ``attn_in`` [L, T, D] so
    the reference maps can be recomputed one layer at a time, whichever is smaller).
    Cached in ``lab`` per (prompt, plan), valid while the model's weights are unchanged
    (``extra["weights"]``, see ``weights_key``)."""
    return activations_many(lab, [prompt], plan)[0]


@dataclass
class LensData:
    """The logit lens at the last position of every residual state of one run, whatever the
    target: logits [L+1, V] float32, their logsumexp [L+1] and the top-5 tokens' text."""

    logits: torch.Tensor
    lse: torch.Tensor
    tops: list[list[str]]

    def curve(self, tid: int) -> LensCurve:
        logit = self.logits[:, tid]
        prob = torch.exp(logit - self.lse)
        rank = (self.logits > logit[:, None]).sum(-1) + 1
        return LensCurve(prob.numpy(), rank.numpy(), logit.numpy(), self.tops)


def lens_many(lab: Lab, prompts: Sequence[str], plan: QuantPlan, chunk: int = 8) -> list[LensData]:
    """``LensData`` of each prompt under ``plan``, cached in ``lab`` per (prompt, plan, weights);
    the missing ones are computed ``chunk`` prompts per unembedding matmul."""
    key = weights_key(lab)
    found = {p: lab._acts.get(("lens", p, plan, key)) for p in dict.fromkeys(prompts)}
    missing = [p for p, v in found.items() if v is None]
    caps = activations_many(lab, missing, plan)
    norm, head = lab.adapter.unembedding(lab.model)
    softcap = lab.adapter.logit_softcap(lab.model)
    dtype = next(head.parameters()).dtype
    for s in range(0, len(missing), chunk):
        group = caps[s : s + chunk]
        states = torch.cat([c.resid[:, -1] for c in group]).to(lab.model.device, dtype)
        with torch.no_grad():
            logits = metrics.logit_lens(states, norm, head, softcap=softcap).float().cpu()
        for p, lg in zip(missing[s : s + chunk], logits.split(lab.n_layers + 1), strict=True):
            ids, _ = metrics.topk_tokens(lg, k=5)
            tops = [[lab.tokenizer.decode([int(t)]) for t in row] for row in ids]
            found[p] = LensData(lg.clone(), torch.logsumexp(lg, -1), tops)
            lab._acts.put(("lens", p, plan, key), found[p])
    return [found[p] for p in prompts]


def isolation_many(
    lab: Lab, prompts: Sequence[str], plan: QuantPlan, max_tokens: int = BATCH_TOKENS
) -> list[Isolation]:
    """The "perfect input" test (``Lab.isolate``) of each prompt under ``plan``, cached in
    ``lab`` per (prompt, plan, weights); the missing ones in left-padded batches, each layer
    fed the cached reference capture's input."""
    key = weights_key(lab)
    found = {p: lab._acts.get(("isolation", p, plan, key)) for p in dict.fromkeys(prompts)}
    missing = [p for p, v in found.items() if v is None]
    seqs = [lab.encode(p)[0] for p in missing]
    for batch in length_batches([len(s) for s in seqs], max_tokens, PAD_TOKENS):
        group = [missing[i] for i in batch]
        refs = [c.resid for c in activations_many(lab, group, QuantPlan.none())]
        dev, dt = lab.model.device, lab.model.dtype
        ids, kw = left_pad([seqs[i] for i in batch], dev)
        inputs = refs[0][:-1] if len(refs) == 1 else pad_states([r[:-1] for r in refs])
        with lab.engine.quantized(plan):
            out = isolated_outputs(lab.model, lab.adapter, ids, inputs.to(dev, dt), **kw)
        for b, (p, ref) in enumerate(zip(group, refs, strict=True)):
            q = out if len(refs) == 1 else out[:, b, ids.shape[1] - ref.shape[1] :]
            found[p] = isolation_of(ref.to(dev, dt), q, plan.label)
            lab._acts.put(("isolation", p, plan, key), found[p])
    return [copy.deepcopy(found[p]) for p in prompts]


def isolation_of(ref: torch.Tensor, q_out: torch.Tensor, label: str) -> Isolation:
    """Isolation from the reference's residual states [L+1, T, D] and the quantized layers'
    outputs [L, T, D] on the reference inputs, one layer at a time (float64 temporaries of one
    layer, not of all: at 1,024 tokens that is ~0.4 GB less at the peak)."""
    out = []
    for i in range(len(q_out)):
        inp, r, q = ref[i : i + 1], ref[i + 1 : i + 2], q_out[i : i + 1]
        out.append((*metrics.residual_drift(r, q), *metrics.residual_drift(r - inp, q - inp)))
    cos, rel, dcos, drel = (torch.cat(x).cpu().numpy() for x in zip(*out, strict=True))
    return Isolation(cos, rel, label, delta_cosine=dcos, delta_rel_error=drel)


def context_prompts(n: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` bundled fact prompts, evenly spaced over the facts, none of ``exclude``."""
    seen = set(exclude)
    pool = [f["prompt"] for f in load_facts() if f["prompt"] not in seen]
    if n > len(pool):
        raise ValueError(f"cka_context={n} asks for more than the {len(pool)} bundled prompts")
    return [pool[i] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)]


def context_resid(
    lab: Lab,
    plan: QuantPlan,
    prompts: list[str],
    cancel: threading.Event | None = None,
    isolate: str | None = None,
) -> torch.Tensor:
    """Residual states [L+1, N, D] of the context ``prompts`` under ``plan``, each prompt's
    first (attention-sink) position left out; cached in ``lab`` per (plan, prompts, weights).
    Computed with the prompts packed end to end, one forward per ``BATCH_TOKENS`` real tokens
    (no padding: at 32 bundled prompts 265 tokens instead of 416), or in left-padded batches
    for a model that does not keep packed sequences apart; ``cancel`` checked before each.

    ``isolate``: a prompt whose isolation test under ``plan`` is not cached yet rides along in
    the last packed forward when it fits (fed the reference's inputs, ``capture_packed``'s
    ``fed``: a few more tokens instead of a forward of its own), cached as ``isolation_many``
    caches it."""
    wkey = weights_key(lab)
    key = ("context", plan, tuple(prompts), wkey)
    hit = lab._acts.get(key)
    if hit is not None:
        return hit.resid
    seqs = [lab.encode(p)[0] for p in prompts]
    lengths = [len(x) for x in seqs]
    parts: list[torch.Tensor | None] = [None] * len(seqs)
    with lab.engine.lock:  # (its probe forward hooks the shared model: no other forward now)
        packed = packs(lab.model, lab.adapter)
    if packed:
        batches = list(token_batches(lengths, BATCH_TOKENS))
    else:
        batches = list(length_batches(lengths, BATCH_TOKENS, PAD_TOKENS))
    iso_key = ("isolation", isolate, plan, wkey)
    ref = None
    if packed and isolate is not None and plan != QuantPlan.none() and iso_key not in lab._acts:
        ref = activations(lab, isolate, QuantPlan.none()).resid
        if sum(lengths[i] for i in batches[-1]) + ref.shape[1] > BATCH_TOKENS:
            ref = None
    with lab.engine.quantized(plan):
        for j, batch in enumerate(batches):
            check_cancel(cancel, "during the CKA context runs")
            group = [seqs[i] for i in batch]
            if not packed:
                caps = capture_batch(lab.model, lab.adapter, group, ("resid",))
            elif ref is None or j < len(batches) - 1:
                caps = capture_packed(lab.model, lab.adapter, group, ("resid",), logits=False)
            else:
                group.append(lab.encode(isolate)[0])
                fed = {len(batch): ref[:-1]}
                caps = capture_packed(lab.model, lab.adapter, group, ("resid",), False, fed)
                lab._acts.put(iso_key, isolation_of(ref, caps.pop().resid[1:], plan.label))
            for i, c in zip(batch, caps, strict=True):
                parts[i] = c.resid[:, 1:]
    hit = Capture(logits=torch.zeros(0), resid=torch.cat(parts, dim=1))
    lab._acts.put(key, hit)
    return hit.resid


def per_layer(metric, ref: torch.Tensor, quant: torch.Tensor) -> np.ndarray:
    """``metric`` [L] of [L, N, F] pairs, as many layers per call as fit in ``LAYER_ELEMENTS``
    (bounded float64 temporaries; one layer at a time for long prompts)."""
    step = max(1, LAYER_ELEMENTS // max(1, ref[0].numel()))
    parts = [metric(ref[i : i + step], quant[i : i + step]) for i in range(0, len(ref), step)]
    return torch.cat(parts).numpy()


def _targets(target, n: int) -> list:
    if isinstance(target, (str, int, np.integer)):
        return [target] * n
    targets = list(target)
    if len(targets) != n:
        raise ValueError(f"{len(targets)} targets for {n} prompts: give one target or one each")
    return targets


def compare_many(
    lab: Lab,
    prompts: Sequence[str],
    targets: str | int | Sequence[str | int],
    plan: QuantPlan,
    cancel: threading.Event | None = None,
    **options,
) -> list[Comparison]:
    """``compare(prompts[i], targets[i], plan, **options)`` for every i (``targets``: one for
    all or one per prompt), the forwards, logit lenses and isolation tests of all prompts
    batched (one left-padded forward per plan and per batch of at most ``BATCH_TOKENS`` tokens,
    a new batch rather than pad the rows already in one by more than ``PAD_TOKENS`` at once)."""
    prompts = list(prompts)
    targets = _targets(targets, len(prompts))
    if not prompts:
        return []
    for p in (QuantPlan.none(), plan):
        check_cancel(cancel, f"before the {p.label} runs")
        activations_many(lab, prompts, p)
        lens_many(lab, prompts, p)
    if options.get("isolation", True):
        check_cancel(cancel, "before the isolation runs")
        isolation_many(lab, prompts, plan)
    return [
        compare(lab, p, t, plan, cancel=cancel, **options)
        for p, t in zip(prompts, targets, strict=True)
    ]


def compare(
    lab: Lab,
    prompt: str | Sequence[str],
    target: str | int,
    plan: QuantPlan,
    cka_estimator: str = "biased",
    drop_first: bool = False,
    isolation: bool = True,
    cka_context: int = 0,
    cancel: threading.Event | None = None,
) -> Comparison:
    """Every diagnostic of ``plan`` against full precision (see ``Lab.compare``). The result is
    cached in ``lab`` per (prompts, target, plan, options, weights); every call returns a copy
    of its own. ``cancel`` is checked before each forward pass."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("compare needs at least one prompt")
    if isinstance(cka_context, bool) or not isinstance(cka_context, int) or cka_context < 0:
        raise ValueError(f"cka_context must be an int >= 0, got cka_context={cka_context!r}")
    tid = lab.target_id(target)
    options = (cka_estimator, bool(drop_first), bool(isolation), cka_context)
    key = ("compare", tuple(prompts), tid, plan, options, weights_key(lab))
    hit = lab._acts.get(key)
    if hit is None:
        hit = _compare(lab, prompts, tid, plan, *options, cancel)
        lab._acts.put(key, hit)
    return copy.deepcopy(hit)


def _compare(
    lab: Lab,
    prompts: list[str],
    tid: int,
    plan: QuantPlan,
    cka_estimator: str,
    drop_first: bool,
    isolation: bool,
    cka_context: int,
    cancel: threading.Event | None,
) -> Comparison:
    n = lab.n_layers
    check_cancel(cancel, "before the reference run")
    ref = activations_many(lab, prompts, QuantPlan.none())
    check_cancel(cancel, "before the quantized run")
    qnt = activations_many(lab, prompts, plan, isolate=prompts[0] if isolation else None)
    s = 1 if drop_first else 0

    def pool(caps, field, start=s):  # one prompt: a view, no copy
        parts = [getattr(c, field)[:, start:] for c in caps]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    ref_res, q_res = pool(ref, "resid"), pool(qnt, "resid")
    if cka_context:
        ctx = context_prompts(cka_context, exclude=prompts)
        check_cancel(cancel, "before the CKA context runs")
        ctx_r = context_resid(lab, QuantPlan.none(), ctx, cancel)
        ctx_q = context_resid(lab, plan, ctx, cancel, isolate=prompts[0] if isolation else None)
        cka_r = torch.cat([pool(ref, "resid", 1), ctx_r], 1)
        cka_q = torch.cat([pool(qnt, "resid", 1), ctx_q], 1)
    else:
        cka_r, cka_q = ref_res, q_res
    if cka_estimator == "biased":
        ref_side = cka_r
        if GramSide.fits(cka_r):  # the reference's Grams: once per prompt set, not per plan
            side_key = ("cka reference", tuple(prompts), s, cka_context, weights_key(lab))
            ref_side = lab._acts.get(side_key)
            if ref_side is None:
                ref_side = GramSide(cka_r)
                lab._acts.put(side_key, ref_side)
        values, self_map = cka_with_reference(ref_side, cka_q)
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
    (lens_r,), (lens_q,) = (
        lens_many(lab, prompts[:1], QuantPlan.none()),
        lens_many(lab, prompts[:1], plan),
    )
    lens = LensTrajectory(lens_r.curve(tid), lens_q.curve(tid), lab.tokenizer.decode([tid]))
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
    check_cancel(cancel, "before the logit lens and the isolation run")
    iso = isolation_many(lab, prompts[:1], plan)[0] if isolation else None
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
