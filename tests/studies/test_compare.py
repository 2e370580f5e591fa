"""compare's memory-bounded pieces give the same numbers as the plain computation."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from qviz import Lab, QuantConfig, QuantPlan
from qviz.studies import compare as compare_mod
from tests.conftest import CharTokenizer, tiny_llama

PLAN = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))


def test_attention_stats_a_head_at_a_time_equal_all_heads_at_once(monkeypatch):
    """The entropy/JS callback splits the heads when a map is large (STATS_ELEMENTS): one head
    per call gives the all-heads result."""
    prompts = ["abcdefghijklmnop", "qrstuv"]
    whole = Lab(tiny_llama(), CharTokenizer()).compare(prompts, 5, PLAN, isolation=False)
    monkeypatch.setattr(compare_mod, "STATS_ELEMENTS", 1)
    split = Lab(tiny_llama(), CharTokenizer()).compare(prompts, 5, PLAN, isolation=False)
    for name in ("ref_entropy", "quant_entropy", "js"):
        got, want = getattr(split.attention, name), getattr(whole.attention, name)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert whole.attention.js.max() > 0  # the plan does move the maps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_bound_heap_sets_the_mmap_threshold_once():
    from qviz.probes.capture import bound_heap

    assert bound_heap() is True
    assert bound_heap() is True  # once per process: the second call changes nothing


def test_reference_keeps_maps_of_short_prompts_and_inputs_of_long_ones():
    """A short prompt's reference capture keeps its maps (no recomputation under the plan), a
    long one's the attention inputs; in one batch, both give the JS and entropy of the full maps
    of separate runs (float64)."""
    import torch

    from qviz import metrics
    from qviz.probes.capture import capture

    lab = Lab(tiny_llama(), CharTokenizer())
    for layer in lab.adapter.decoder_layers(lab.model):  # sharper maps than a random init's
        for w in layer.get_submodule(lab.adapter.attn).parameters():
            w.data.mul_(6.0)
    cfg = lab.model.config
    limit = cfg.hidden_size // cfg.num_attention_heads  # longest prompt whose maps are kept
    short, long = "abcdefghij"[: limit - 2], ("klmnopqrstuvwxyz" * 8)[: limit + 5]
    refs = compare_mod.activations_many(lab, [short, long], QuantPlan.none())
    assert refs[0].attn is not None and refs[0].attn_in is None
    assert refs[1].attn is None and refs[1].attn_in is not None
    cmp = compare_mod.compare_many(lab, [short, long], 5, PLAN, isolation=False)
    for p, got in zip([short, long], cmp, strict=True):
        with lab.quantized(QuantPlan.none()):
            r = capture(lab.model, lab.adapter, lab.encode(p), ("attn",)).attn
        with lab.quantized(PLAN):
            q = capture(lab.model, lab.adapter, lab.encode(p), ("attn",)).attn
        want_js = metrics.js_divergence(r, q, torch.float64).numpy()
        np.testing.assert_allclose(got.attention.js, want_js, atol=1e-6, rtol=1e-3)
        want_ent = metrics.normalized_entropy(q, torch.float64).numpy()
        np.testing.assert_allclose(got.attention.quant_entropy, want_ent, atol=1e-5)
        assert want_js.max() > 1e-3  # the plan does move the maps
