"""Result objects: frames, and the fields the views read (LayerMap.difference and .how)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from qviz.results import LayerMap, MemoryTable


def test_layer_map_difference_is_values_minus_reference():
    rng = np.random.default_rng(0)
    values, ref = rng.random((4, 4)), rng.random((4, 4))
    m = LayerMap(values, n_samples=20, estimator="biased", reference=ref, n_prompts=32,
                 drop_first=True)  # fmt: skip
    np.testing.assert_array_equal(m.difference, values - ref)
    assert m.how == "pooled over 32 prompts, first token left out (20 samples, biased)"
    old = LayerMap(values, n_samples=5, estimator="biased")  # the fields have defaults
    assert old.difference is None and old.reference is None
    assert old.how == "1 prompt, all tokens (5 samples, biased)"
    frame = m.to_frame()
    assert len(frame) == 16 and frame["cka"].iloc[5] == values[1, 1]


def test_memory_table_frame_keeps_the_order_and_finds_rows():
    rows = [
        {"plan": "fp", "bits": 16, "mib": 256.0, "effective_bits": 16.0, "accuracy": 0.9},
        {"plan": "rtn4-g128", "bits": 4, "mib": 70.5, "effective_bits": 4.25,
         "accuracy": float("nan")},
    ]  # fmt: skip
    t = MemoryTable(rows, n_facts=60)
    frame = t.to_frame()
    assert list(frame.columns) == ["plan", "bits", "mib", "effective_bits", "accuracy"]
    assert list(frame["plan"]) == ["fp", "rtn4-g128"]
    assert pd.isna(frame["accuracy"][1])
    assert t.row("rtn4-g128")["mib"] == 70.5 and t.row("gptq2") is None
