"""``qviz bench``: its arguments, and the JSON each benchmark prints (tiny, fast benches only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qviz import bench
from tests.conftest import tiny_llama


def test_every_bench_and_all_are_choices():
    args = bench.parser().parse_args(["quant", "--json", "--model", "m"])
    assert (args.what, args.json, args.model) == ("quant", True, "m")
    assert bench.parser().parse_args(["all"]).json is False
    assert {"quant", "compare", "gptq", "trace", "ui", "memory", "methods", "all"} <= set(
        bench.BENCHES
    )


@pytest.mark.parametrize(
    ("argv", "message"), [(["nothing"], "invalid choice: 'nothing'"), ([], "")]
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_bench_in_run_returns_2(capsys):
    assert bench.run("nothing") == 2
    assert "unknown benchmark 'nothing'" in capsys.readouterr().err


@pytest.fixture
def fake_benches(monkeypatch):
    calls = []

    def make(name, ratio):
        def fn(model_name):
            calls.append((name, model_name))
            print(f"{name}: text for people")
            return {"ratio": ratio, "x_ms": 1.5}

        return fn

    fakes = {"one": make("one", 2.0), "two": make("two", 0.5), "all": bench.bench_all}
    monkeypatch.setattr(bench, "BENCHES", fakes)
    return calls


def test_json_is_one_object_per_bench_on_stdout(fake_benches, capsys):
    assert bench.main(["one", "--json", "--model", "tiny"]) == 0
    out, err = capsys.readouterr()
    (line,) = out.strip().splitlines()
    assert json.loads(line) == {"bench": "one", "model": "tiny", "ratio": 2.0, "x_ms": 1.5}
    assert "one: text for people" in err  # the human text moves to stderr


def test_all_runs_every_bench_once(fake_benches, capsys):
    assert bench.main(["all", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["bench"] for r in rows] == ["one", "two"]
    assert [r["ratio"] for r in rows] == [2.0, 0.5]
    assert fake_benches == [("one", "smollm2-135m"), ("two", "smollm2-135m")]


def test_without_json_the_text_goes_to_stdout(fake_benches, capsys):
    assert bench.run("two") == 0
    out = capsys.readouterr().out
    assert "two: text for people" in out and "{" not in out


def test_quant_figures_on_a_tiny_model(capsys):
    """The real quant bench on a 3-layer model: eager, fused and clone figures, JSON-ready."""
    r = bench.quant_figures(tiny_llama(), bits=(2, 4, 8), group_size=32, repeat=1)
    json.dumps(r)
    assert [row["bits"] for row in r["rows"]] == [2, 4, 8]
    head = r["rows"][1]
    assert r["ratio"] == head["fused_ratio"] == head["fused_ms"] / head["clone_ms"]
    for row in r["rows"]:
        assert row["eager_ms"] > 0 and row["fused_ms"] > 0 and row["clone_ms"] > 0
        assert row["weights"] == 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96)  # q o, k v, mlp
    assert r["fused"]["bad"] == 0
    out = capsys.readouterr().out
    assert "clone floor" in out and "fused" in out and "re-select" in out


def test_fair_per_cell_loop_equals_the_batched_grid():
    """bench trace's fair baseline (last-position logits only) traces the same grid."""
    from qviz import Lab, QuantConfig, QuantPlan
    from tests.conftest import CharTokenizer

    lab = Lab(tiny_llama(), CharTokenizer())
    plan = QuantPlan.uniform(QuantConfig(2, 32))
    prompt, target = "abcdefg", 5
    batched = lab.trace(prompt, target, plan)
    fair, seconds = bench.fair_per_cell(lab, prompt, target, plan)
    assert seconds > 0 and fair.shape == batched.prob.shape == (3, 7)
    assert np.allclose(fair, batched.prob, atol=1e-5)
    loop = lab.trace(prompt, target, plan, method="per_cell")
    assert np.allclose(fair, loop.prob, atol=1e-6)


def test_compare_and_uncached_ui_figures_on_a_tiny_model(capsys):
    """bench compare's and bench ui --uncached's figures on a 3-layer model: every ratio of the
    same run, JSON-ready; the revisit is answered from the cache (no forward)."""
    from qviz import Lab, QuantConfig, QuantPlan
    from qviz.bench.compare import compare_figures
    from qviz.bench.ui import uncached_figures
    from tests.conftest import CharTokenizer

    lab = Lab(tiny_llama(), CharTokenizer())
    plan = QuantPlan.uniform(QuantConfig(2, 32))
    prompts = ["abcdefgh", "ijk", "lmnopqrs", "tuvw"]
    r = compare_figures(lab, "abcdefghij", 5, prompts, plan, repeat=1)
    json.dumps(r)
    assert r["ratio"] == r["compare_ms"] / r["plain_ms"] and r["n_prompts"] == 4
    assert r["revisit_ms"] > 0 and r["pooled_ratio"] > 0 and r["many_ratio"] > 0
    out = capsys.readouterr().out
    assert "revisit" in out and "2 plain forwards" in out and "4 prompts vs 1" in out
    u = uncached_figures(lab, "abcdefghij", "a", moves=2, groups=(32, None))
    json.dumps(u)
    assert u["moves"] == 2 and u["ratio"] == u["median_ms"] / 1e3
    assert 0 < u["first_paint_ms"] <= u["median_ms"]  # the first paint comes before the whole
    assert u["prefetched_found"] == 2  # each one-bit step found its neighbour prefetched
    assert u["interrupted_first_paint_ms"] > 0
    cached = set(lab.engine.cached_plans)
    for g, s in ((32, True), (None, True), (None, False)):  # every move materialized its plan
        assert QuantPlan.uniform(QuantConfig(3, g, symmetric=s)) in cached
    out = capsys.readouterr().out
    assert "never seen, never prefetched" in out and "first paint" in out
    assert "prefetched neighbour" in out and "target <= 1000 ms" in out
