"""Lab.prescribe: budget as the footprint counts it, determinism, exact allocation, bad input."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from qviz import Lab
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.memory import footprint
from qviz.studies import prescribe as P
from tests.conftest import CharTokenizer, tiny_llama

FAST = {"n_calib_tokens": 64, "window": 32, "baselines": False, "check": False}


@pytest.fixture(scope="module")
def tiny_lab():
    return Lab(tiny_llama(), CharTokenizer(), name="tiny")


@pytest.mark.parametrize("budget", [3.0, 3.4, 4.5, 9.0])
def test_plan_respects_budget_as_footprint_counts(tiny_lab, budget):
    rx = tiny_lab.prescribe(budget, candidates=(2, 3, 4, 8), group_size=32, **FAST)
    fp = footprint(tiny_lab.model, rx.plan, include_embeddings=False)
    assert fp.effective_bits <= budget + 1e-12
    assert rx.effective_bits == pytest.approx(fp.effective_bits)
    for i, b in enumerate(rx.bits):
        cfg = rx.plan.config_for(i)
        assert cfg is not None and cfg.bits == b
    # reference, the suffix check, L x options, the starts (the allocation's plan and the
    # uniform plans that fit, each once), then at most refine_passes moves
    opts = P.options_of(("rtn",), (2, 3, 4, 8), 32)
    costs, params = P.layer_costs(tiny_lab, opts), P.decoder_params(tiny_lab)
    alloc, _ = P.allocate(costs, rx.sensitivity.to_numpy(), budget * params)
    uniform = [(o,) * 3 for o in range(len(opts)) if costs[:, o].sum() <= budget * params]
    n_starts = len({tuple(alloc), *uniform})
    assert 1 + 1 + 3 * 4 + n_starts <= rx.forward_passes <= 1 + 1 + 3 * 4 + n_starts + 64
    plain = tiny_lab.prescribe(
        budget, candidates=(2, 3, 4, 8), group_size=32, refine_passes=0, **FAST
    )
    assert plain.forward_passes == 1 + 1 + 3 * 4 + n_starts
    assert list(rx.sensitivity.columns) == rx.options and len(rx.sensitivity) == 3
    assert len(rx.to_frame()) == 3


def test_deterministic(tiny_lab):
    a = tiny_lab.prescribe(3.7, group_size=32, **FAST)
    b = tiny_lab.prescribe(3.7, group_size=32, **FAST)
    assert a.plan == b.plan
    np.testing.assert_array_equal(a.sensitivity.to_numpy(), b.sensitivity.to_numpy())


def test_more_budget_never_predicts_worse(tiny_lab):
    first = tiny_lab.prescribe(3.0, group_size=32, **FAST)
    kls = [
        tiny_lab.prescribe(b, group_size=32, sensitivity=first.sensitivity, **FAST).predicted_kl
        for b in (3.0, 3.5, 4.5, 9.0)
    ]
    assert all(x >= y - 1e-15 for x, y in itertools.pairwise(kls))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_opts = 4, 3
    base = rng.integers(50, 150, size=n_layers)[:, None]
    costs = base * np.array([2.25, 3.25, 8.25])[None, :] + rng.integers(0, 5, (n_layers, n_opts))
    kl = np.sort(rng.random((n_layers, n_opts)), axis=1)[:, ::-1].copy()
    kl[rng.random(kl.shape) < 0.2] *= 3  # not always monotone
    for frac in (0.3, 0.5, 0.8):
        budget = costs.min(1).sum() + frac * (costs.max(1).sum() - costs.min(1).sum())
        choice, val = P.allocate(costs, kl, budget)
        ref_choice, ref_val = P.brute_force(costs, kl, budget)
        assert val == pytest.approx(ref_val)
        assert sum(costs[i, c] for i, c in enumerate(choice)) <= budget
        assert sum(kl[i, c] for i, c in enumerate(choice)) == pytest.approx(val)


def test_greedy_stays_in_budget(tiny_lab):
    opts = P.options_of(("rtn",), (2, 4, 8), (32, 64))
    costs = P.layer_costs(tiny_lab, opts)
    ids = P.calibration_ids(tiny_lab, P.split_text()[0], 64, 32)
    budget = 5.0 * P.decoder_params(tiny_lab)
    passes = {}
    for top_k in (None, 1):
        meter = P.KLMeter(tiny_lab, ids, check_suffix=False)
        choice = P.greedy_search(meter, costs, opts, budget, top_k=top_k)
        assert costs[np.arange(3), choice].sum() <= budget
        passes[top_k] = meter.forward_passes
    assert passes[None] > passes[1] > 2


def test_baselines_frame(tiny_lab):
    rx = tiny_lab.prescribe(
        4.5, group_size=32, n_calib_tokens=64, window=32, n_facts=8, eval_chars=600
    )
    df = rx.comparison()
    assert df.iloc[0]["kind"] == "prescribed"
    assert {"uniform", "greedy-kl", "full precision"} <= set(df["kind"])
    assert (df.loc[df["kind"] != "full precision", "effective_bits"] <= 4.5 + 1e-12).all()
    assert rx.verdict is not None and rx.verdict.mode
    text = rx.summary().splitlines()
    assert len(text) == len(df) and text[0].startswith("prescribed")
    n_beaten = int(df.loc[df["kind"] != "full precision", "prescribed_beats"].sum())
    assert f"beats {n_beaten} of {len(df) - 2} baselines" in text[0]
    assert sum(line.lstrip().startswith("beats") for line in text[1:]) == n_beaten


def test_bad_inputs(tiny_lab):
    with pytest.raises(ValueError, match=r"budget_bits=2.5.*below 3 bits.*rtn2-g32"):
        tiny_lab.prescribe(2.5, group_size=32, **FAST)
    with pytest.raises(ValueError, match="budget_bits=17.*above 16"):
        tiny_lab.prescribe(17, **FAST)
    with pytest.raises(ValueError, match="candidates is empty"):
        tiny_lab.prescribe(4, candidates=(), **FAST)
    with pytest.raises(ValueError, match="candidate bits 1"):
        tiny_lab.prescribe(4, candidates=(1, 4), **FAST)
    with pytest.raises(ValueError, match="objective"):
        tiny_lab.prescribe(4, objective="mse", **FAST)
    with pytest.raises(ValueError, match=r"group_size=48 does not divide in_features=64"):
        tiny_lab.prescribe(4, group_size=(32, 48), **FAST)
    with pytest.raises(ValueError, match=r"group_size is empty.*\(32, 64, 128\)"):
        tiny_lab.prescribe(4, group_size=(), **FAST)
    with pytest.raises(ValueError, match="group_size must be a positive int or None.*got 0"):
        tiny_lab.prescribe(4, group_size=(0, 32), **FAST)
    with pytest.raises(
        ValueError, match=r"budget_bits must be a number of bits per weight, got 'a lot'"
    ):
        tiny_lab.prescribe("a lot", **FAST)


def test_options_over_bits_and_group_sizes(tiny_lab):
    opts = P.options_of(("rtn",), (2, 4, 16), (32, 64))
    assert [P.option_label(o) for o in opts] == [
        "rtn2-g32",
        "rtn2-g64",
        "rtn4-g32",
        "rtn4-g64",
        "fp16",
    ]
    costs = P.layer_costs(tiny_lab, opts)
    for o, cfg in enumerate(opts):  # each column is what footprint counts for that option
        fp = footprint(tiny_lab.model, QuantPlan(default=cfg), include_embeddings=False)
        assert costs[:, o].sum() == pytest.approx(fp.effective_bits * fp.params)
    rx = tiny_lab.prescribe(3.4, candidates=(2, 3, 4), group_size=(32, 64), **FAST)
    assert len(rx.options) == 6 and set(rx.choice) <= set(rx.options)
    fp = footprint(tiny_lab.model, rx.plan, include_embeddings=False)
    assert fp.effective_bits <= 3.4 + 1e-12


def test_suffix_runs_equal_full_forwards(tiny_lab):
    meter = P.KLMeter(tiny_lab, P.calibration_ids(tiny_lab, P.split_text()[0], 64, 32))
    assert meter.suffix_ok
    for layer in range(tiny_lab.n_layers):
        cfg = QuantConfig(2, 32)
        full = meter(QuantPlan.only_layers(cfg, [layer]))
        assert meter.isolated(layer, cfg) == pytest.approx(full, rel=1e-4, abs=1e-7)


def test_cached_cancellable_progress(tiny_lab, monkeypatch):
    import threading

    from qviz.cancel import Cancelled

    P.clear_cache(tiny_lab)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        tiny_lab.prescribe(3.5, cancel=stop, **FAST)
    calls, seen = [], []
    real = P.sensitivity_table
    monkeypatch.setattr(P, "sensitivity_table", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {**FAST, "progress": lambda done, total: seen.append((done, total))}
    a = tiny_lab.prescribe(3.5, **kw)
    assert seen[0] == (0, 3 * 12) and seen[-1] == (3 * 12, 3 * 12) and len(seen) == 37
    assert tiny_lab.prescribe(3.5, **kw) is a  # the same call: the cached result
    b = tiny_lab.prescribe(4.5, **kw)  # a new budget: the cached table, no new sensitivity
    assert len(calls) == 1 and b.sensitivity is a.sensitivity
    c = tiny_lab.prescribe(4.5, cache=False, **FAST)
    assert c.plan == b.plan and len(calls) == 2
    assert b.forward_passes == c.forward_passes  # the search's cost, whether cached or not


def test_bench_prescribe_on_tiny(tiny_lab, monkeypatch, capsys):
    from qviz import bench
    from qviz.bench import prescribe as BP

    monkeypatch.setattr(Lab, "load", classmethod(lambda cls, name: tiny_lab))
    for name, value in (("CALIB_TOKENS", 64), ("WINDOW", 32), ("EVAL_CHARS", 600)):
        monkeypatch.setattr(BP, name, value)
    out = bench.run_one("prescribe", "tiny")
    assert out["greedy_top_k"] is None  # 3 layers: the full greedy search
    assert out["ratio"] == pytest.approx(out["greedy_s"] / out["prescribe_s"])
    # reference, suffix check, L x options, 1..13 starts, at most 64 refinement moves
    assert 1 + 1 + 3 * 12 + 1 <= out["prescribe_forward_passes"] <= 1 + 1 + 3 * 12 + 13 + 64
    assert out["greedy_forward_passes"] > 3
    for s in out["scores"].values():
        assert s["effective_bits"] <= BP.BUDGET + 1e-12
    text = capsys.readouterr().out
    assert "ratio greedy / prescribe" in text and "slider" in text


@pytest.mark.parametrize("budget", [3.3, 4.2, 4.5, 5.0])
def test_never_worse_than_a_uniform_plan_on_the_calibration_objective(tiny_lab, budget):
    """The joint calibration KL of the prescription, measured by an independent meter (full
    forwards), is at most that of every uniform plan of its options that fits the budget (at
    4.2 bits the allocation alone is worse than uniform rtn3-g32: the sum of isolated KLs
    mis-ranks them), and what it reports is what it measured."""
    rx = tiny_lab.prescribe(budget, group_size=(32, 64), **FAST)
    meter = P.KLMeter(tiny_lab, P.calibration_ids(tiny_lab, P.split_text()[0], 64, 32), False)
    mine = meter(rx.plan)
    assert rx.calib_kl == pytest.approx(mine, rel=1e-4)
    uniform = [
        meter(p)
        for p in (QuantPlan.uniform(c) for c in P.options_of(("rtn",), (2, 3, 4, 8), (32, 64)))
        if footprint(tiny_lab.model, p, include_embeddings=False).effective_bits <= budget
    ]
    assert uniform and mine <= min(uniform) * (1 + 1e-5)


def test_refinement_lowers_the_joint_kl_within_budget(tiny_lab):
    """From the allocation's plan, the local search only takes moves that fit and lower the
    measured joint KL: never above the allocation's, and below it where a move pays."""
    opts = P.options_of(("rtn",), (2, 3, 4, 8), (32, 64))
    costs, params = P.layer_costs(tiny_lab, opts), P.decoder_params(tiny_lab)
    ids = P.calibration_ids(tiny_lab, P.split_text()[0], 64, 32)
    meter = P.KLMeter(tiny_lab, ids)
    table = P.sensitivity_table(tiny_lab, meter, opts).to_numpy()
    gains = []
    for budget in (3.3, 4.2, 4.5):
        alloc, _ = P.allocate(costs, table, budget * params)
        before = meter.forward_passes
        choice, kl = P.refine(meter, costs, table, [alloc], budget * params, opts, 16)
        assert 1 <= meter.forward_passes - before <= 1 + 16
        assert costs[np.arange(3), choice].sum() <= budget * params
        full = P.KLMeter(tiny_lab, ids, check_suffix=False)
        assert kl == pytest.approx(full(P.plan_of(choice, opts)), rel=1e-4)
        gains.append(full(P.plan_of(alloc, opts)) - kl)
    assert min(gains) >= -1e-9 and max(gains) > 0


def test_refinement_with_full_precision_options_measures_the_whole_plan(tiny_lab):
    """A move back to full precision cannot be a nested swap: the whole plan is swapped in; the
    KL it reports is the plan's own, measured independently."""
    opts = P.options_of(("rtn",), (2, 4, 16), 32)
    costs, params = P.layer_costs(tiny_lab, opts), P.decoder_params(tiny_lab)
    ids = P.calibration_ids(tiny_lab, P.split_text()[0], 64, 32)
    meter = P.KLMeter(tiny_lab, ids)
    table = P.sensitivity_table(tiny_lab, meter, opts).to_numpy()
    full = P.KLMeter(tiny_lab, ids, check_suffix=False)
    calls, real = [], meter.joint

    def joint(plan, *a):  # every measured move: the nested swaps flattened into one plan
        val, inputs = real(plan, *a)
        swaps = [plan] if isinstance(plan, QuantPlan) else plan
        cfgs = [swaps[0].config_for(i) for i in range(3)]
        for p in swaps[1:]:
            for i, c in p.overrides:
                cfgs[i] = c
        calls.append((QuantPlan(overrides=tuple(enumerate(cfgs))), val))
        return val, inputs

    meter.joint = joint
    for budget in (6.0, 9.0):
        alloc, _ = P.allocate(costs, table, budget * params)
        choice, kl = P.refine(meter, costs, table, [alloc], budget * params, opts, 24)
        assert costs[np.arange(3), choice].sum() <= budget * params
        assert kl == pytest.approx(full(P.plan_of(choice, opts)), rel=1e-4)
        assert kl <= full(P.plan_of(alloc, opts)) * (1 + 1e-6)
    assert any(p.config_for(i) is None for p, _ in calls for i in range(3))
    assert len({p for p, _ in calls}) > 8
    for p, val in calls:
        assert val == pytest.approx(full(p), rel=1e-4, abs=1e-9), p.label


def test_the_refinement_is_cancellable(tiny_lab):
    from qviz.cancel import Cancelled

    stop = threading.Event()

    def progress(done, total):  # cancel once the sensitivity is done: the search is next
        if done == total:
            stop.set()

    with pytest.raises(Cancelled, match="joint KL|refinement"):
        tiny_lab.prescribe(4.2, cancel=stop, progress=progress, cache=False, **FAST)


def test_moves_fit_and_come_in_the_tables_order():
    rng = np.random.default_rng(0)
    costs = np.array([[2.0, 3.0, 4.0]] * 4) * 100
    kl = np.sort(rng.random((4, 3)), axis=1)[:, ::-1].copy()
    choice = [1, 0, 2, 1]
    budget = costs[np.arange(4), choice].sum() + 50
    out = P.moves(costs, kl, choice, budget)
    ref = []
    for n in (1, 2):
        for layers in itertools.combinations(range(4), n):
            for opts in itertools.product(range(3), repeat=n):
                change = tuple(zip(layers, opts, strict=True))
                if any(o == choice[i] for i, o in change):
                    continue
                trial = list(choice)
                for i, o in change:
                    trial[i] = o
                if costs[np.arange(4), trial].sum() <= budget:
                    ref.append((sum(kl[i, o] - kl[i, choice[i]] for i, o in change), change))
    assert sorted(c for _, c in out) == sorted(c for _, c in ref)
    assert [p for p, _ in out] == pytest.approx(sorted(p for p, _ in ref))


def test_plan_of_round_trips():
    opts = [QuantConfig(2, 32), QuantConfig(4, 32), None]
    plan = P.plan_of([1, 0, 1, 2], opts)
    assert isinstance(plan, QuantPlan)
    assert [plan.config_for(i) for i in range(4)] == [opts[1], opts[0], opts[1], None]


def test_split_text_is_disjoint():
    calib, ev = P.split_text()
    assert calib and ev and calib not in ev and ev[:200] not in calib


def test_embedded_at_3_5_bits_beats_uniform_3bit(lab):
    """SmolLM2-135M: within 3.5 bits/weight, a lower held-out perplexity than uniform rtn3-g128
    and rtn3-g64 (the best uniform plan that fits: before the plans were measured whole it
    lost to it, 185.3 against 184.3), and a calibration KL no higher than any uniform plan of
    its options that fits."""
    rx = lab.prescribe(
        3.5,
        candidates=(2, 3, 4),
        group_size=(64, 128),
        n_calib_tokens=128,
        baselines=False,
        check=False,
    )
    fp = footprint(lab.model, rx.plan, include_embeddings=False)
    assert fp.effective_bits <= 3.5 + 1e-12
    held = P.split_text()[1][:4000]
    mine = lab.perplexity(rx.plan, text=held)
    for g in (128, 64):
        assert mine < lab.perplexity(QuantPlan.uniform(QuantConfig(3, g)), text=held)
    meter = P.KLMeter(lab, P.calibration_ids(lab, P.split_text()[0], 128, 128), False)
    assert meter(rx.plan) == pytest.approx(rx.calib_kl, rel=1e-4)
    for bits, g in itertools.product((2, 3), (64, 128)):
        assert rx.calib_kl <= meter(QuantPlan.uniform(QuantConfig(bits, g)))


@pytest.mark.parametrize("budget", [2.3, 3.5, 5.0, 9.0])
def test_uniform_within_is_the_richest_uniform_plan_that_fits(tiny_lab, budget):
    """Against every uniform plan counted independently: the one returned fits and no other
    that fits has more bits per weight."""
    groups = (16, 32, 64, None)
    got = tiny_lab.uniform_within(budget, group_sizes=groups)
    fits = []
    for bits, g in itertools.product(range(2, 9), groups):
        plan = QuantPlan.uniform(QuantConfig(bits, g))
        eff = footprint(tiny_lab.model, plan, include_embeddings=False).effective_bits
        if eff <= budget:
            fits.append(float(eff))
    if not fits:
        assert got is None
    else:
        plan, eff = got
        assert eff == pytest.approx(max(fits)) and eff <= budget
        assert footprint(tiny_lab.model, plan, include_embeddings=False).effective_bits == eff
