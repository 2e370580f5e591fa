"""Shared fixtures: tiny models built in-process, and the embedded SmolLM2-135M (session-wide)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(
    seed: int = 0, hidden: int = 64, intermediate: int = 96, layers: int = 3, positions: int = 64
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


class CharTokenizer:
    """A character tokenizer for the tiny models (vocabulary 97): enough for Lab on them."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = [1 + (ord(c) % 90) for c in text]
        out = type("Encoding", (), {})()
        out.input_ids = torch.tensor([ids]) if return_tensors else ids
        return out

    def decode(self, ids):
        return "".join(chr(32 + int(i)) for i in ids)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M, float32 on CPU."""
    from qviz.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def lab(embedded):
    """One Lab on the embedded model for every test that needs it (its caches are shared)."""
    from qviz import Lab

    model, tok = embedded
    return Lab(model, tok, name="smollm2-135m")


def hook_count(model) -> int:
    """Forward hooks and pre-hooks still registered anywhere in ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
