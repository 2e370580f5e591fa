"""Residual-stream drift: cosine and relative L2 per layer."""

from __future__ import annotations

import math

import torch

from qviz.metrics import residual_drift


def test_identical_inputs():
    x = torch.randn(5, 7, 16)
    cos, rel = residual_drift(x, x.clone())
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64))
    assert (rel == 0).all()


def test_hand_built():
    ref = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [3.0, 4.0]]])  # [2, 2, 2]
    quant = torch.tensor([[[0.0, 1.0], [0.0, 5.0]], [[-3.0, -4.0], [3.0, 4.0]]])
    cos, rel = residual_drift(ref, quant)
    torch.testing.assert_close(cos, torch.tensor([0.5, 0.0], dtype=torch.float64))
    # layer 0: ||q - r|| = sqrt(1 + 1 + 9) over ||r|| = sqrt(1 + 4)
    # layer 1: ||q - r|| = 10 over ||r|| = sqrt(50)
    want = torch.tensor([math.sqrt(11 / 5), 10 / math.sqrt(50)], dtype=torch.float64)
    torch.testing.assert_close(rel, want)


def test_scaled_quant_keeps_cosine():
    x = torch.randn(3, 4, 8)
    cos, rel = residual_drift(x, 2 * x)
    torch.testing.assert_close(cos, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(rel, torch.ones(3, dtype=torch.float64))


def test_zero_tokens_do_not_give_nan():
    ref = torch.zeros(2, 3, 4)
    cos, rel = residual_drift(ref, ref.clone())
    assert not torch.isnan(cos).any() and not torch.isnan(rel).any()
    torch.testing.assert_close(cos, torch.ones(2, dtype=torch.float64))
