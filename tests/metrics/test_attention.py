"""Attention metrics: normalized entropy and Jensen-Shannon divergence."""

from __future__ import annotations

import math

import pytest
import torch

from qviz.metrics import js_divergence, normalized_entropy


def uniform_causal(layers: int, heads: int, t: int) -> torch.Tensor:
    mask = torch.tril(torch.ones(t, t))
    p = mask / mask.sum(dim=-1, keepdim=True)
    return p.expand(layers, heads, t, t).clone()


def first_token(layers: int, heads: int, t: int) -> torch.Tensor:
    p = torch.zeros(layers, heads, t, t)
    p[..., 0] = 1.0  # every query attends only to the first token (a sink)
    return p


def random_causal(layers: int, heads: int, t: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, heads, t, t, generator=gen)
    scores = scores.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_uniform_gives_one_and_one_hot_zero():
    torch.testing.assert_close(normalized_entropy(uniform_causal(2, 3, 6)), torch.ones(2, 3))
    assert (normalized_entropy(first_token(2, 3, 6)) == 0).all()


def test_entropy_hand_built():
    # T = 3: q=1 uniform over 2 keys -> 1; q=2 one-hot -> 0; average 0.5
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]).expand(1, 1, 3, 3)
    torch.testing.assert_close(normalized_entropy(p), torch.tensor([[0.5]]))
    # q=2 split over 2 of 3 keys: ln 2 / ln 3
    p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]).expand(1, 1, 3, 3)
    want = torch.tensor([[0.5 * math.log(2) / math.log(3)]])
    torch.testing.assert_close(normalized_entropy(p), want)


def test_entropy_in_unit_interval():
    h = normalized_entropy(random_causal(3, 4, 8))
    assert ((h > 0) & (h < 1)).all()


def test_js_identical_is_zero():
    p = random_causal(2, 2, 7)
    torch.testing.assert_close(js_divergence(p, p.clone()), torch.zeros(2, 2))


def test_js_hand_built():
    # disjoint supports at every query q >= 1 -> ln 2
    p = first_token(1, 1, 4)
    q = torch.eye(4).expand(1, 1, 4, 4)
    torch.testing.assert_close(js_divergence(p, q), torch.full((1, 1), math.log(2)))
    # T = 2, q = 1: [1, 0] vs [0.5, 0.5]; m = [0.75, 0.25]
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(1, 1, 2, 2)
    b = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).expand(1, 1, 2, 2)
    kl_am = math.log(1 / 0.75)
    kl_bm = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    want = torch.tensor([[0.5 * (kl_am + kl_bm)]])
    torch.testing.assert_close(js_divergence(a, b), want)
    torch.testing.assert_close(js_divergence(b, a), want)


def test_js_bounded():
    js = js_divergence(random_causal(2, 3, 9, seed=1), random_causal(2, 3, 9, seed=2))
    assert ((js > 0) & (js <= math.log(2))).all()


def test_bad_shapes():
    with pytest.raises(ValueError):
        normalized_entropy(torch.ones(1, 1, 1, 1))
    with pytest.raises(ValueError):
        normalized_entropy(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        js_divergence(random_causal(1, 1, 4), random_causal(1, 1, 5))
