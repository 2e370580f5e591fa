"""The one rule that names a failure mode, with its thresholds, their sources and its words.

The study (arXiv 2604.19884) reports, for Llama-3.1-8B and three other 7-9B models:
- 4 bits (signal degradation): the CKA diagonal stays clear, and the correct answer stays in the
  logit-lens top 5 at the last layers, with a weaker probability;
- 2 bits (computation collapse): CKA near zero almost everywhere, the answer's rank falls into the
  thousands, FFN gate sign flips exceed 30% ("severe"), and normalized attention entropy exceeds
  0.80 in middle layers; its "perfect input" test finds layers that compute wrongly even when fed
  the full-precision input.

The rule, on the evidence of one comparison (every threshold below, with its source):
1. The full-precision model must rank the target in its top ``REFERENCE_TOP`` (the study scores
   the top 5); otherwise there is no quantization verdict, only a warning: pick another target.
2. Collapse signs: CKA goes dark, answer rank in the thousands, severe gate sign flips, high
   mid-layer attention entropy, layers broken on a perfect input. At least ``COLLAPSE_SIGNS`` of
   them: "computation collapse".
3. Otherwise any collapse sign, or any degradation sign -- CKA diagonal below ``HEALTHY_CKA``,
   answer rank worse than full precision, answer probability below ``PROB_DROP`` times full
   precision's -- makes "signal degradation".
4. Otherwise "healthy".

``verdict`` returns (mode, evidence); ``signs``, ``sentence`` and ``warning`` read that evidence
back into labelled signs and words (``qviz.results.Verdict`` exposes them), so the rule and its
explanation cannot disagree.
"""

from __future__ import annotations

import operator

import numpy as np

HEALTHY = "healthy"
DEGRADATION = "signal degradation"
COLLAPSE = "computation collapse"
NO_VERDICT = "target not predicted"  # the reference misses the target: no quantization verdict
MODES = (HEALTHY, DEGRADATION, COLLAPSE, NO_VERDICT)

# thresholds (source in the comment)
COLLAPSE_CKA = 0.5  # study: the CKA diagonal "goes dark" at 2 bits (near 0; 4 bits stays > 0.9)
HEALTHY_CKA = 0.95  # qviz: 8-bit RTN on the embedded model keeps it at 1.00 (40 facts, bench/)
COLLAPSE_RANK = 1000  # study: at 2 bits the answer's rank falls "into the thousands"
SEVERE_FLIP = 0.30  # study: FFN gate sign flips above 30% are "severe"
COLLAPSE_ENTROPY = 0.80  # study: normalized attention entropy above 0.80 in middle layers
BROKEN_LAYER_COSINE = 0.5  # qviz isolation: a layer's update on a perfect input below this
BROKEN_LAYERS = 1  # qviz: one layer broken on a perfect input is a collapse sign
COLLAPSE_SIGNS = 2  # qviz: two independent collapse signs name computation collapse
PROB_DROP = 0.5  # qviz: the answer keeps less than half its full-precision probability
REFERENCE_TOP = 5  # study: answers are scored in the logit-lens top 5

# human labels of every evidence key (the card and the report show these)
EVIDENCE_LABELS = {
    "target": "target token",
    "cka_diag_mean": "CKA diagonal, mean over layers",
    "ref_rank": "answer rank, full precision",
    "quant_rank": "answer rank, quantized",
    "p_reference": "answer probability, full precision",
    "p_quantized": "answer probability, quantized",
    "prob_ratio": "answer probability kept (quantized / full precision)",
    "max_flip_rate": "FFN gate sign flips, worst layer",
    "mid_attn_entropy": "attention entropy, middle layers",
    "ref_mid_attn_entropy": "attention entropy, middle layers, full precision",
    "isolation_min_cosine": "worst layer update cosine on a perfect input",
    "isolation_broken_layers": "layers broken on a perfect input",
    "isolation_first_broken": "first broken layer (-1: none)",
    "isolation_layers": "layers tested on a perfect input",
    "sign_reference_misses": "full precision misses the target",
    "sign_cka_dark": "CKA goes dark",
    "sign_rank_thousands": "answer rank in the thousands",
    "sign_severe_flips": "severe gate sign flips",
    "sign_entropy_high": "diffuse mid-layer attention",
    "sign_isolation_broken": "layers broken on a perfect input",
    "sign_cka_blurred": "CKA below healthy",
    "sign_rank_worse": "answer rank worse than full precision",
    "sign_prob_drop": "answer probability halved",
}


def verdict(
    cka_diag: np.ndarray,
    ref_rank: int,
    quant_rank: int,
    flip_rate: np.ndarray,
    quant_entropy_mid: float,
    *,
    isolation_delta_cosine: np.ndarray | None = None,
    p_reference: float | None = None,
    p_quantized: float | None = None,
    target: str | None = None,
    reference_entropy_mid: float | None = None,
) -> tuple[str, dict]:
    """cka_diag [L+1]; ranks (1 = top) at the last layer; flip_rate [L]; mean middle entropy.

    ``isolation_delta_cosine`` [L] (optional): the cosine of each quantized layer's update with
    the reference layer's, both fed the reference input (``Lab.isolate``); layers below
    BROKEN_LAYER_COSINE are broken on a perfect input, a collapse sign. ``p_reference``,
    ``p_quantized`` (optional): the target's final probability in both models; a drop below
    PROB_DROP of the reference's is a degradation sign. ``target``: the target's text, for the
    warning. ``reference_entropy_mid`` (optional): the same entropy at full precision; when
    given, high entropy is a sign only if quantization pushed it over COLLAPSE_ENTROPY (a model
    whose own attention is that diffuse shows nothing). Returns (mode, evidence); metrics know
    no result classes, the caller wraps them in ``qviz.results.Verdict``.
    """
    ev: dict = {} if target is None else {"target": target}
    ev.update(
        cka_diag_mean=float(np.mean(np.asarray(cka_diag)[1:])),
        ref_rank=int(ref_rank),
        quant_rank=int(quant_rank),
        max_flip_rate=float(np.max(flip_rate)),
        mid_attn_entropy=float(quant_entropy_mid),
    )
    if reference_entropy_mid is not None:
        ev["ref_mid_attn_entropy"] = float(reference_entropy_mid)
    if p_reference is not None and p_quantized is not None:
        ev["p_reference"] = float(p_reference)
        ev["p_quantized"] = float(p_quantized)
        ev["prob_ratio"] = float(p_quantized) / max(float(p_reference), 1e-30)
    if isolation_delta_cosine is not None:
        iso = np.asarray(isolation_delta_cosine, dtype=np.float64)
        broken = np.flatnonzero(iso < BROKEN_LAYER_COSINE)
        ev["isolation_min_cosine"] = float(iso.min())
        ev["isolation_broken_layers"] = int(len(broken))
        ev["isolation_first_broken"] = int(broken[0]) if len(broken) else -1
        ev["isolation_layers"] = int(len(iso))
    found = signs(ev)
    ev.update({f"sign_{s['name']}": s["seen"] for s in found})
    return _mode(found), ev


def _mode(found: list[dict]) -> str:
    seen = {s["kind"] for s in found if s["seen"]}
    n_collapse = sum(s["seen"] for s in found if s["kind"] == "collapse")
    if "warning" in seen:
        return NO_VERDICT
    if n_collapse >= COLLAPSE_SIGNS:
        return COLLAPSE
    if seen:
        return DEGRADATION
    return HEALTHY


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _sign(name, kind, value, threshold, seen, text, ok_text) -> dict:
    label = EVIDENCE_LABELS[f"sign_{name}"]
    return dict(
        name=name,
        label=label,
        kind=kind,
        value=value,
        threshold=threshold,
        seen=bool(seen),
        text=text if seen else ok_text,
    )


# the signs that compare one figure with one threshold, in the rule's order:
# (name, kind, evidence key, words, test, threshold, number format)
_CUTS = (
    ("severe_flips", "collapse", "max_flip_rate", "gate signs flip at", ">", SEVERE_FLIP, ".2f"),
    ("rank_thousands", "collapse", "quant_rank", "answer rank", ">=", COLLAPSE_RANK, "d"),
    ("cka_dark", "collapse", "cka_diag_mean", "CKA diagonal mean", "<", COLLAPSE_CKA, ".2f"),
    (
        "entropy_high",
        "collapse",
        "mid_attn_entropy",
        "mid-layer attention entropy",
        ">",
        COLLAPSE_ENTROPY,
        ".2f",
    ),
    ("cka_blurred", "degradation", "cka_diag_mean", "CKA diagonal mean", "<", HEALTHY_CKA, ".2f"),
)
# each test, and the words of its opposite
_OPS = {">": (operator.gt, "<="), ">=": (operator.ge, "<"), "<": (operator.lt, ">=")}


def signs(evidence: dict) -> list[dict]:
    """Every sign the evidence allows, in the rule's order: dicts with ``name``, ``label`` (for
    people), ``kind`` ("warning" | "collapse" | "degradation"), ``value``, ``threshold``,
    ``seen`` and ``text`` (the measured value against its threshold, in words). A sign whose
    evidence is absent is left out."""
    ev, out = evidence, []
    has = ev.__contains__
    if has("ref_rank"):
        r = ev["ref_rank"]
        tgt = repr(ev["target"]) if has("target") else "the target"
        out.append(
            _sign(
                "reference_misses",
                "warning",
                r,
                REFERENCE_TOP,
                r > REFERENCE_TOP,
                f"the full-precision model itself ranks {tgt} {_ordinal(r)}: "
                f"pick a target it predicts (top {REFERENCE_TOP})",
                f"full precision ranks {tgt} {_ordinal(r)} (top {REFERENCE_TOP})",
            )
        )
    if has("isolation_broken_layers"):
        n, of = ev["isolation_broken_layers"], ev.get("isolation_layers")
        of_txt = f" of {of}" if of is not None else ""
        out.append(
            _sign(
                "isolation_broken",
                "collapse",
                n,
                BROKEN_LAYERS,
                n >= BROKEN_LAYERS,
                f"{n}{of_txt} layers broken on a perfect input "
                f"(update cosine < {BROKEN_LAYER_COSINE:g})",
                f"no layer broken on a perfect input (worst update cosine "
                f"{ev.get('isolation_min_cosine', float('nan')):.2f} >= {BROKEN_LAYER_COSINE:g})",
            )
        )
    for name, kind, key, what, op, threshold, fmt in _CUTS:
        if has(key):
            v = ev[key]
            test, other = _OPS[op]
            seen = test(v, threshold)
            if name == "entropy_high" and ev.get("ref_mid_attn_entropy", 0.0) > threshold:
                seen, other = False, f"full precision already {ev['ref_mid_attn_entropy']:.2f} >"
            said = f"{what} {v:{fmt}} ({{}} {threshold:{fmt}})"
            out.append(_sign(name, kind, v, threshold, seen, said.format(op), said.format(other)))
    if has("quant_rank") and has("ref_rank"):
        q, r = ev["quant_rank"], ev["ref_rank"]
        out.append(
            _sign(
                "rank_worse",
                "degradation",
                q,
                r,
                q > r,
                f"answer rank {q} (full precision: {r})",
                f"answer rank {q} as in full precision",
            )
        )
    if has("prob_ratio"):
        p, pr, pq = ev["prob_ratio"], ev["p_reference"], ev["p_quantized"]
        out.append(
            _sign(
                "prob_drop",
                "degradation",
                p,
                PROB_DROP,
                p < PROB_DROP,
                f"answer probability {pr:.2f} -> {pq:.2f} (kept {p:.2f} < {PROB_DROP:.2f})",
                f"answer probability {pr:.2f} -> {pq:.2f} (kept {p:.2f} >= {PROB_DROP:.2f})",
            )
        )
    return out


# a sign left out of the sentence when the stronger one beside it is seen
_IMPLIED_BY = {"cka_blurred": "cka_dark", "rank_worse": "rank_thousands"}
_STRICTER = set(
    _IMPLIED_BY.values()
)  # ... and left out of a healthy sentence: the other is stricter


def warning(evidence: dict) -> str | None:
    """The warning that replaces a quantization verdict (None: the verdict stands)."""
    for s in signs(evidence):
        if s["kind"] == "warning" and s["seen"]:
            return s["text"][0].upper() + s["text"][1:] + "."
    return None


def sentence(mode: str, evidence: dict) -> str:
    """One sentence naming the signs seen, with measured values and thresholds."""
    found = signs(evidence)
    seen = {s["name"] for s in found if s["seen"]}
    shown = [s for s in found if s["seen"] and _IMPLIED_BY.get(s["name"]) not in seen]
    head = mode[0].upper() + mode[1:]
    warn = warning(evidence)
    if warn is not None:
        rest = [s["text"] for s in shown if s["kind"] != "warning"]
        tail = f" Signs seen all the same: {', '.join(rest)}." if rest else ""
        return f"No verdict: {warn[0].lower()}{warn[1:]}{tail}"
    if not shown:  # the stricter (degradation) test of each figure, passed
        ok = [s["text"] for s in found if s["kind"] != "warning" and s["name"] not in _STRICTER]
        return f"{head}: no sign seen" + (f"; {', '.join(ok)}." if ok else ".")
    text = f"{head}: {', '.join(s['text'] for s in shown)}."
    n_collapse = sum(s["kind"] == "collapse" for s in shown)
    if mode == DEGRADATION and n_collapse:
        text += f" One collapse sign: computation collapse needs {COLLAPSE_SIGNS}."
    return text
