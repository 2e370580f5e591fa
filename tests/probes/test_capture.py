"""Capture: activations and streamed attention statistics equal to full-map computations."""

from __future__ import annotations

import pytest
import torch

from qviz import QuantConfig, QuantPlan, metrics
from qviz.models import get_adapter
from qviz.probes.batch import left_pad, length_batches, pack, token_batches
from qviz.probes.capture import (
    AttentionReference,
    attention_params,
    capture,
    capture_packed,
    isolated_outputs,
    last_states,
    packs,
)
from qviz.quant.engine import engine_for
from tests.conftest import hook_count, tiny_gpt2, tiny_llama


def test_resid_matches_hidden_states(tiny_model):
    ad = get_adapter(tiny_model)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    cap = capture(tiny_model, ad, ids, ("resid", "gate", "mlp_out"))
    assert hook_count(tiny_model) == 0
    with torch.no_grad():  # (transformers leaves its own hooks after output_hidden_states)
        out = tiny_model(ids, output_hidden_states=True)
    n = ad.n_layers(tiny_model)
    assert cap.resid.shape == (n + 1, 7, 64)
    torch.testing.assert_close(cap.resid[0], out.hidden_states[0][0])
    torch.testing.assert_close(cap.resid[n - 1], out.hidden_states[n - 1][0])
    torch.testing.assert_close(cap.logits[0], out.logits[0, -1])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_streamed_attention_stats_equal_full_maps(make):
    """Entropy and JS computed one layer at a time, the reference's maps recomputed on the fly,
    equal the old computation over every layer's full maps in float64 (1e-5)."""
    model = make()
    ad = get_adapter(model)
    for layer in ad.decoder_layers(model):  # sharper maps than a random init's near-uniform ones
        for p in layer.get_submodule(ad.attn).parameters():
            p.data.mul_(6.0)
    engine = engine_for(model)
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    ids = torch.tensor([[7, 3, 9, 2, 8, 1, 4, 6, 5, 3, 2, 11, 12]])
    with engine.quantized(QuantPlan.none()):
        full_r = capture(model, ad, ids, ("attn",)).attn
        ref = capture(model, ad, ids, ("attn_in", "attn_stats"), on_attention=lambda *a: None)
        params = attention_params(model, ad)
    with engine.quantized(plan):
        full_q = capture(model, ad, ids, ("attn",)).attn
    n, h = full_r.shape[:2]
    ent, js, seen_ref = torch.zeros(n, h), torch.zeros(n, h), []

    def stats(i, probs, ref_probs):
        assert probs.shape == (1, h, 13, 13)
        ent[i] = metrics.normalized_entropy(probs)[0]
        js[i] = metrics.js_divergence(ref_probs, probs)[0]
        seen_ref.append(ref_probs)

    with engine.quantized(plan):
        capture(
            model, ad, ids, on_attention=stats, reference=AttentionReference(ref.attn_in, params)
        )
    want_ent = metrics.normalized_entropy(full_q, dtype=torch.float64)
    want_js = metrics.js_divergence(full_r, full_q, dtype=torch.float64)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(js.double(), want_js, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(seen_ref[0][0], full_r[0], atol=1e-6, rtol=0)
    assert want_js.max() > 1e-3  # the plan does move the maps
    assert hook_count(model) == 0


def test_capture_rejects_unknown_and_needs_a_callback(tiny_model):
    ad = get_adapter(tiny_model)
    with pytest.raises(ValueError, match="cannot capture"):
        capture(tiny_model, ad, torch.tensor([[1, 2]]), ("weights",))
    with pytest.raises(ValueError, match="on_attention"):
        capture(tiny_model, ad, torch.tensor([[1, 2]]), ("attn_stats",))


def test_last_states_and_isolation(tiny_model):
    ad = get_adapter(tiny_model)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    cap = capture(tiny_model, ad, ids, ("resid",))
    st = last_states(tiny_model, ad, ids)
    torch.testing.assert_close(st[:, 0], cap.resid[:, -1])
    outs = isolated_outputs(tiny_model, ad, ids, cap.resid[:-1])  # fed its own inputs
    torch.testing.assert_close(outs, cap.resid[1:], atol=1e-5, rtol=0)
    assert hook_count(tiny_model) == 0


def test_left_padding_changes_nothing():
    model = tiny_llama()
    ad = get_adapter(model)
    seqs = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2, 6])]
    ids, kw = left_pad(seqs)
    assert ids.shape == (2, 5) and kw["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    st = last_states(model, ad, ids, **kw)
    alone = last_states(model, ad, seqs[0][None])
    torch.testing.assert_close(st[:, 0], alone[:, 0], atol=1e-5, rtol=0)
    assert left_pad([seqs[0], seqs[0]])[1] == {}
    assert list(length_batches([5, 1, 3], max_tokens=6)) == [[1, 2], [0]]


def _assert_each_is_its_own_capture(model, ad, seqs, got, what) -> None:
    """Each of ``got`` equals the one-prompt ``capture`` of its sequence, in its own memory
    (not a view keeping the whole batch alive)."""
    for s, cap in zip(seqs, got, strict=True):
        want = capture(model, ad, s[None], what)
        for f in ("logits", *what):
            assert getattr(cap, f).shape == getattr(want, f).shape, f
            torch.testing.assert_close(getattr(cap, f), getattr(want, f), atol=1e-5, rtol=1e-4)
    r = got[0].resid
    assert r.untyped_storage().nbytes() == r.numel() * r.element_size()


def test_capture_batch_equals_one_prompt_captures(tiny_model):
    """A left-padded batch gives every prompt the capture (and attention maps, and isolated
    outputs) of its own one-prompt forward, the padding dropped."""
    from qviz.probes.capture import capture_batch, pad_states

    ad = get_adapter(tiny_model)
    seqs = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2, 6, 5, 3]), torch.tensor([2, 7])]
    what = ("resid", "attn", "gate", "mlp_out", "attn_in")
    batch = capture_batch(tiny_model, ad, seqs, what)
    _assert_each_is_its_own_capture(tiny_model, ad, seqs, batch, what)
    ids, kw = left_pad(seqs)
    outs = isolated_outputs(tiny_model, ad, ids, pad_states([c.resid[:-1] for c in batch]), **kw)
    for b, (s, c) in enumerate(zip(seqs, batch, strict=True)):
        alone = isolated_outputs(tiny_model, ad, s[None], c.resid[:-1])
        torch.testing.assert_close(outs[:, b, -len(s) :], alone, atol=1e-5, rtol=1e-4)
    assert hook_count(tiny_model) == 0


def test_length_batches_start_a_new_batch_rather_than_pad_much():
    lengths = [6] * 31 + [8]
    assert [len(b) for b in length_batches(lengths, 512)] == [32]  # one batch, 62 pad tokens
    assert [len(b) for b in length_batches(lengths, 512, max_pad=32)] == [31, 1]
    assert [len(b) for b in length_batches([6, 7, 7, 8], 512, max_pad=3)] == [4]  # 1 + 2
    assert [len(b) for b in length_batches([6, 7, 7, 8], 512, max_pad=2)] == [3, 1]


def test_packed_capture_equals_one_prompt_captures(tiny_model):
    """Prompts packed end to end in one row (no padding) give every prompt the capture of its
    own one-prompt forward: no prompt sees another, positions restart (a 1-token one too)."""
    ad = get_adapter(tiny_model)
    assert packs(tiny_model, ad)
    seqs = [torch.tensor([3, 1, 4]), torch.tensor([1, 5, 9, 2, 6, 5, 3]), torch.tensor([8])]
    what = ("resid", "gate", "mlp_out", "attn_in")
    got = capture_packed(tiny_model, ad, seqs, what)
    _assert_each_is_its_own_capture(tiny_model, ad, seqs, got, what)
    assert hook_count(tiny_model) == 0
    with pytest.raises(ValueError, match="no attention maps"):
        capture_packed(tiny_model, ad, seqs, ("resid", "attn_stats"))


def test_packs_is_false_for_a_model_that_ignores_the_restarting_positions():
    """Without its position ids a packed row is one long prompt: the second sequence attends to
    the first, and ``packs`` must say so (its captures would mix prompts)."""
    model = tiny_llama(seed=3)
    h = model.register_forward_pre_hook(
        lambda m, a, kw: (a, {k: v for k, v in kw.items() if k != "position_ids"}),
        with_kwargs=True,
    )
    try:
        assert not packs(model, get_adapter(model))
    finally:
        h.remove()


def test_pack_and_token_batches():
    ids, kw, slices = pack([torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 9, 4])])
    assert ids.tolist() == [[5, 6, 7, 8, 9, 4]] and set(kw) == {"position_ids"}
    assert kw["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2]]
    assert slices == [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert list(token_batches([3, 4, 2, 9, 1], max_tokens=7)) == [[0, 1], [2], [3], [4]]
    assert list(token_batches([], 7)) == []
