"""Logit lens against a tiny in-process Llama; target statistics and top-k tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from qviz.metrics import logit_lens, target_stats, topk_tokens
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


def test_last_layer_lens_equals_model_logits(llama):
    captured = {}

    def hook(_module, _args, output):
        captured["pre_norm"] = output[0] if isinstance(output, tuple) else output

    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    handle = llama.model.layers[-1].register_forward_hook(hook)
    try:
        out = llama(ids, output_hidden_states=True)
    finally:
        handle.remove()
    pre = captured["pre_norm"][0]  # [T, D]
    hidden = torch.stack([h[0] for h in out.hidden_states[:-1]] + [pre])  # [L+1, T, D]
    logits = logit_lens(hidden, llama.model.norm, llama.lm_head)
    assert logits.shape == (4, 9, 97)
    torch.testing.assert_close(logits[-1], out.logits[0], atol=1e-5, rtol=1e-5)
    # [L+1, D] input (one position) works too
    last = logit_lens(hidden[:, -1], llama.model.norm, llama.lm_head)
    torch.testing.assert_close(last, logits[:, -1])


def test_softcap_bounds_logits(llama):
    states = torch.randn(4, 64) * 10
    raw = logit_lens(states, llama.model.norm, llama.lm_head)
    capped = logit_lens(states, llama.model.norm, llama.lm_head, softcap=0.5)
    assert capped.abs().max() < 0.5
    torch.testing.assert_close(capped, 0.5 * torch.tanh(raw / 0.5))


def test_target_stats():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    prob, rank, logit = target_stats(logits, target=2)
    torch.testing.assert_close(prob, torch.softmax(logits, -1)[:, 2])
    assert rank.tolist() == [2, 2, 1]
    assert logit.tolist() == [2.0, 0.0, 0.0]
    torch.testing.assert_close(prob[2], torch.tensor(0.25))
    with pytest.raises(IndexError):
        target_stats(logits, target=4)


def test_topk_tokens():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 4.0]])
    ids, probs = topk_tokens(logits, k=2)
    assert ids.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(probs, torch.softmax(logits, -1).gather(1, ids))
    assert (probs[:, 0] >= probs[:, 1]).all()
    ids, probs = topk_tokens(logits, k=10)  # k clipped to the vocabulary
    assert ids.shape == (2, 4)
