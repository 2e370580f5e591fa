"""The METHODS registry: settings owned by their method, labels, a new method in one file."""

from __future__ import annotations

import pytest
import torch

from qviz.quant import METHODS, Method, QuantConfig, QuantPlan
from qviz.quant.engine import QuantEngine
from qviz.quant.primitives import fake_quantize
from tests.conftest import tiny_llama


def test_registry_lists_the_builtin_methods():
    assert list(METHODS) == ["rtn", "gptq", "hqq", "gguf"]
    assert METHODS["gptq"].calibrated and not METHODS["rtn"].calibrated
    assert all(isinstance(METHODS[name], Method) and METHODS[name].name == name for name in METHODS)
    assert "awq" not in METHODS and len(METHODS) == 4


def test_old_spelling_still_works_and_labels_are_unchanged():
    cfg = QuantConfig(4, 128, True, "gptq")
    assert cfg == QuantConfig(bits=4, group_size=128, symmetric=True, method="gptq", settings=())
    assert cfg.label == "gptq4-g128-sym" and QuantConfig(2, None).label == "rtn2-ch"
    plan = QuantPlan.protect_first(QuantConfig(3, 64, method="gptq"), n=1)
    assert plan.label == "gptq3-g64 L0:gptq8-g64"
    # default values given explicitly are the same config (same hash: same cache entry)
    explicit = QuantConfig(4, 128, True, "gptq", damp=0.01, act_order=False)
    assert explicit == cfg and hash(explicit) == hash(cfg) and explicit.settings == ()


def test_gptq_settings_normalized_hashable_and_read_back():
    a = QuantConfig(4, 64, method="gptq", act_order=True, damp=0.05, n_seq=8, seq_len=32)
    b = QuantConfig.of(
        "gptq", 4, 64, settings={"seq_len": 32, "n_seq": 8, "damp": 0.05}, act_order=True
    )
    assert a == b and hash(a) == hash(b)
    assert a.settings == (("act_order", True), ("damp", 0.05), ("n_seq", 8), ("seq_len", 32))
    assert (a.setting("damp"), a.act_order, a.n_seq) == (0.05, True, 8)
    assert a.label == "gptq4-g64-ao-damp0.05-cal8x32"
    assert a != QuantConfig(4, 64, method="gptq")
    assert QuantConfig(4, method="gptq", n_seq=8).label == "gptq4-g128-nseq8"
    with pytest.raises(AttributeError):
        a.default = 1


def test_calibration_size_defaults_to_the_environment(monkeypatch):
    cfg = QuantConfig(4, method="gptq")
    monkeypatch.delenv("QVIZ_GPTQ_NSEQ", raising=False)
    assert (cfg.n_seq, cfg.seq_len) == (128, 256)
    monkeypatch.setenv("QVIZ_GPTQ_NSEQ", "7")
    assert cfg.n_seq == 7 and QuantConfig(4, method="gptq", n_seq=3).n_seq == 3


def test_a_gptq_setting_on_rtn_names_setting_and_owner():
    with pytest.raises(ValueError, match=r"act_order is a setting of method 'gptq'.*'rtn'"):
        QuantConfig(bits=4, method="rtn", act_order=True)
    with pytest.raises(ValueError, match=r"n_seq is a setting of method 'gptq'"):
        QuantConfig(4, settings={"n_seq": 8})
    with pytest.raises(ValueError, match=r"unknown setting 'blocks' for method='gptq'"):
        QuantConfig(4, method="gptq", blocks=2)
    with pytest.raises(AttributeError, match="damp is a setting of method 'gptq'"):
        _ = QuantConfig(4).damp


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"damp": 0}, r"damp must be in \(0, 1\), got damp=0"),
        ({"damp": 1.5}, r"damp=1.5"),
        ({"act_order": "yes"}, r"act_order must be True or False, got act_order='yes'"),
        ({"n_seq": 0}, r"n_seq must be a positive int.*0"),
        ({"seq_len": 2.5}, r"seq_len must be a positive int.*2.5"),
    ],
)
def test_gptq_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(4, method="gptq", **kw)


def test_one_plan_shares_one_calibration_pass():
    plan = QuantPlan(
        default=QuantConfig(4, 32, method="gptq", n_seq=4),
        overrides=((0, QuantConfig(8, 32, method="gptq", n_seq=8)),),
    )
    with pytest.raises(ValueError, match="same n_seq and seq_len"):
        QuantEngine(tiny_llama()).check(plan)


def test_group_sizes_a_method_can_use():
    rtn = METHODS["rtn"]
    assert rtn.group_size_ok(None, 576) and rtn.group_size_ok(64, 576)
    assert rtn.group_size_ok(128, 576)  # ragged last group
    assert not rtn.group_size_ok(100, 576)


# a new method: one class (a file of its own in qviz/quant/) plus one registration --------------
class Zero(Method):
    """Every quantized weight becomes zero, except that sign survives at 1 bit of magnitude."""

    name = "zero"
    defaults = {"scale": 0.0}

    def check_setting(self, key, value):
        if not isinstance(value, float):
            raise ValueError(f"scale must be a float, got scale={value!r}")
        return value

    def group_size_ok(self, group_size, in_features):
        return group_size is None  # per output row only

    def quantize_weight(self, w, cfg, name):
        return torch.sign(w) * cfg.setting("scale")


@pytest.fixture
def zero_method():
    method = METHODS.register(Zero())
    try:
        yield method
    finally:
        METHODS.unregister("zero")
    assert "zero" not in METHODS


def test_a_registered_method_runs_through_the_engine(zero_method):
    assert list(METHODS) == ["rtn", "gptq", "hqq", "gguf", "zero"]
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register(Zero())
    model = tiny_llama()
    engine = QuantEngine(model)
    toy = QuantConfig(4, None, method="zero", scale=0.5)
    assert toy.label == "zero4-ch-scale0.5"
    rtn = QuantConfig(4, 32)
    plan = QuantPlan(default=toy, overrides=((1, rtn),))  # methods mixed per layer
    weights = engine.materialize(plan)
    layer0 = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(weights["model.layers.0.self_attn.q_proj"], torch.sign(layer0) * 0.5)
    up1 = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(weights["model.layers.1.mlp.up_proj"], fake_quantize(up1, rtn))
    with engine.quantized(plan):
        assert torch.equal(
            model.model.layers[2].mlp.down_proj.weight.abs().unique(), torch.tensor([0.5])
        )
    with pytest.raises(
        ValueError, match=r"group_size=32 .*method=.zero.*q_proj.*in_features=64.*\[None\]"
    ):
        engine.check(QuantPlan.uniform(QuantConfig(4, 32, method="zero")))
    with pytest.raises(ValueError, match="scale must be a float"):
        QuantConfig(4, None, method="zero", scale=1)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(
        ValueError, match=r"one of \('rtn', 'gptq', 'hqq', 'gguf'\), got method='zero'"
    ):
        QuantConfig(4, method="zero")


def test_parse_method_reads_gguf_options():
    from qviz.quant.methods import parse_method

    assert parse_method("gguf:Q4_K") == ("gguf", {"type": "Q4_K"})
    assert parse_method(" GGUF:q2_k+imatrix ") == ("gguf", {"type": "Q2_K", "imatrix": True})
    with pytest.raises(ValueError, match=r"unknown GGUF option 'im' in gguf:Q2_K\+im; choices"):
        parse_method("gguf:Q2_K+im")
    with pytest.raises(ValueError, match=r"takes no ':' argument, got rtn:Q2_K\+imatrix"):
        parse_method("rtn:Q2_K+imatrix")
