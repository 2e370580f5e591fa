"""The verdict rule: each sign alone, thresholds at their boundary, the warning, the sentence."""

import numpy as np
import pytest

from qviz import metrics
from qviz.metrics.verdict import (
    BROKEN_LAYER_COSINE,
    COLLAPSE,
    COLLAPSE_CKA,
    COLLAPSE_ENTROPY,
    COLLAPSE_RANK,
    DEGRADATION,
    EVIDENCE_LABELS,
    HEALTHY,
    HEALTHY_CKA,
    NO_VERDICT,
    PROB_DROP,
    REFERENCE_TOP,
    SEVERE_FLIP,
    signs,
)
from qviz.results import Verdict

L = 30


def judge(
    cka=1.0,
    ref_rank=1,
    quant_rank=1,
    flip=0.0,
    entropy=0.5,
    iso=None,
    p=None,
    target=" Paris",
    ref_entropy=None,
) -> Verdict:
    """A verdict on healthy evidence with the named figures changed."""
    kw = {} if iso is None else {"isolation_delta_cosine": iso}
    if p is not None:
        kw["p_reference"], kw["p_quantized"] = p
    if ref_entropy is not None:
        kw["reference_entropy_mid"] = ref_entropy
    diag = np.r_[1.0, np.full(L, cka)]  # state 0 (embeddings) is left out of the mean
    flips = np.r_[np.zeros(L - 1), flip]  # the worst layer counts
    return Verdict(
        *metrics.verdict(diag, ref_rank, quant_rank, flips, entropy, target=target, **kw)
    )


def broken(n: int, cos: float = 0.2) -> np.ndarray:
    return np.r_[np.full(n, cos), np.full(L - n, 0.99)]


def seen(v: Verdict) -> set[str]:
    return {s["name"] for s in v.signs if s["seen"]}


def test_healthy_evidence_is_healthy_with_no_sign_and_no_warning():
    v = judge(iso=broken(0), p=(0.9, 0.85))
    assert v.mode == HEALTHY and v.warning is None and seen(v) == set()
    assert v.sentence.startswith("Healthy: no sign seen")
    assert "0.90 -> 0.85" in v.sentence and "rank 1 as in full precision" in v.sentence


# each collapse sign alone: signal degradation (not healthy); its name in evidence and sentence
@pytest.mark.parametrize(
    "kw, sign, words",
    [
        (dict(cka=0.3), "cka_dark", "CKA diagonal mean 0.30 (< 0.50)"),
        (dict(quant_rank=1500), "rank_thousands", "answer rank 1500 (>= 1000)"),
        (dict(flip=0.318), "severe_flips", "gate signs flip at 0.32 (> 0.30)"),
        (dict(entropy=0.85), "entropy_high", "mid-layer attention entropy 0.85 (> 0.80)"),
        (
            dict(iso=broken(13)),
            "isolation_broken",
            "13 of 30 layers broken on a perfect input (update cosine < 0.5)",
        ),
    ],
)
def test_each_collapse_sign_alone_is_degradation_and_named(kw, sign, words):
    v = judge(**kw)
    assert sign in seen(v) and v.evidence[f"sign_{sign}"] is True
    assert v.mode == DEGRADATION, v.sentence
    assert words in v.sentence and "computation collapse needs 2" in v.sentence


def test_two_collapse_signs_are_collapse_in_any_pair():
    one = [
        dict(cka=0.3),
        dict(flip=0.5),
        dict(entropy=0.9),
        dict(iso=broken(2)),
        dict(quant_rank=2000),
    ]
    for i, a in enumerate(one):
        for b in one[i + 1 :]:
            v = judge(**a, **b)
            assert v.mode == COLLAPSE, (a, b, v.sentence)
            assert v.sentence.startswith("Computation collapse: ")


@pytest.mark.parametrize(
    "kw, sign",
    [
        (dict(cka=0.93), "cka_blurred"),
        (dict(quant_rank=2), "rank_worse"),
        (dict(p=(0.95, 0.44)), "prob_drop"),  # the issue's case, called healthy before
    ],
)
def test_each_degradation_sign_alone_is_degradation(kw, sign):
    v = judge(**kw)
    assert seen(v) == {sign} and v.mode == DEGRADATION, v.sentence


def test_the_issues_cases():
    # 2 bits: rank 937, CKA 0.928, 13 broken layers -- was "signal degradation"
    v = judge(cka=0.928, quant_rank=937, flip=0.47, iso=broken(13))
    assert v.mode == COLLAPSE
    assert "13 of 30 layers broken" in v.sentence and "0.47 (> 0.30)" in v.sentence
    # 3 bits: flip rates 0.318 and 0.334 above the rule's 0.30 -- were "healthy"
    for f in (0.318, 0.334):
        assert judge(flip=f, iso=broken(0)).mode == DEGRADATION
    # p 0.95 -> 0.44 -- was "healthy"
    v = judge(p=(0.95, 0.44))
    assert v.mode == DEGRADATION and "0.95 -> 0.44" in v.sentence


def test_thresholds_at_their_boundary():
    eps = 1e-9
    # strict ">" / "<" tests: exactly at the threshold is not a sign
    assert judge(flip=SEVERE_FLIP).mode == HEALTHY
    assert "severe_flips" in seen(judge(flip=SEVERE_FLIP + eps))
    assert judge(entropy=COLLAPSE_ENTROPY).mode == HEALTHY
    assert "entropy_high" in seen(judge(entropy=COLLAPSE_ENTROPY + eps))
    # pushed over by quantization: a sign; already over at full precision: none
    assert "entropy_high" in seen(judge(entropy=0.9, ref_entropy=COLLAPSE_ENTROPY))
    v = judge(entropy=0.9, ref_entropy=COLLAPSE_ENTROPY + eps)
    assert v.mode == HEALTHY and "full precision already 0.80 > 0.80" in v.sentence

    # (a mean of 30 equal floats is not exactly the float: CKA is tested on its evidence)
    def cka_seen(c):
        return {s["name"] for s in signs({"cka_diag_mean": c}) if s["seen"]}

    assert cka_seen(HEALTHY_CKA) == set() and cka_seen(HEALTHY_CKA - eps) == {"cka_blurred"}
    assert cka_seen(COLLAPSE_CKA) == {"cka_blurred"}
    assert cka_seen(COLLAPSE_CKA - eps) == {"cka_blurred", "cka_dark"}
    assert judge(iso=broken(1, BROKEN_LAYER_COSINE)).mode == HEALTHY
    assert seen(judge(iso=broken(1, BROKEN_LAYER_COSINE - eps))) == {"isolation_broken"}
    assert judge(p=(0.8, 0.8 * PROB_DROP)).mode == HEALTHY
    assert seen(judge(p=(0.8, 0.8 * PROB_DROP - eps))) == {"prob_drop"}
    # "in the thousands": rank 1000 is, 999 is not (but is worse than full precision)
    assert seen(judge(quant_rank=COLLAPSE_RANK - 1)) == {"rank_worse"}
    assert "rank_thousands" in seen(judge(quant_rank=COLLAPSE_RANK))
    # the reference's top 5: rank 5 gives a verdict, rank 6 a warning
    assert judge(ref_rank=REFERENCE_TOP, quant_rank=REFERENCE_TOP).mode == HEALTHY
    assert judge(ref_rank=REFERENCE_TOP + 1, quant_rank=REFERENCE_TOP + 1).mode == NO_VERDICT


def test_reference_not_in_top5_is_a_warning_not_a_verdict():
    v = judge(ref_rank=514, quant_rank=3000, cka=0.2, flip=0.6, target=" Rome")
    assert v.mode == NO_VERDICT and v.mode not in (HEALTHY, DEGRADATION, COLLAPSE)
    said = "the full-precision model itself ranks ' Rome' 514th: pick a target it predicts"
    assert said[1:] in v.warning and said in v.sentence
    assert v.sentence.startswith("No verdict: the full-precision model itself ranks ' Rome' 514th")
    assert "gate signs flip at 0.60" in v.sentence  # the signs are still reported
    for r, word in [(11, "11th"), (21, "21st"), (102, "102nd"), (13, "13th"), (23, "23rd")]:
        assert word in judge(ref_rank=r, quant_rank=r).warning


def test_old_callers_keep_working():
    args = (np.ones(5), 1, 1, np.zeros(4), 0.5)
    mode, ev = metrics.verdict(*args)  # positional, no new keywords
    assert mode == HEALTHY and not any(k.startswith("isolation") for k in ev)
    for key in ("cka_diag_mean", "ref_rank", "quant_rank", "max_flip_rate", "mid_attn_entropy"):
        assert key in ev
    for key in ("sign_cka_dark", "sign_rank_thousands", "sign_severe_flips", "sign_entropy_high"):
        assert ev[key] is False
    v = Verdict(mode, ev)
    frame = v.to_frame()
    assert frame["mode"].iloc[0] == HEALTHY and frame["sentence"].iloc[0] == v.sentence
    assert frame["warning"].iloc[0] is None
    # a hand-made verdict with partial evidence still explains what it has
    hand = Verdict("signal degradation", {"cka_diag_mean": 0.5, "quant_rank": 3})
    assert hand.warning is None and "CKA diagonal mean 0.50 (< 0.95)" in hand.sentence


def test_every_evidence_key_and_sign_has_a_human_label():
    v = judge(iso=broken(3), p=(0.9, 0.2))
    assert set(v.evidence) <= set(EVIDENCE_LABELS)
    assert all(label != key for key, label in v.labels.items())
    for s in v.signs:
        assert s["label"] and s["label"] != s["name"]
        assert set(s) >= {"name", "label", "value", "threshold", "seen"}
    by = {s["name"]: s for s in v.signs}
    assert by["isolation_broken"]["value"] == 3 and by["prob_drop"]["threshold"] == PROB_DROP
    assert by["prob_drop"]["value"] == pytest.approx(0.2 / 0.9)


def test_full_precision_comparison_is_healthy_with_no_warning():
    """A real comparison of the full-precision plan with itself (tiny model, in-process)."""
    from qviz import Lab, QuantPlan
    from tests.conftest import CharTokenizer, tiny_llama

    lab = Lab(tiny_llama(), CharTokenizer())
    prompt = "abcabcabcab"
    ids = lab.encode(prompt)
    import torch

    with torch.no_grad():
        target = int(lab.model(ids).logits[0, -1].argmax())  # what the model predicts: rank 1
    cmp = lab.compare(prompt, target, QuantPlan.none())
    v = Verdict(
        *metrics.verdict(
            cmp.cka.values.diagonal(),
            int(cmp.lens.reference.rank[-1]),
            int(cmp.lens.quantized.rank[-1]),
            cmp.ffn.flip_rate,
            float(cmp.attention.quant_entropy.mean()),
            reference_entropy_mid=float(cmp.attention.ref_entropy.mean()),
            isolation_delta_cosine=cmp.isolation.delta_cosine,
            p_reference=float(cmp.lens.reference.prob[-1]),
            p_quantized=float(cmp.lens.quantized.prob[-1]),
            target=cmp.lens.target,
        )
    )
    assert v.mode == HEALTHY and v.warning is None, v.sentence
    assert v.evidence["prob_ratio"] == pytest.approx(1.0)
    assert v.evidence["isolation_broken_layers"] == 0
