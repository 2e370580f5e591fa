import pytest

from qviz.models import ADAPTERS, get_adapter

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox"}


def test_table_covers_required_types():
    assert REQUIRED <= set(ADAPTERS)


def test_unknown_type_lists_the_supported_ones():
    with pytest.raises(NotImplementedError, match=r"'bert'.*gpt2.*llama"):
        get_adapter("bert")


def test_adapter_paths_resolve_on_real_modules(tiny_model):
    ad = get_adapter(tiny_model)
    layers = ad.decoder_layers(tiny_model)
    assert len(layers) == tiny_model.config.num_hidden_layers
    for path in (ad.final_norm, ad.unembed, ad.embed):
        tiny_model.get_submodule(path)
    for rel in ad.linears + (ad.attn, ad.mlp, ad.gate):
        layers[0].get_submodule(rel)


def test_gpt_neox_and_qwen2_paths_resolve():
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    models = [
        GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=50,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
            )
        ),
        Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=50,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
            )
        ),
    ]
    for m in models:
        ad = get_adapter(m)
        for rel in ad.linears:
            ad.decoder_layers(m)[0].get_submodule(rel)
        m.get_submodule(ad.unembed)


def test_adapter_owns_fast_path_unembedding_and_softcap(tiny_model):
    import torch

    ad = get_adapter(tiny_model)
    norm, head = ad.unembedding(tiny_model)
    assert norm is tiny_model.get_submodule(ad.final_norm) and head is tiny_model.lm_head
    assert ad.logit_softcap(tiny_model) is None
    x = torch.randn(3, 5)
    assert torch.equal(ad.apply_softcap(tiny_model, x), x)
    want_fast = ad.model_type == "llama"
    assert ad.fast_path(tiny_model, n_tokens=8) is want_fast
    if want_fast:
        assert ad.rotary_embedding(tiny_model) is tiny_model.model.rotary_emb


def test_softcap_and_slow_path_are_declared():
    from types import SimpleNamespace

    import torch

    g2 = ADAPTERS["gemma2"]
    assert not g2.fast_tracing and g2.softcap_attr == "final_logit_softcapping"
    fake = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0))
    assert g2.logit_softcap(fake) == 30.0
    capped = g2.apply_softcap(fake, torch.tensor([1000.0, -1000.0, 0.0]))
    assert torch.allclose(capped, torch.tensor([30.0, -30.0, 0.0]))
    assert not ADAPTERS["gpt2"].fast_tracing and ADAPTERS["qwen2"].fast_tracing
