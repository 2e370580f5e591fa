import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qviz.quant import QuantConfig, dequantize, fake_quantize, quantize
from qviz.quant.primitives import group_size_for


def _group_ids(in_f: int, g: int) -> torch.Tensor:
    return torch.arange(in_f) // g


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 9),
    n_groups=st.integers(1, 4),
    g=st.sampled_from([4, 8, 32, 64]),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_codes_in_range_and_error_within_half_step(
    out_f, n_groups, g, bits, symmetric, scale, seed
):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, n_groups * g, generator=gen) * scale
    cfg = QuantConfig(bits=bits, group_size=g, symmetric=symmetric)
    q = quantize(w, cfg)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 2**bits - 1
    err = (w - dequantize(q)).abs()
    step = q.scale[:, _group_ids(w.shape[1], g)]
    assert (err <= step / 2 + 1e-6 * step + 1e-6 * w.abs()).all()
    assert torch.equal(fake_quantize(w, cfg), dequantize(q))


def test_asymmetric_matches_definition():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.5, -1.0, 5.0, 5.0, 5.0]])
    q = quantize(w, QuantConfig(bits=2, group_size=4))
    assert torch.allclose(q.scale[0], torch.tensor([3.5 / 3, 6.0 / 3]))
    assert torch.equal(q.zero[0], torch.tensor([0.0, -1.0]))


def test_symmetric_zero_point_and_scale():
    w = torch.tensor([[-4.0, -1.0, 0.0, 2.0]])
    q = quantize(w, QuantConfig(bits=3, group_size=4, symmetric=True))
    assert torch.allclose(q.scale, torch.tensor([[4.0 / 3]]))
    assert torch.allclose(q.zero, -4 * q.scale)
    assert int(q.codes[0, 2]) == 4  # zero maps to the fixed zero point 2**(bits-1)


def test_constant_group_is_exact_and_finite():
    w = torch.full((2, 8), 0.3)
    for sym in (False, True):
        out = dequantize(quantize(w, QuantConfig(bits=2, group_size=4, symmetric=sym)))
        assert torch.isfinite(out).all()
    assert torch.equal(dequantize(quantize(w, QuantConfig(bits=2, group_size=4))), w)


def test_ragged_last_group_for_multiples_of_32():
    w = torch.randn(3, 576)
    q = quantize(w, QuantConfig(bits=4, group_size=128))
    assert q.scale.shape == (3, 5)  # 4 groups of 128 and one of 64
    tail = w[:, 512:]
    assert torch.allclose(q.zero[:, 4], tail.min(1).values)


def test_group_size_that_fits_nothing_names_the_layer():
    with pytest.raises(ValueError, match=r"group_size=100.*576.*model.layers.3.mlp.up_proj"):
        group_size_for(QuantConfig(bits=4, group_size=100), 576, "model.layers.3.mlp.up_proj")


def test_input_never_modified():
    w = torch.randn(4, 64)
    before = w.clone()
    fake_quantize(w, QuantConfig(bits=2, group_size=32))
    quantize(w, QuantConfig(bits=2, group_size=32))
    assert torch.equal(w, before)
