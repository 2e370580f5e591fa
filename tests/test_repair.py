"""Batched evaluation, layer isolation and the repair report (source protection, amplification,
domino test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qviz import Lab, QuantConfig, QuantPlan, metrics
from qviz.data import load_facts
from tests.conftest import CharTokenizer, tiny_gpt2, tiny_llama

FRANCE = "The capital of France is"


def _per_prompt(lab: Lab, texts, tids):
    """The unbatched reference: one forward per prompt, full logits."""
    ok, ranks = [], []
    for p, t in zip(texts, tids, strict=True):
        with torch.no_grad():
            logits = lab.model(lab.encode(p), use_cache=False).logits[0, -1].float()
        rank = int((logits > logits[t]).sum()) + 1
        ok.append(rank == 1)
        ranks.append(rank)
    return np.array(ok), np.array(ranks)


def _tiny_facts(lab: Lab, n: int = 24) -> list[dict]:
    """Prompts of different lengths whose answer is the reference's own top-1 token."""
    rng = np.random.default_rng(0)
    facts = []
    for i in range(n):
        text = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=3 + i % 9))
        with torch.no_grad():
            top = int(lab.model(lab.encode(text), use_cache=False).logits[0, -1, 1:91].argmax()) + 1
        facts.append({"relation": "r", "prompt": text, "answer": chr(89 + top)})
    return facts


@pytest.fixture(params=["llama", "gpt2"])
def tiny_lab(request):
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    return Lab(model, CharTokenizer())


def test_evaluate_batched_equals_per_prompt_tiny(tiny_lab):
    facts = _tiny_facts(tiny_lab)
    _, texts, tids = tiny_lab._facts(facts)
    assert len({len(t) for t in texts}) > 5  # padding is exercised
    plan = QuantPlan.uniform(QuantConfig(bits=3, group_size=32))
    ev = tiny_lab.evaluate(plan, facts)
    assert ev.reference_accuracy > 0.5  # answers: the reference's top-1 among ids 1..90
    with tiny_lab.quantized(QuantPlan.none()):
        ref_ok, ref_ranks = _per_prompt(tiny_lab, texts, tids)
    np.testing.assert_array_equal(ev.frame.reference_correct.to_numpy(), ref_ok)
    with tiny_lab.quantized(plan):
        ok, ranks = _per_prompt(tiny_lab, texts, tids)
    np.testing.assert_array_equal(ev.frame.correct.to_numpy(), ok)
    np.testing.assert_array_equal(ev.frame["rank"].to_numpy(), ranks)
    for max_tokens in (1, 20):  # one prompt per forward, and a few
        with tiny_lab.quantized(plan):
            ok2, ranks2 = tiny_lab._next_token_stats(texts, tids, max_tokens=max_tokens)
        np.testing.assert_array_equal(ranks2, ranks)


def test_verdict_keeps_its_positional_signature():
    args = (np.ones(5), 1, 1, np.zeros(4), 0.5)
    mode, ev = metrics.verdict(*args)
    assert mode == "healthy" and not any(k.startswith("isolation") for k in ev)
    mode2, ev2 = metrics.verdict(*args, isolation_delta_cosine=np.array([0.99, 0.2, 0.3, 0.9]))
    assert mode2 == "signal degradation"  # broken layers are a collapse sign: one alone degrades
    assert ev2["isolation_broken_layers"] == 2 and ev2["isolation_first_broken"] == 1
    assert ev2["isolation_min_cosine"] == pytest.approx(0.2)


def test_repair_report_tiny(monkeypatch):
    # tiny llama's 2-bit plan flips answers (tiny GPT-2's does not)
    tiny_lab = Lab(tiny_llama(), CharTokenizer())
    facts = _tiny_facts(tiny_lab, n=30)
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    seen = {}
    real = tiny_lab.peak_layer

    def spy(p, calibration=None, n_max=32):
        seen["calibration"] = calibration
        return real(p, calibration, n_max)

    monkeypatch.setattr(tiny_lab, "peak_layer", spy)
    rep = tiny_lab.repair_report(plan, facts, alphas=(1, 2, 5), domino=(1, 2, 9))
    ev = tiny_lab.evaluate(plan, facts)
    assert rep.n_failures == len(ev.failure_subset) > 0
    assert rep.baseline == 0.0 and rep.amplification[1.0] == 0.0  # alpha 1 is no change
    assert set(rep.amplification) == {1.0, 2.0, 5.0} and set(rep.domino) == {1, 2}
    assert rep.protected_amplification[1.0] == rep.protected
    assert 0 <= rep.peak_layer <= tiny_lab.n_layers - 2
    failed = {facts[i]["prompt"] for i in ev.failure_subset}
    assert seen["calibration"] and not failed & {f["prompt"] for f in seen["calibration"]}
    frame = rep.to_frame()
    assert list(frame.repair[:3]) == ["none", "source protection", "amplification (best)"]
    assert frame.accuracy.between(0, 1).all()
    with pytest.raises(ValueError, match="default config"):
        tiny_lab.repair_report(QuantPlan.only_layers(QuantConfig(bits=2), [0]), facts)


def test_isolation_tiny_full_precision_is_exact(tiny_lab):
    iso = tiny_lab.isolate("abcdefg", QuantPlan.none())
    assert np.allclose(iso.cosine, 1, atol=1e-6) and np.allclose(iso.delta_cosine, 1, atol=1e-5)
    assert np.allclose(iso.rel_error, 0, atol=1e-6) and iso.broken == []
    assert len(iso.to_frame()) == tiny_lab.n_layers


# the embedded model --------------------------------------------------------------------------
@pytest.mark.model
def test_evaluate_batched_equals_per_prompt_embedded(lab):
    facts = load_facts()[::40]
    _, texts, tids = lab._facts(facts)
    plan = QuantPlan.uniform(QuantConfig(bits=4))
    ev = lab.evaluate(plan, facts)
    with lab.quantized(QuantPlan.none()):
        ref_ok, _ = _per_prompt(lab, texts, tids)
    with lab.quantized(plan):
        ok, ranks = _per_prompt(lab, texts, tids)
    np.testing.assert_array_equal(ev.frame.reference_correct.to_numpy(), ref_ok)
    np.testing.assert_array_equal(ev.frame.correct.to_numpy(), ok)
    np.testing.assert_array_equal(ev.frame["rank"].to_numpy(), ranks)


@pytest.mark.model
def test_isolation_separates_4bit_from_2bit(lab):
    i8 = lab.isolate(FRANCE, QuantPlan.uniform(QuantConfig(bits=8)))
    i2 = lab.isolate(FRANCE, QuantPlan.uniform(QuantConfig(bits=2)))
    assert i8.broken == [] and i8.delta_cosine.min() > 0.99
    assert len(i2.broken) > 0 and i2.delta_cosine.mean() < i8.delta_cosine.mean()
    assert (i2.rel_error > i8.rel_error).all()


@pytest.mark.model
def test_repair_report_embedded(lab):
    facts = load_facts()[::5]  # 80 facts
    rep = lab.repair_report(
        QuantPlan.uniform(QuantConfig(bits=4, group_size=128)), facts, alphas=(1, 3), domino=(1,)
    )
    assert rep.n_failures > 0 and rep.baseline == 0.0 and rep.amplification[1.0] == 0.0
    assert 0 <= rep.protected <= 1 and rep.domino[1] > 0
    assert 0 <= rep.peak_layer <= lab.n_layers - 2
    assert len(rep.to_frame()) == 2 + 1 + 2 + 1 + 2 + 1
    assert set(rep.protected_amplification) == {1.0, 3.0}
    assert rep.protected_amplification[1.0] == pytest.approx(rep.protected)
