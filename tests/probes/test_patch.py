"""Causal tracing: the batched grid against a plain one-forward-per-cell reference written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qviz import Lab, QuantConfig, QuantPlan
from tests.conftest import CharTokenizer, hook_count, tiny_gpt2, tiny_llama

FRANCE = "The capital of France is"
COMPONENTS = ("resid", "attn", "mlp")


# the reference: one full forward per cell, hooks written independently of qviz.probes.patch ----
def _acts(lab: Lab, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"resid": [L, T, D] layer inputs, "attn": [L, T, D], "mlp": [L, T, D]} of one run."""
    ad = lab.adapter
    layers = ad.decoder_layers(lab.model)
    store = {k: [None] * len(layers) for k in COMPONENTS}
    hs = []
    for i, layer in enumerate(layers):

        def pre(m, a, k, i=i):
            store["resid"][i] = (a[0] if a else k["hidden_states"])[0].clone()

        def post(name, i):
            def hook(m, a, o):
                store[name][i] = (o[0] if isinstance(o, tuple) else o)[0].clone()

            return hook

        hs.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hs.append(layer.get_submodule(ad.attn).register_forward_hook(post("attn", i)))
        hs.append(layer.get_submodule(ad.mlp).register_forward_hook(post("mlp", i)))
    try:
        with torch.no_grad():
            lab.model(ids, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.stack(v) for k, v in store.items()}


def _cell(lab, ids, src, component, layers, t, tid) -> float:
    """Target probability at the last position with ``component`` at (layers, t) from src."""
    hs = []
    for m in layers:
        layer = lab.adapter.decoder_layers(lab.model)[m]
        value = src[component][m, t]
        if component == "resid":

            def pre(mod, a, k, v=value):
                if a:
                    x = a[0].clone()
                    x[0, t] = v
                    return (x, *a[1:]), k
                x = k["hidden_states"].clone()
                x[0, t] = v
                return a, {**k, "hidden_states": x}

            hs.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(mod, a, o, v=value):
                x = (o[0] if isinstance(o, tuple) else o).clone()
                x[0, t] = v
                return (x, *o[1:]) if isinstance(o, tuple) else x

            path = lab.adapter.attn if component == "attn" else lab.adapter.mlp
            hs.append(layer.get_submodule(path).register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = lab.model(ids, use_cache=False).logits[0, -1]
    finally:
        for h in hs:
            h.remove()
    return float(torch.softmax(logits.float(), -1)[tid])


def reference_grid(lab, prompt, target, plan, component, direction, window=1, cells=None):
    """[L, T] by the plain loop (NaN outside ``cells``)."""
    ids = lab.encode(prompt)
    tid = lab.target_id(target)
    with lab.quantized(plan):
        q = _acts(lab, ids)
    with lab.quantized(QuantPlan.none()):
        r = _acts(lab, ids)
    src, base_plan = (r, plan) if direction == "restore" else (q, QuantPlan.none())
    n, t_len = lab.n_layers, ids.shape[1]
    cells = cells or [(i, t) for i in range(n) for t in range(t_len)]
    grid = np.full((n, t_len), np.nan)
    with lab.quantized(base_plan):
        for i, t in cells:
            layers = range(max(0, i - window // 2), min(n, i - (-window // 2)))
            grid[i, t] = _cell(lab, ids, src, component, layers, t, tid)
    return grid


# tiny models -------------------------------------------------------------------------------------
@pytest.fixture(params=["llama", "gpt2"])
def tiny_lab(request):
    model = tiny_llama() if request.param == "llama" else tiny_gpt2()
    return Lab(model, CharTokenizer())


def _top1(lab, prompt):
    with torch.no_grad():
        return int(lab.model(lab.encode(prompt), use_cache=False).logits[0, -1].argmax())


@pytest.mark.parametrize("direction", ["restore", "corrupt"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_batched_grid_equals_per_cell_tiny(tiny_lab, component, direction):
    prompt, plan = "abcdefghij", QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    tid = _top1(tiny_lab, prompt)
    for window in (1, 3):
        grid = tiny_lab.trace(prompt, tid, plan, component, direction, window=window)
        ref = reference_grid(tiny_lab, prompt, tid, plan, component, direction, window)
        assert grid.prob.shape == (tiny_lab.n_layers, 10) and not np.isnan(grid.prob).any()
        np.testing.assert_allclose(grid.prob, ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(grid.prob, ref, atol=1e-6, rtol=1e-4)  # tiny probabilities
        assert grid.direction == direction and grid.window == window
        # chunking (one row per forward) changes nothing
        small = tiny_lab.trace(prompt, tid, plan, component, direction, window, max_tokens=1)
        np.testing.assert_allclose(small.prob, grid.prob, atol=1e-6)
    assert hook_count(tiny_lab.model) == 0


@pytest.mark.parametrize("component", COMPONENTS)
def test_per_cell_last_equals_the_reference(tiny_lab, component):
    """The public per-cell loop (the benchmark's fair baseline) on a subset of cells, window 3."""
    from qviz.probes.patch import per_cell_last, run_cache

    prompt, plan = "abcdefg", QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    tid = _top1(tiny_lab, prompt)
    ids, last = tiny_lab.encode(prompt), tiny_lab.n_layers - 1
    with tiny_lab.quantized(QuantPlan.none()):
        src = run_cache(tiny_lab.model, tiny_lab.adapter, ids, tid)
    with tiny_lab.quantized(plan):
        grid = per_cell_last(
            tiny_lab.model, tiny_lab.adapter, ids, src, tid, component, 3, [0, last], [1, 6]
        )
        full = per_cell_last(tiny_lab.model, tiny_lab.adapter, ids, src, tid, component, 3,
                             [0, last], [1, 6], last_only=False)  # fmt: skip
    cells = [(i, t) for i in (0, last) for t in (1, 6)]
    ref = reference_grid(tiny_lab, prompt, tid, plan, component, "restore", 3, cells)
    np.testing.assert_allclose(grid, ref, atol=1e-6, rtol=1e-4, equal_nan=True)
    np.testing.assert_allclose(full, grid, atol=1e-6, equal_nan=True)
    assert np.isnan(grid).sum() == grid.size - 4 and hook_count(tiny_lab.model) == 0


def test_full_precision_recovery_is_undefined_not_a_crash(tiny_lab):
    grid = tiny_lab.trace("abcdef", 5, QuantPlan.none())
    assert grid.recovery is None and not grid.defined
    assert "undefined" in grid.recovery_note
    assert np.allclose(grid.prob, grid.p_reference, atol=1e-6)
    assert np.isnan(grid.best_recovery) and np.isnan(grid.mean_best_recovery)
    assert grid.best_cell is None
    frame = grid.to_frame()
    assert len(frame) == tiny_lab.n_layers * 6 and frame.recovery.isna().all()
    assert not frame.prob.isna().any()


def test_trace_rejects_bad_arguments(tiny_lab):
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="component"):
        tiny_lab.trace("abc", 5, plan, component="ffn")
    with pytest.raises(ValueError, match="direction"):
        tiny_lab.trace("abc", 5, plan, direction="forward")
    with pytest.raises(ValueError, match="window"):
        tiny_lab.trace("abc", 5, plan, window=0)


# the embedded model --------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.parametrize("direction", ["restore", "corrupt"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_batched_grid_equals_per_cell_embedded(lab, component, direction):
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
    grid = lab.trace(FRANCE, " Paris", plan, component, direction)
    t_len = len(grid.tokens)
    cells = [(i, t) for i in (0, 5, 14, 22, 29) for t in (0, t_len // 2, t_len - 1)]
    ref = reference_grid(lab, FRANCE, " Paris", plan, component, direction, cells=cells)
    got = np.array([grid.prob[i, t] for i, t in cells])
    want = np.array([ref[i, t] for i, t in cells])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert grid.defined and np.isfinite(grid.recovery).all()
    assert hook_count(lab.model) == 0


@pytest.mark.model
def test_4bit_recovers_more_than_2bit(lab):
    g4 = lab.trace(FRANCE, " Paris", QuantPlan.uniform(QuantConfig(bits=4, group_size=128)))
    g2 = lab.trace(FRANCE, " Paris", QuantPlan.uniform(QuantConfig(bits=2, group_size=128)))
    assert g4.p_quantized < g4.p_reference and g2.p_quantized < g2.p_reference
    assert g4.mean_best_recovery > g2.mean_best_recovery, (
        g4.mean_best_recovery,
        g2.mean_best_recovery,
    )
