"""Dashboard, components, the ipywidgets front and the report on the embedded model (no browser)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

import qviz

pytestmark = pytest.mark.model
WAIT = 600  # seconds; generous for a shared CPU, never a performance claim


@pytest.fixture(scope="module")
def lab(embedded):
    model, tok = embedded
    return qviz.Lab(model, tok, name="smollm2-135m")


@pytest.fixture(scope="module")
def dash(lab):
    from qviz.views import Dashboard

    d = Dashboard(lab)
    assert d.wait(WAIT)
    return d


def test_dashboard_shows_a_comparison_and_updates_sources_in_place(dash):
    s = dash.state
    assert s.error == "" and s.comparison is not None
    assert s.comparison.plan_label == "rtn4-g128"
    cka = dash.views["cka"]
    src, fig = cka.plot.sources["cka"], cka.plot.root
    n = s.comparison.cka.values.shape[0]
    assert len(src.data["cka"]) == n * n
    assert s.selected_layer == (n - 1) // 2
    assert s.comparison.verdict.mode in dash.views["verdict"].text
    before = src.data["cka"].copy()
    s.bits = 2
    assert dash.wait(WAIT)
    assert s.comparison.plan_label == "rtn2-g128"
    assert cka.plot.sources["cka"] is src and cka.plot.root is fig  # same models, new data
    assert (src.data["cka"] != before).any()
    assert "rtn2-g128" in dash.views["verdict"].text
    assert len(s.pareto_rows) >= 4 and all(r["mib"] > 0 for r in s.pareto_rows)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("target", " Paris is", "exactly one token"), ("prompt", "  ", "non-empty")],
)
def test_errors_show_in_the_app_and_keep_the_last_result(dash, field, value, message):
    s = dash.state
    last = s.comparison
    old = getattr(s, field)
    setattr(s, field, value)
    assert dash.wait(WAIT)
    assert message in s.error
    assert dash.alert.visible and message in dash.alert.text
    assert s.comparison is last
    setattr(s, field, old)
    assert dash.wait(WAIT)
    assert s.error == "" and not dash.alert.visible


def test_clicking_a_view_selects_the_layer_everywhere(dash):
    cka = dash.views["cka"]
    cka._on_tap(SimpleNamespace(x=4.0, y=9.0))  # residual state 4 = output of layer 3
    assert dash.state.selected_layer == 3
    for name in ("cka", "lens", "attention", "ffn", "patch"):
        plot = dash.views[name].plot
        want = 4 if plot.state_indexed else 3
        assert all(m.location == want and m.visible for m in plot.markers), name
    dash.views["ffn"]._on_tap(SimpleNamespace(x=7.2, y=0.1))
    assert dash.state.selected_layer == 7
    assert "layer 7:" in dash.views["verdict"].text


def test_tracing_fills_the_patching_heatmap(dash):
    s = dash.state
    dash.request_trace()
    assert dash.wait(WAIT)
    assert s.error == "", s.error
    grid = s.patch_grid
    assert grid is not None and grid.plan_label == s.comparison.plan_label
    data = dash.views["patch"].plot.sources["patch"].data
    assert len(data["value"]) == grid.prob.size
    assert "Causal tracing" in dash.views["patch"].plot.root.title.text


def test_sessions_share_the_backend_but_not_state(lab, dash):
    from qviz.views import Dashboard

    other = Dashboard(lab)
    assert other.backend is dash.backend
    other.state.bits = 8
    assert other.wait(WAIT) and dash.wait(WAIT)
    assert other.state.comparison.plan_label == "rtn8-g128"
    assert dash.state.comparison.plan_label != "rtn8-g128"


def test_dashboard_renders_to_a_bokeh_model(dash):
    import panel as pn

    root = pn.panel(dash).get_root()
    names = {m.name for m in root.select({"type": __import__("bokeh").models.ColumnDataSource})}
    assert {"qviz_cka", "qviz_lens", "qviz_attention", "qviz_ffn", "qviz_patch"} <= names


def test_ipywidgets_front_shares_state_and_plots(lab):
    from qviz import widgets

    d = widgets.WidgetDashboard(lab, load_js=False)
    assert d.wait(WAIT)
    assert d.state.comparison is not None
    assert d.state.comparison.verdict.mode in d.verdict.value
    bits = next(w for w in d.controls.children if "qviz-bits" in w._dom_classes)
    bits.value = 3
    assert d.wait(WAIT)
    assert d.state.comparison.plan_label == "rtn3-g128"
    assert len(d.views["cka"].plot.sources["cka"].data["cka"]) > 0
    second = next(w for w in d.controls.children if getattr(w, "description", "") == "Beside")
    second.value = "rtn"
    assert d.wait(WAIT)
    assert d.state.comparison2.plan_label == "rtn3-g128" and "qviz-side" in d.verdict.value
    assert d.views["cka"].plot2.root.visible and d.figures["cka"]._model is d.views["cka"].root


def test_report_is_standalone_html(lab):
    from qviz.report import build_report

    text = build_report(lab, [2], prompt="The capital of France is", target=" Paris", n_facts=4)
    assert "computation collapse" in text or "signal degradation" in text
    assert "qviz-bits-2" in text and "qviz-verdict-table" in text
    external = re.findall(r"""<(?:script|link)[^>]+(?:src|href)=["']https?://""", text)
    assert external == []


def test_gptq_progress_reaches_the_status(tmp_path, monkeypatch):
    """A GPTQ plan reports each decoder layer in the state's status while it runs."""
    from qviz.views.components import DashboardState
    from qviz.views.dashboard import Backend, Controller
    from tests.conftest import CharTokenizer, tiny_llama

    monkeypatch.setenv("QVIZ_CACHE", str(tmp_path))
    monkeypatch.setenv("QVIZ_GPTQ_NSEQ", "2")
    monkeypatch.setenv("QVIZ_GPTQ_SEQLEN", "16")
    lab = qviz.Lab(tiny_llama(), CharTokenizer(), name="tiny")
    lab.engine.tokenizer = None  # byte-level calibration ids for the tiny model
    state = DashboardState(model="tiny", target="a", bits=3, group_size=32, method="rtn")
    seen = []
    state.param.watch(lambda e: seen.append(e.new), "status")
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    state.method = "gptq"
    ctl.request_compare()
    assert ctl.wait(120)
    assert state.error == "" and state.comparison.plan_label.startswith("gptq3")
    assert seen[0] == "preparing gptq3-g32: capturing calibration inputs ..."
    layers = [m for m in seen if m.startswith("preparing gptq3-g32: layer")]
    assert layers[-1].endswith("layer 3/3 ...") and len(layers) == 3
    assert "ETA" in layers[0] and "ETA" not in layers[-1]


def test_side_by_side_on_the_embedded_model_updates_both_halves_in_place(dash):
    """A second plan fills the second CKA map and the paired views in place; "none" restores
    the single-plan dashboard (the second figures hidden, their data gone)."""
    import numpy as np

    s = dash.state
    s.bits = 4
    assert dash.wait(WAIT)
    cka, ffn = dash.views["cka"], dash.views["ffn"]
    fig, fig2, src2 = cka.plot.root, cka.plot2.root, cka.plot2.sources["cka"]
    s.param.update(bits2=2, method2="rtn")
    assert dash.wait(WAIT) and s.error == "", s.error
    assert (s.comparison.plan_label, s.comparison2.plan_label) == ("rtn4-g128", "rtn2-g128")
    assert cka.plot.root is fig and cka.plot2.root is fig2 and cka.plot2.sources["cka"] is src2
    np.testing.assert_array_equal(src2.data["cka"], s.comparison2.cka.values.ravel())
    assert not np.array_equal(src2.data["cka"], cka.plot.sources["cka"].data["cka"])
    assert fig2.visible
    assert len(ffn.plot.sources["ffn2"].data["flip"]) == len(s.comparison.ffn.flip_rate)
    text = dash.views["verdict"].text
    assert "rtn4-g128" in text and "rtn2-g128" in text and text.count("qviz-verdict-mode") == 2
    s.method2 = "none"
    assert dash.wait(WAIT)
    assert s.comparison2 is None and not fig2.visible and len(src2.data["cka"]) == 0
    assert dash.views["verdict"].text.count("qviz-verdict-mode") == 1
    s.bits2 = "same"


def test_budget_plan_on_the_embedded_model_stays_within_the_budget(dash):
    """The budget bar shows a prescribed plan whose decoder bits per weight (as the footprint
    counts them) are at most the budget, beside the uniform plan of that budget. The
    sensitivity table is seeded (its ~120 forward passes are tested on the tiny model in
    test_dashboard); allocation, the plan's KL, both comparisons and the views run for real."""
    import numpy as np
    import pandas as pd

    from qviz.quant.memory import footprint
    from qviz.studies.prescribe import option_label, options_of

    s, lab = dash.state, dash.backend.lab
    labels = [option_label(c) for c in options_of(("rtn",), (2, 3, 4, 8), 128)]
    rng = np.random.default_rng(0)
    kl = np.sort(rng.random((lab.n_layers, len(labels))), axis=1)[:, ::-1]  # more bits, less KL
    frame = pd.DataFrame(kl, columns=labels)
    dash.backend._cached(("sensitivity", "rtn", 128), lambda: frame)
    s.param.update(budget=3.5, budget_on=True)
    assert dash.wait(WAIT) and s.error == "", s.error
    pres, uni_label, uni_bits = s.budget_result
    bits = footprint(lab.model, pres.plan, include_embeddings=False).effective_bits
    assert bits <= 3.5 and bits == pytest.approx(pres.effective_bits)
    assert uni_bits <= 3.5 and s.comparison2.plan_label == uni_label
    bar = dash.views["budget"].plot
    assert bar.root.visible and list(bar.sources["budget"].data["bits"]) == list(pres.bits)
    assert len(set(pres.bits)) > 1  # a per-layer plan, not a uniform one
    s.budget_on = False
    assert dash.wait(WAIT)
    assert s.budget_result is None and not bar.root.visible and s.comparison2 is None
