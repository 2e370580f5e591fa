"""MLP metrics: gate sign flips, top-neuron Jaccard, output cosine."""

from __future__ import annotations

import pytest
import torch

from qviz.metrics import output_cosine, sign_flip_rate, topk_jaccard


def test_identical_inputs():
    x = torch.randn(3, 10, 50)
    assert (sign_flip_rate(x, x.clone()) == 0).all()
    torch.testing.assert_close(topk_jaccard(x, x.clone(), frac=0.1), torch.ones(3).double())
    torch.testing.assert_close(output_cosine(x, x.clone()), torch.ones(3).double())


def test_sign_flip_hand_built():
    ref = torch.tensor([[[1.0, -1.0, 0.0, 2.0]], [[0.0, 0.0, -1.0, -1.0]]])  # [2, 1, 4]
    quant = torch.tensor([[[-1.0, -2.0, 3.0, 0.0]], [[-0.5, 1.0, -1.0, 0.0]]])
    # zero counts as positive: layer 0 flips only the first entry; layer 1 flips 1st and 4th
    torch.testing.assert_close(sign_flip_rate(ref, quant), torch.tensor([0.25, 0.5]).double())
    x = torch.rand(2, 3, 5) + 0.1
    assert (sign_flip_rate(x, -x) == 1).all()


def test_topk_jaccard_hand_built():
    # 10 neurons, frac 0.2 -> top 2 by mean |activation|
    ref = torch.zeros(1, 2, 10)
    ref[0, :, 0] = 5.0
    ref[0, :, 1] = -4.0  # magnitude counts
    quant = torch.zeros(1, 2, 10)
    quant[0, :, 1] = 4.0
    quant[0, :, 7] = 9.0
    torch.testing.assert_close(topk_jaccard(ref, quant, frac=0.2), torch.tensor([1 / 3]).double())
    # tiny frac still keeps one neuron: top-1 sets {0} vs {7}
    torch.testing.assert_close(topk_jaccard(ref, quant, frac=1e-6), torch.tensor([0.0]).double())
    with pytest.raises(ValueError):
        topk_jaccard(ref, quant, frac=0.0)


def test_output_cosine_hand_built():
    ref = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    quant = torch.tensor([[[0.0, 1.0], [2.0, 2.0]]])
    torch.testing.assert_close(output_cosine(ref, quant), torch.tensor([0.5]).double())
    with pytest.raises(ValueError, match="shape"):
        output_cosine(ref, quant[:, :1])
