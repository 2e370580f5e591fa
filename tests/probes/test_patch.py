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


@pytest.mark.filterwarnings("error::FutureWarning")  # (a deprecated cache argument: no)
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


# fast mode: attribution patching, then the cells that matter exactly -----------------------------
def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable").astype(float)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


@pytest.mark.parametrize("component", COMPONENTS)
def test_attribution_is_the_directional_derivative(component):
    """target_grads . (source - base) against a central finite difference of the plain hooks."""
    from qviz.probes.attrib import estimate_grid, target_grads
    from qviz.probes.patch import run_cache

    lab = Lab(tiny_llama(), CharTokenizer())
    prompt, plan = "abcdefgh", QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    tid, ids = _top1(lab, prompt), lab.encode(prompt)
    with lab.quantized(QuantPlan.none()):
        r, src = run_cache(lab.model, lab.adapter, ids, tid), _acts(lab, ids)
    with lab.quantized(plan):
        q, base = run_cache(lab.model, lab.adapter, ids, tid), _acts(lab, ids)
        est = estimate_grid(q, r, target_grads(lab.model, lab.adapter, ids, tid), component)
        h = 1e-2
        for i, t in [(0, 3), (1, 0), (2, 7), (lab.n_layers - 1, 5)]:
            d = src[component] - base[component]
            up = _cell(lab, ids, {component: base[component] + h * d}, component, [i], t, tid)
            dn = _cell(lab, ids, {component: base[component] - h * d}, component, [i], t, tid)
            want = (up - dn) / (2 * h)
            assert est[i, t] - q.prob == pytest.approx(want, abs=1e-4, rel=1e-2), (i, t)
    assert hook_count(lab.model) == 0


@pytest.mark.parametrize("direction", ["restore", "corrupt"])
def test_fast_mode_exact_cells_equal_the_exact_grid(tiny_lab, direction):
    prompt, plan = "abcdefghij", QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    tid = _top1(tiny_lab, prompt)
    exact = tiny_lab.trace(prompt, tid, plan, "mlp", direction, window=3)
    fast = tiny_lab.trace(prompt, tid, plan, "mlp", direction, window=3, mode="fast", top=4)
    assert exact.exact is None and exact.estimate is None and exact.all_exact
    assert fast.exact.shape == fast.estimate.shape == exact.prob.shape and not fast.all_exact
    # the 4 largest estimated effects and each layer's best estimated cell are exact
    n = int(fast.exact.sum())
    assert tiny_lab.n_layers <= n <= 4 + tiny_lab.n_layers
    p_base = exact.p_quantized if direction == "restore" else exact.p_reference
    effect = np.abs(fast.estimate - p_base)
    assert fast.exact.ravel()[np.argsort(-effect, axis=None, kind="stable")[:4]].all()
    np.testing.assert_allclose(fast.prob[fast.exact], exact.prob[fast.exact], atol=1e-6)
    np.testing.assert_array_equal(fast.prob[~fast.exact], fast.estimate[~fast.exact])
    every = tiny_lab.trace(prompt, tid, plan, "mlp", direction, window=3, mode="fast", top=10**6)
    assert every.all_exact
    np.testing.assert_allclose(every.prob, exact.prob, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        tiny_lab.trace(prompt, tid, plan, mode="approx")
    with pytest.raises(ValueError, match="top"):
        tiny_lab.trace(prompt, tid, plan, mode="fast", top=-1)
    assert hook_count(tiny_lab.model) == 0


class _SetAfter:
    """An event that reads as set from its n-th check on (to cancel mid-run)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def test_fast_mode_cancels_in_each_step():
    from qviz.cancel import Cancelled

    lab = Lab(tiny_llama(), CharTokenizer())
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    calls = _SetAfter(10**6)
    lab.trace("abcdefg", 5, plan, mode="fast", top=8, max_tokens=8, cancel=calls)
    for n in range(1, calls.calls + 1):  # every check, the attribution run's included
        with pytest.raises(Cancelled):
            lab.trace("abcdefg", 5, plan, mode="fast", top=8, max_tokens=8, cancel=_SetAfter(n))
        assert hook_count(lab.model) == 0
    assert calls.calls >= 5


@pytest.mark.model
def test_fast_mode_finds_the_top_cells_embedded(lab):
    """The estimate ranks the exact grid's cells: its top 32 hold the exact top 5."""
    plan = QuantPlan.uniform(QuantConfig(bits=4, group_size=128))
    prompt = "The Eiffel Tower is located in the city of"
    exact = lab.trace(prompt, " Paris", plan)
    fast = lab.trace(prompt, " Paris", plan, mode="fast", top=32)
    effect = np.abs(exact.prob - exact.p_quantized)
    top5 = set(np.argsort(-effect, axis=None)[:5].tolist())
    est_top = set(np.argsort(-np.abs(fast.estimate - exact.p_quantized), axis=None)[:32].tolist())
    assert top5 <= est_top
    assert fast.exact.ravel()[sorted(top5)].all()
    assert spearman(fast.estimate, exact.prob) > 0.5
    np.testing.assert_allclose(fast.prob[fast.exact], exact.prob[fast.exact], atol=1e-5)
    assert fast.best_cell == exact.best_cell
    assert hook_count(lab.model) == 0


def test_bench_fast_vs_exact_on_a_tiny_model(capsys):
    from qviz.bench.trace import fast_vs_exact

    lab = Lab(tiny_llama(), CharTokenizer())
    plan = QuantPlan.uniform(QuantConfig(bits=2, group_size=32))
    every = fast_vs_exact(lab, plan, "abcdefghijkl", 5, top=10**6)
    assert every["fast_top10_found"] == 10 and every["fast_same_best_cell"]
    few = fast_vs_exact(lab, plan, "abcdefghijkl", 5, top=3)
    assert 0 <= few["fast_top10_found"] <= 10 and -1 <= few["fast_rank_corr"] <= 1
    assert few["fast_tokens"] == 12 and few["fast_s"] > 0 and few["exact_long_s"] > 0
    assert "fast mode" in capsys.readouterr().out
