"""footprint(): bytes and effective bits per weight, against counts made by hand."""

from __future__ import annotations

import math

import pytest

from qviz.quant import QuantConfig, QuantPlan, footprint
from tests.conftest import tiny_gpt2, tiny_llama

# tiny_llama: hidden 64, MLP 96, 4 heads of 16 with 2 KV heads, 3 layers, vocab 97, untied
LLAMA_LINEARS = {  # name: (out, in)
    "q_proj": (64, 64),
    "k_proj": (32, 64),
    "v_proj": (32, 64),
    "o_proj": (64, 64),
    "gate_proj": (96, 64),
    "up_proj": (96, 64),
    "down_proj": (64, 96),
}
LLAMA_EMBED = [(97, 64), (97, 64)]  # embed_tokens and lm_head
# tiny_gpt2: n_embd 64, 2 layers, Conv1D weights stored [in, out]; wte tied to lm_head
GPT2_LINEARS = {
    "c_attn": (192, 64),
    "attn.c_proj": (64, 64),
    "c_fc": (256, 64),
    "mlp.c_proj": (64, 256),
}


def _bits(out_f, in_f, bits, group, symmetric):
    """Codes plus a 16-bit scale (and a 16-bit zero unless symmetric) per group of each row."""
    if bits is None:
        return out_f * in_f * 16
    groups = math.ceil(in_f / (in_f if group is None else group))
    return out_f * in_f * bits + out_f * groups * 16 * (1 if symmetric else 2)


def _expected(linears, n_layers, embed, layer_cfg, emb_cfg=(None, None, False)):
    total_bits, params = 0, 0
    for i in range(n_layers):
        for out_f, in_f in linears.values():
            total_bits += _bits(out_f, in_f, *layer_cfg(i))
            params += out_f * in_f
    for out_f, in_f in embed:
        total_bits += _bits(out_f, in_f, *emb_cfg)
        params += out_f * in_f
    return total_bits / 8, params


@pytest.mark.parametrize(
    "bits, group, symmetric", [(4, 32, False), (2, 64, True), (3, None, False), (8, 128, True)]
)
def test_uniform_plan_on_llama(bits, group, symmetric):
    model = tiny_llama()
    fp = footprint(model, QuantPlan.uniform(QuantConfig(bits, group, symmetric)))
    want_bytes, params = _expected(
        LLAMA_LINEARS, 3, LLAMA_EMBED, lambda i: (bits, group, symmetric)
    )
    assert fp.params == params == sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)
    assert fp.bytes == want_bytes
    assert fp.effective_bits == pytest.approx(want_bytes * 8 / params, rel=1e-12)
    assert fp.fp16_bytes == params * 2
    assert len(fp.rows) == 3 * 7 + 2


def test_ragged_group_counts_the_short_group():
    # group 64 on down_proj's 96 inputs: one group of 64 and one of 32 per row
    fp = footprint(tiny_llama(), QuantPlan.only_layers(QuantConfig(4, 64), [1]))
    row = fp.to_frame().set_index("name").loc["model.layers.1.mlp.down_proj"]
    assert row.bytes == (64 * 96 * 4 + 64 * 2 * 32) / 8 and row.bits == 4


def test_protect_first_embeddings_and_per_layer():
    cfg = QuantConfig(2, 32)
    plan = QuantPlan(
        default=cfg, overrides=QuantPlan.protect_first(cfg, n=1, bits=8).overrides, embeddings=True
    )
    fp = footprint(tiny_llama(), plan)
    want, params = _expected(
        LLAMA_LINEARS,
        3,
        LLAMA_EMBED,
        lambda i: (8 if i == 0 else 2, 32, False),
        emb_cfg=(2, 32, False),
    )
    assert fp.bytes == want and fp.params == params
    per = fp.per_layer()
    assert list(per.index) == [-1, 0, 1, 2]
    layer0 = sum(_bits(o, i, 8, 32, False) for o, i in LLAMA_LINEARS.values()) / 8
    assert per.loc[0, "bytes"] == layer0
    assert per.loc[0, "effective_bits"] == pytest.approx(layer0 * 8 / per.loc[0, "params"])
    no_emb = footprint(tiny_llama(), plan, include_embeddings=False)
    assert no_emb.params == params - 2 * 97 * 64


def test_full_precision_is_16_bits_and_gpt2_counts_tied_weights_once():
    fp = footprint(tiny_llama(), QuantPlan.none())
    assert fp.effective_bits == 16 and fp.bytes == fp.fp16_bytes
    model = tiny_gpt2()
    fp = footprint(model, QuantPlan.uniform(QuantConfig(4, 32)))
    want, params = _expected(GPT2_LINEARS, 2, [(97, 64)], lambda i: (4, 32, False))
    assert fp.bytes == want and fp.params == params
    assert "MiB" in repr(fp) and f"{fp.effective_bits:.3f}" in repr(fp)
