import pytest
import torch

from qviz.quant import QuantConfig, QuantPlan, quantized
from qviz.quant.engine import QuantEngine, engine_for, targets
from tests.conftest import tiny_llama


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_restored(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


@pytest.mark.parametrize("bits", range(2, 9))
def test_restored_bit_exactly_for_every_bit_width(tiny_model, bits):
    snap = _snapshot(tiny_model)
    x = torch.tensor([[1, 5, 9, 2]])
    ref = tiny_model(x).logits
    with quantized(tiny_model, QuantPlan.uniform(QuantConfig(bits=bits, group_size=32))):
        q = tiny_model(x).logits
    _assert_restored(tiny_model, snap)
    assert torch.equal(tiny_model(x).logits, ref)
    if bits <= 4:
        assert not torch.equal(q, ref)


def test_restored_when_the_body_raises(tiny_model):
    snap = _snapshot(tiny_model)
    with pytest.raises(RuntimeError, match="boom"):
        with quantized(tiny_model, QuantPlan.uniform(QuantConfig(bits=2, group_size=32))):
            raise RuntimeError("boom")
    _assert_restored(tiny_model, snap)


def test_swapped_weights_equal_the_primitive(tiny_model):
    from qviz.quant.engine import quantize_weight

    plan = QuantPlan.uniform(QuantConfig(bits=3, group_size=32))
    engine = engine_for(tiny_model)
    with engine.quantized(plan):
        for t, cfg in targets(tiny_model, engine.adapter, plan):
            orig = engine._active[0][t.name]
            assert torch.equal(t.param.data, quantize_weight(orig, t.layout, cfg, t.name))
            assert not torch.equal(t.param.data, orig)


def test_gpt2_conv1d_groups_run_along_inputs():
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    mod = model.transformer.h[0].mlp.c_fc  # Conv1D weight [in=64, out=256]
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    with quantized(model, plan):
        w = mod.weight.detach().t()  # [out, in]
        # each group of 32 inputs of one output holds at most 2**2 distinct values
        assert max(len(torch.unique(row)) for row in w.reshape(-1, 32)) <= 4


def test_only_layers_and_protect_first(tiny_model):
    engine = QuantEngine(tiny_model)
    cfg = QuantConfig(bits=2, group_size=32)
    names = {
        t.name for t, _ in targets(tiny_model, engine.adapter, QuantPlan.only_layers(cfg, [1]))
    }
    assert names and all(".1." in n for n in names)
    cfgs = {
        t.layer: c.bits
        for t, c in targets(tiny_model, engine.adapter, QuantPlan.protect_first(cfg, 1))
    }
    assert cfgs[0] == 8 and cfgs[1] == 2


def test_cache_hit_lru_and_budget(tiny_model):
    engine = QuantEngine(tiny_model, budget_bytes=10**12)
    p2, p4 = (QuantPlan.uniform(QuantConfig(bits=b, group_size=32)) for b in (2, 4))
    a = engine.materialize(p2)
    assert engine.materialize(p2) is a and engine.materializations == 1
    engine.materialize(p4)
    assert engine.cached_plans == [p2, p4]
    engine.budget_bytes = 1  # over budget: only the most recent plan stays
    engine.materialize(p2)
    assert engine.cached_plans == [p2]


def test_cache_rebuilt_when_original_weights_change(tiny_model):
    engine = QuantEngine(tiny_model)
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=32))
    engine.materialize(plan)
    first = next(iter(targets(tiny_model, engine.adapter, plan)))[0].param
    with torch.no_grad():
        first.mul_(2)  # the user edits the weights in place
    engine.materialize(plan)
    assert engine.materializations == 2


def test_nested_blocks_restore_the_outer_plan(tiny_model):
    snap = _snapshot(tiny_model)
    outer = QuantPlan.uniform(QuantConfig(bits=8, group_size=32))
    inner = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    engine = engine_for(tiny_model)
    with engine.quantized(outer):
        w_outer = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
        with engine.quantized(inner):
            # the inner plan quantizes the originals, not the outer plan's weights
            ref = engine.materialize(inner)
            assert ref is engine._cache[inner]
        for n, p in tiny_model.named_parameters():
            assert torch.equal(p, w_outer[n])
    _assert_restored(tiny_model, snap)


def test_engine_is_per_model_and_shared():
    a, b = tiny_llama(), tiny_llama()
    assert engine_for(a) is engine_for(a) and engine_for(a) is not engine_for(b)


def _llama_576():
    """tiny_llama's config made as wide as SmolLM2 (576 inputs; MLP 1536), one decoder layer."""
    from transformers import LlamaForCausalLM

    cfg = tiny_llama().config
    cfg.update({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 1})
    cfg.update({"num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64})
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


@pytest.mark.parametrize(
    "make, plan, match",
    [
        (
            "tiny",
            QuantPlan.only_layers(QuantConfig(bits=4, group_size=32), [99]),
            r"layers \[99\].*3 decoder layers \(0\.\.2\)",
        ),
        (
            "576",
            QuantPlan.uniform(QuantConfig(bits=4, group_size=100)),
            r"group_size=100 does not divide in_features=576 of model\.layers\.0\.self_attn"
            r"\.q_proj.*divisor such as \[.*192\], a multiple of 32, or group_size=None",
        ),
        (
            "576",
            QuantPlan.uniform(QuantConfig(bits=4, group_size=100, method="gptq")),
            r"group_size=100 .*in_features=576 of model\.layers\.0\.self_attn\.q_proj",
        ),
    ],
)
def test_check_refuses_a_bad_plan_before_any_work(make, plan, match):
    model = tiny_llama() if make == "tiny" else _llama_576()
    snap = _snapshot(model)
    engine = QuantEngine(model)
    with pytest.raises(ValueError, match=match):
        engine.check(plan)
    with pytest.raises(ValueError, match=match):
        engine.materialize(plan)
    with pytest.raises(ValueError, match=match):
        with engine.quantized(plan):
            raise AssertionError("never entered")
    assert engine.cached_plans == [] and engine.materializations == 0 and not engine._jobs
    _assert_restored(model, snap)
    engine.check(QuantPlan.uniform(QuantConfig(bits=4, group_size=64)))  # ragged 576 = 9 x 64 ok
