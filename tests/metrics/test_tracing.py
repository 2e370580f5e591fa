"""Causal-tracing arithmetic: ROME's window rule, recovery (None when undefined), peak layer."""

from __future__ import annotations

import numpy as np
import pytest

from qviz.metrics.tracing import peak_layer, recovery, window_layers


def test_window_layers_rome_rule():
    assert list(window_layers(0, 1, 5)) == [0]
    assert list(window_layers(2, 3, 5)) == [1, 2, 3]
    assert list(window_layers(0, 4, 5)) == [0, 1]  # l - w//2 .. l + ceil(w/2), clipped
    assert list(window_layers(4, 10, 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="window"):
        window_layers(0, 0, 5)
    with pytest.raises(ValueError, match="layer"):
        window_layers(5, 1, 5)


def test_recovery_and_its_none_note():
    rec, note = recovery(np.array([[0.1, 0.5, 0.9]]), 0.9, 0.1)
    np.testing.assert_allclose(rec, [[0, 0.5, 1]])
    assert "p_reference" in note
    rec, note = recovery(np.zeros((2, 2)), 0.3, 0.3)
    assert rec is None and "undefined" in note and "eps" in note
    rec, note = recovery(np.zeros(2), 0.3, 0.30001, eps=1e-3)
    assert rec is None
    rec, _ = recovery(np.zeros(2), float("nan"), 0.3)
    assert rec is None


def test_peak_layer_rule():
    probs = np.array([[0.0, 0.1, 0.6, 0.2, 0.9], [0.0, 0.2, 0.4, 0.3, 0.8]])
    assert peak_layer(probs) == 1  # state 2 = output of layer 1; the last layer is excluded
    assert peak_layer(probs, exclude_last=False) == 3
    assert peak_layer(probs[0]) == 1
    assert peak_layer(np.array([[0.0, np.nan, 0.1, 0.0]])) == 1  # NaN never wins
    with pytest.raises(ValueError, match="lens_prob"):
        peak_layer(np.zeros((0, 3)))
