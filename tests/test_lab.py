"""The Lab on tiny models and on the embedded SmolLM2-135M."""

import numpy as np
import pytest
import torch

from qviz import Lab, QuantConfig, QuantPlan
from qviz.cancel import Cancelled
from qviz.data import load_facts, load_text
from tests.conftest import CharTokenizer, hook_count, tiny_llama

FRANCE = "The capital of France is"


def test_bundled_data_is_big_enough():
    facts = load_facts()
    assert len(facts) >= 300 and len({f["relation"] for f in facts}) >= 12
    assert all(f["answer"].startswith(" ") for f in facts)
    assert len(load_text().split()) >= 4000


def test_full_precision_plan_is_identity(lab):
    cmp = lab.compare(FRANCE, " Paris", QuantPlan.none())
    assert np.allclose(cmp.cka.diagonal, 1, atol=1e-6)
    assert (cmp.ffn.flip_rate == 0).all()
    assert np.allclose(cmp.residual.cosine, 1, atol=1e-5)
    assert cmp.verdict.mode == "healthy"


def test_reference_rank_of_paris_is_one_and_lens_matches_output(lab):
    cmp = lab.compare(FRANCE, " Paris", QuantPlan.uniform(QuantConfig(bits=8)))
    assert cmp.lens.reference.rank[-1] == 1 and cmp.lens.target == " Paris"
    with torch.no_grad():
        probs = lab.model(lab.encode(FRANCE)).logits[0, -1].softmax(-1)
    assert cmp.lens.reference.prob[-1] == pytest.approx(
        float(probs[lab.target_id(" Paris")]), abs=1e-5
    )


def test_8bit_healthy_2bit_collapse(lab):
    facts = [f["prompt"] for f in load_facts()[:8]]
    c8 = lab.compare([FRANCE, *facts], " Paris", QuantPlan.uniform(QuantConfig(bits=8)))
    c2 = lab.compare([FRANCE, *facts], " Paris", QuantPlan.uniform(QuantConfig(bits=2)))
    assert c8.verdict.mode == "healthy", c8.verdict.evidence
    assert c2.verdict.mode == "computation collapse", c2.verdict.evidence
    assert c2.cka.n_samples == c8.cka.n_samples > 50
    assert c2.ffn.flip_rate.max() > c8.ffn.flip_rate.max()
    frame = c2.to_frame()
    assert len(frame) == lab.n_layers and not frame.isna().any().any()


def test_target_must_be_one_token(lab):
    with pytest.raises(ValueError, match=r"exactly one token.*\[.*\]"):
        lab.compare(FRANCE, " Parisian capitalism", QuantPlan.none())
    with pytest.raises(ValueError, match="non-empty"):
        lab.compare("  ", " Paris", QuantPlan.none())
    with pytest.raises(ValueError, match=r"one token of text \(e.g. ' Paris'.*got ''") as err:
        lab.compare(FRANCE, "", QuantPlan.none())
    assert "first piece" not in str(err.value)  # no hint to pass an empty piece


def test_no_hooks_remain_even_after_errors():
    model = tiny_llama()

    lab = Lab(model, CharTokenizer())
    lab.compare(["abcdef", "ghijkl"], 5, QuantPlan.uniform(QuantConfig(bits=2, group_size=32)))
    assert hook_count(model) == 0
    original = model.model.layers[1].mlp.forward

    def broken(*a, **k):
        raise RuntimeError("boom")

    model.model.layers[1].mlp.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        lab.compare("xyzxyz", 5, QuantPlan.uniform(QuantConfig(bits=3, group_size=32)))
    model.model.layers[1].mlp.forward = original
    assert hook_count(model) == 0
    assert model.config._attn_implementation != "eager"


def test_evaluate_and_failure_subset(lab):
    facts = load_facts()[:40]
    ev = lab.evaluate(QuantPlan.uniform(QuantConfig(bits=2)), prompts=facts)
    assert ev.reference_accuracy > 0.3 and ev.accuracy < ev.reference_accuracy
    assert set(ev.failure_subset) <= set(ev.reference_correct)
    assert len(ev.failure_subset) == int((ev.frame.reference_correct & ~ev.frame.correct).sum())


def test_perplexity_orders_bits(lab):
    text = load_text()[:3000]
    fp = lab.perplexity(QuantPlan.none(), text)
    p8 = lab.perplexity(QuantPlan.uniform(QuantConfig(bits=8)), text)
    p2 = lab.perplexity(QuantPlan.uniform(QuantConfig(bits=2)), text)
    assert 1 < fp < 100 and abs(p8 / fp - 1) < 0.02 and p2 > 3 * fp


def test_prompt_token_limit_is_a_clear_error():
    lab = Lab(tiny_llama(), CharTokenizer(), max_prompt_tokens=16)
    with pytest.raises(ValueError, match=r"20 tokens.*limit of 16"):
        lab.compare("abcdefghijklmnopqrst", 5, QuantPlan.none())
    lab.max_prompt_tokens = 32
    assert (
        lab.compare("abcdefghijklmnopqrst", 5, QuantPlan.none(), isolation=False).cka.n_samples
        == 20
    )


def test_nan_reference_logits_name_the_cause():
    model = tiny_llama()
    model.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    lab = Lab(model, CharTokenizer())
    with pytest.raises(RuntimeError, match="corrupt.*qviz fetch"):
        lab.compare("abcdef", 5, QuantPlan.none())


def test_activation_cache_keeps_to_its_byte_budget():
    lab = Lab(tiny_llama(), CharTokenizer())
    one = lab.activations("abcdefgh", QuantPlan.none()).nbytes
    lab.acts_budget_bytes = int(2.5 * one)
    for p in ("bcdefghi", "cdefghij", "defghijk"):
        lab.activations(p, QuantPlan.none())
    assert len(lab._acts) == 2 and lab._acts.nbytes <= 2.5 * one
    assert ("defghijk", QuantPlan.none()) in lab._acts


def test_streamed_attention_matches_full_maps_in_compare():
    """compare's attention statistics (one layer at a time) equal the full-map computation."""
    from qviz import metrics
    from qviz.probes.capture import capture

    lab = Lab(tiny_llama(), CharTokenizer())
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    cmp = lab.compare(["abcdefghij", "klmnopq"], 5, plan, isolation=False)
    ent_r, ent_q, js = [], [], []
    for p in ("abcdefghij", "klmnopq"):
        with lab.quantized(QuantPlan.none()):
            r = capture(lab.model, lab.adapter, lab.encode(p), ("attn",)).attn
        with lab.quantized(plan):
            q = capture(lab.model, lab.adapter, lab.encode(p), ("attn",)).attn
        ent_r.append(metrics.normalized_entropy(r, torch.float64).numpy())
        ent_q.append(metrics.normalized_entropy(q, torch.float64).numpy())
        js.append(metrics.js_divergence(r, q, torch.float64).numpy())
    np.testing.assert_allclose(cmp.attention.ref_entropy, np.mean(ent_r, 0), atol=1e-5)
    np.testing.assert_allclose(cmp.attention.quant_entropy, np.mean(ent_q, 0), atol=1e-5)
    np.testing.assert_allclose(cmp.attention.js, np.mean(js, 0), atol=1e-5)


def test_cancel_stops_trace_evaluate_perplexity():
    import threading

    lab = Lab(tiny_llama(), CharTokenizer())
    stop = threading.Event()
    stop.set()
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    facts = [{"prompt": "abc", "answer": " d"}]
    with pytest.raises(Cancelled):
        lab.trace("abcdef", 5, plan, cancel=stop)
    with pytest.raises(Cancelled):
        lab.evaluate(plan, facts, cancel=stop)
    with pytest.raises(Cancelled):
        lab.perplexity(plan, "abcdefgh" * 4, cancel=stop)
    assert hook_count(lab.model) == 0


@pytest.mark.model
def test_cka_context_pools_bundled_prompts(lab):
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
    cmp = lab.compare(FRANCE, " Paris", plan, cka_context=32, isolation=False)
    assert cmp.cka.n_prompts == 33 and cmp.cka.drop_first
    assert cmp.cka.reference.shape == cmp.cka.values.shape
    np.testing.assert_allclose(np.diag(cmp.cka.reference), 1, atol=1e-6)
    assert cmp.cka.n_samples > 33 * 3
    n_ctx = cmp.cka.n_samples - (len(lab.encode(FRANCE)[0]) - 1)
    again = lab.compare(FRANCE, " Paris", plan, cka_context=32, isolation=False)
    assert again.cka.n_samples - n_ctx == len(lab.encode(FRANCE)[0]) - 1
    np.testing.assert_allclose(again.cka.values, cmp.cka.values)
