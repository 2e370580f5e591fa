import pytest

from qviz.quant import QuantConfig, QuantPlan


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True])
def test_bad_bits_repeat_the_value(bits):
    with pytest.raises(ValueError, match=rf"bits.*2\.\.8.*{bits!r}"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("gs", [0, -4, 1.5])
def test_bad_group_size(gs):
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(bits=4, group_size=gs)


def test_bad_method():
    with pytest.raises(ValueError, match="'awq'"):
        QuantConfig(bits=4, method="awq")


def test_configs_and_plans_are_hashable_and_frozen():
    a = QuantPlan.uniform(QuantConfig(bits=4))
    assert a == QuantPlan.uniform(QuantConfig(bits=4)) and hash(a) == hash(
        QuantPlan.uniform(QuantConfig(4))
    )
    assert len({a, QuantPlan.uniform(QuantConfig(bits=2)), QuantPlan.none()}) == 3
    with pytest.raises(AttributeError):
        a.default = None


def test_plan_constructors():
    cfg = QuantConfig(bits=4)
    p = QuantPlan.protect_first(cfg, n=2, bits=8)
    assert [p.config_for(i).bits for i in range(4)] == [8, 8, 4, 4]
    p = QuantPlan.only_layers(cfg, [2, 0])
    assert [p.config_for(i) for i in range(4)] == [cfg, None, cfg, None]
    assert QuantPlan.none().is_full_precision and not p.is_full_precision
    assert QuantPlan.only_layers(cfg, []).is_full_precision


def test_plan_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layers \[7\].*3 decoder layers"):
        QuantPlan.only_layers(QuantConfig(bits=4), [7]).check_layers(3)
