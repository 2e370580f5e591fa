"""Integration tests on the real embedded SmolLM2-135M."""

import hashlib

import pytest
import torch

from qviz.models.load import EMBEDDED, fetch_embedded
from qviz.quant import QuantConfig, QuantPlan, footprint, quantized

PROMPT = "The capital of France is"


def _next_token(model, tok, plan):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with quantized(model, plan), torch.no_grad():
        return tok.decode([int(model(ids).logits[0, -1].argmax())])


def test_gguf_in_cache_is_verified():
    path = fetch_embedded()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EMBEDDED["smollm2-135m"].sha256


def test_is_the_real_smollm2(embedded):
    model, tok = embedded
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.parametrize(
    "plan, expect_paris",
    [
        (QuantPlan.none(), True),
        (QuantPlan.uniform(QuantConfig(bits=8, group_size=128)), True),
        (QuantPlan.uniform(QuantConfig(bits=4, group_size=128)), True),
        (QuantPlan.uniform(QuantConfig(bits=2, group_size=128)), False),
    ],
    ids=["fp", "8bit", "4bit", "2bit"],
)
def test_paris_survives_8_and_4_bits_not_2(embedded, plan, expect_paris):
    model, tok = embedded
    assert (_next_token(model, tok, plan) == " Paris") is expect_paris


def test_unquantized_logits_equal_plain_transformers(embedded):
    from transformers import AutoModelForCausalLM

    from qviz.models.load import ensure_embedded

    model, tok = embedded
    plain = AutoModelForCausalLM.from_pretrained(ensure_embedded(), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        with quantized(model, QuantPlan.none()):
            ours = model(ids).logits
        assert torch.equal(ours, plain(ids).logits)


def test_asymmetric_4bit_g32_reproduces_the_q4_1_reference(embedded):
    """Reference weights are dequantized Q4_1 (blocks of 32): re-quantizing so is a no-op."""
    model, _ = embedded
    w = model.model.layers[3].mlp.up_proj.weight
    from qviz.quant import fake_quantize

    assert torch.allclose(fake_quantize(w, QuantConfig(bits=4, group_size=32)), w, atol=1e-6)
    assert not torch.allclose(fake_quantize(w, QuantConfig(bits=4, group_size=128)), w, atol=1e-6)


def test_footprint_matches_the_usual_table(embedded):
    model, _ = embedded
    fp = footprint(model, QuantPlan.none(), include_embeddings=False)
    assert fp.bytes == fp.fp16_bytes == fp.params * 2
    for bits, per_param in [(8, 1.0), (4, 0.5), (3, 0.375), (2, 0.25)]:
        f = footprint(model, QuantPlan.uniform(QuantConfig(bits=bits, group_size=128)), False)
        overhead = (
            32 / 128 / 8
        )  # 16-bit scale + 16-bit zero per 128 weights (a bit more: ragged tails)
        assert per_param + overhead <= f.bytes / f.params <= per_param + overhead * 1.3
        sym = footprint(model, QuantPlan.uniform(QuantConfig(bits=bits, symmetric=True)), False)
        assert sym.bytes < f.bytes
