"""The Lab on tiny models and on the embedded SmolLM2-135M."""

import numpy as np
import pytest
import torch

from qviz import Lab, QuantConfig, QuantPlan
from qviz.lab import load_facts, load_text
from tests.conftest import CharTokenizer, tiny_llama

FRANCE = "The capital of France is"


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def lab(embedded):
    model, tok = embedded
    return Lab(model, tok, name="smollm2-135m")


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


def test_no_hooks_remain_even_after_errors():
    model = tiny_llama()

    lab = Lab(model, CharTokenizer())
    lab.compare(["abcdef", "ghijkl"], 5, QuantPlan.uniform(QuantConfig(bits=2, group_size=32)))
    assert _hook_count(model) == 0
    original = model.model.layers[1].mlp.forward

    def broken(*a, **k):
        raise RuntimeError("boom")

    model.model.layers[1].mlp.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        lab.compare("xyzxyz", 5, QuantPlan.uniform(QuantConfig(bits=3, group_size=32)))
    model.model.layers[1].mlp.forward = original
    assert _hook_count(model) == 0
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
