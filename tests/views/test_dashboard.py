"""The dashboard's controller on a tiny in-process model: cancellation, last request wins, stale
marks, weakly held Labs, the escaped status line and the one layout (no browser)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest

import qviz
from qviz.cancel import check_cancel
from qviz.views.backend import plan_for
from qviz.views.components import LAYOUT, DashboardState, arrange
from qviz.views.dashboard import Backend, Controller, Progress
from tests.conftest import CharTokenizer, tiny_llama

JOIN = 120  # seconds; only detects a deadlock


def tiny_lab(cls=qviz.Lab):
    return cls(tiny_llama(), CharTokenizer(), name="tiny")


def tiny_state(**kw) -> DashboardState:
    return DashboardState(model="tiny", target="a", bits=4, group_size=32, **kw)


class SlowLab(qviz.Lab):
    """prepare() of a 2-bit plan runs "layers" until its cancel event is set or it is released."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.started = threading.Event()
        self.cancelled: list[str] = []

    def prepare(self, plan, cancel=None, on_progress=None) -> None:
        if plan.default is not None and plan.default.bits == 2:
            self.started.set()
            for i in range(10_000):
                try:
                    check_cancel(cancel, f"before layer {i}")
                except qviz.cancel.Cancelled:
                    self.cancelled.append(plan.label)
                    raise
                if self.release.wait(0.01):
                    break
        super().prepare(plan, cancel=cancel, on_progress=on_progress)


def test_memory_table_matches_fp16_and_code_bits():
    lab = tiny_lab()
    plans = [qviz.QuantPlan.none(), qviz.QuantPlan.uniform(qviz.QuantConfig(bits=4, group_size=32))]
    table = lab.memory_table(plans)
    frame = table.to_frame()
    assert list(frame["plan"]) == ["fp", "rtn4-g32"] and list(frame["bits"]) == [16, 4]
    # independent reference: every weight matrix (embeddings and head included), 2 bytes each
    n = sum(p.numel() for p in lab.model.parameters() if p.dim() == 2)
    assert frame["mib"][0] == pytest.approx(n * 2 / 2**20)
    # decoder projections: 4-bit codes plus a 16-bit scale and zero per group of 32 = 5 bits;
    # embeddings and head stay at 16 bits
    lin = sum(
        p.numel()
        for name, p in lab.model.model.layers.named_parameters()
        if name.endswith("proj.weight")
    )
    assert frame["effective_bits"][1] == pytest.approx((lin * 5 + (n - lin) * 16) / n)
    assert frame["accuracy"].isna().all() and table.n_facts == 0


def test_a_newer_request_cancels_slow_work_and_the_last_request_wins():
    lab = tiny_lab(SlowLab)
    state = tiny_state()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    ctl.start()
    assert ctl.wait(JOIN) and state.shown[0] == "rtn4-g32"
    seen = []
    state.param.watch(lambda e: seen.append(e.new), "status")
    state.bits = 2
    assert lab.started.wait(JOIN)
    assert seen[0] == "computing rtn2-g32 ..."
    assert state.stale_note() == "stale: showing rtn4-g32, asked rtn2-g32"
    state.bits = 3  # newer request: the 2-bit prepare stops at its next step
    assert ctl.wait(JOIN)
    assert lab.cancelled == ["rtn2-g32"]
    assert state.shown[0] == "rtn3-g32" and state.comparison.plan_label == "rtn3-g32"
    assert state.error == "" and state.stale_note() == "" and not state.busy


def test_returning_to_a_cached_setting_cancels_and_cancel_button_keeps_the_view():
    lab = tiny_lab(SlowLab)
    state = tiny_state()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    ctl.start()
    assert ctl.wait(JOIN)
    state.bits = 2
    assert lab.started.wait(JOIN)
    state.bits = 4  # cached: shown at once, the 2-bit work is cancelled
    assert ctl.wait(JOIN)
    assert lab.cancelled == ["rtn2-g32"] and state.shown[0] == "rtn4-g32"
    lab.started.clear()
    state.bits = 2
    assert lab.started.wait(JOIN)
    ctl.cancel()  # the Cancel button
    assert ctl.wait(JOIN)
    assert lab.cancelled == ["rtn2-g32", "rtn2-g32"]
    assert state.shown[0] == "rtn4-g32" and state.error == "" and not state.busy
    assert state.status.startswith("cancelled; stale: showing rtn4-g32, asked rtn2-g32")
    ctl.close()  # a closed session ignores later requests
    state.bits = 5
    assert ctl.wait(JOIN) and state.shown[0] == "rtn4-g32"


def test_views_mark_themselves_stale_while_work_runs():
    from qviz.views import Dashboard

    lab = tiny_lab(SlowLab)
    d = Dashboard(lab, state=tiny_state())
    assert d.wait(JOIN)
    cka = d.views["cka"].plot
    assert "stale" not in (cka.extra.get("stale") or type("T", (), {"text": ""})).text
    d.state.bits = 2
    assert lab.started.wait(JOIN)
    badge = cka.extra["stale"]
    assert badge.visible and badge.text == "stale: showing rtn4-g32, asked rtn2-g32"
    assert cka.root.styles == {"opacity": "0.45"}
    assert "qviz-stale" in d.views["verdict"].text
    lab.release.set()
    assert d.wait(JOIN)
    assert not badge.visible and dict(cka.root.styles) == {"opacity": "1"}
    assert "qviz-stale" not in d.views["verdict"].text
    diff = d.views["cka_diff"].plot.sources["diff"].data
    assert len(diff["diff"]) in (0, len(cka.sources["cka"].data["cka"]))


def test_a_lab_is_collected_after_its_dashboard_is_dropped():
    from qviz.views import Dashboard
    from qviz.views.dashboard import backend_for

    lab = tiny_lab()
    d = Dashboard(lab, state=tiny_state())
    assert d.wait(JOIN)
    assert backend_for(lab) is d.backend and len(d.backend) > 0
    ref = weakref.ref(lab)
    del d, lab
    for _ in range(3):
        gc.collect()
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


def test_widgets_front_escapes_its_status_line_and_uses_the_registry():
    from qviz import widgets

    d = widgets.WidgetDashboard(tiny_lab(), state=tiny_state(), load_js=False)
    assert d.wait(JOIN)
    d.state.status = "<script>alert(1)</script> & more"
    assert "<script>" not in d.status.value
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in d.status.value
    method = next(w for w in d.controls.children if getattr(w, "description", "") == "Method")
    assert list(method.options) == list(qviz.quant.config.METHODS)


def test_progress_reports_layers_with_an_eta(monkeypatch):
    clock = iter([100.0, 130.0, 140.0, 150.0])  # start, layer 1 (capture + 1 layer), 2, 3
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    got = []
    p = Progress("gptq4-g128", got.append)
    p(1, 4)
    p(2, 4)
    p(3, 4)
    assert got == [
        "preparing gptq4-g128: layer 1/4, ETA 01:30 ...",
        "preparing gptq4-g128: layer 2/4, ETA 00:20 ...",
        "preparing gptq4-g128: layer 3/4, ETA 00:10 ...",
    ]


def test_one_layout_serves_every_front():
    names = {"cka", "cka_diff", "verdict", "lens", "ffn", "attention", "patch"}
    names |= {"attention_diff", "pareto", "budget"}
    flat = []

    def walk(e):
        if isinstance(e, str):
            flat.append(e)
        else:
            for x in e:
                walk(x)

    walk(LAYOUT)
    assert set(flat) == names and len(flat) == len(names)
    built = arrange(
        {"cka": "C", "lens": "L", "ffn": "F"}, lambda *k: ("row", k), lambda *k: ("col", k)
    )
    assert built == ("col", (("row", ("C",)), ("row", ("L", ("col", ("F",))))))
    assert LAYOUT[0] == ["budget"]  # hidden unless the budget plan is on


def test_neighbouring_bit_widths_are_prefetched_when_idle_and_a_move_stops_it(monkeypatch):
    """After a compare, bits +- 1 are materialized in the background (RTN only), so the next
    slider step finds its weights cached; a new request sets the prefetch's stop event."""
    monkeypatch.delenv("QVIZ_PREFETCH", raising=False)
    lab, state = tiny_lab(), tiny_state()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    ctl.start()
    assert ctl.wait(JOIN)
    ctl.prefetching.join(JOIN)
    cached = set(lab.engine.cached_plans)
    assert {plan_for(state, 3), plan_for(state, 5)} <= cached
    stop = ctl._prefetch_stop
    state.bits = 5  # its weights are in: only compare's own work remains
    assert stop.is_set() and ctl.wait(JOIN)
    assert state.comparison.plan_label == plan_for(state, 5).label
    before = ctl.prefetching
    ctl._prefetch_neighbours()
    assert ctl.prefetching is not before  # idle again: the next neighbours (4 and 6)
    ctl.prefetching.join(JOIN)
    assert plan_for(state, 6) in set(lab.engine.cached_plans)
    ctl.close()


def test_a_plan_the_model_cannot_take_is_refused_before_any_work():
    class Spy(qviz.Lab):
        prepared: list = []

        def prepare(self, plan, cancel=None, on_progress=None) -> None:
            self.prepared.append(plan.label)
            super().prepare(plan, cancel=cancel, on_progress=on_progress)

    lab = tiny_lab(Spy)
    state = tiny_state()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    ctl.request_compare()
    assert ctl.wait(JOIN) and state.error == "" and len(lab.prepared) == 1
    state.protect_first = 5  # tiny llama has 3 decoder layers
    assert ctl.wait(JOIN)
    assert "layers [3, 4]" in state.error and "3 decoder layers" in state.error
    assert len(lab.prepared) == 1  # refused when selected: no job reached the model
    ctl.close()


def test_a_second_plan_is_shown_beside_the_first_and_none_restores():
    """Side by side: every view holds both plans' data (same models, new data); "none" hides
    the second figures and empties their sources again."""
    from qviz.views.components import VerdictCard, figure_views

    lab = tiny_lab()
    state = tiny_state()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    views, card = figure_views(state), VerdictCard(state)
    ctl.request_compare()
    assert ctl.wait(JOIN) and state.error == ""
    cka = views["cka"]
    src, fig, src2 = cka.plot.sources["cka"], cka.plot.root, cka.plot2.sources["cka"]
    assert not cka.plot2.root.visible and len(src2.data["cka"]) == 0
    assert "qviz-side" not in card.text
    state.param.update(method2="rtn", bits2=2)
    assert ctl.wait(JOIN) and state.error == "", state.error
    assert state.comparison.plan_label == "rtn4-g32" and state.comparison2.plan_label == "rtn2-g32"
    assert cka.plot.root is fig and cka.plot.sources["cka"] is src  # updated in place
    assert cka.plot2.root.visible and cka.plot2.sources["cka"] is src2
    assert list(src2.data["cka"]) == list(state.comparison2.cka.values.ravel())
    assert list(src2.data["cka"]) != list(src.data["cka"])
    assert cka.plot.extra["tag"].text == "A: rtn4-g32" and cka.plot2.extra["tag"].visible
    lens = views["lens"].plot.sources
    assert list(lens["lens2"].data["p_quant"]) == list(state.comparison2.lens.quantized.prob)
    ffn = views["ffn"].plot.sources
    assert list(ffn["ffn2"].data["flip"]) == list(state.comparison2.ffn.flip_rate)
    assert list(ffn["ffn"].data["x"]) == [i - 0.2 for i in range(3)]  # paired bars
    assert views["attention"].plot2.root.visible
    diff = views["cka_diff"]
    assert diff.plot.extra["mapper"].high == diff.plot2.extra["mapper"].high  # one scale
    assert diff.plot2.sources["diff"].name == "qviz_cka_diff_b"  # names stay unique
    assert card.text.count("qviz-verdict-mode") == 2 and "rtn2-g32" in card.text
    assert state.status == "showing rtn4-g32 beside rtn2-g32"
    state.method2 = "none"
    assert ctl.wait(JOIN)
    assert state.comparison2 is None and not cka.plot2.root.visible
    assert len(src2.data["cka"]) == 0 and len(ffn["ffn2"].data["flip"]) == 0
    assert list(ffn["ffn"].data["x"]) == [0, 1, 2]
    assert not cka.plot.extra["tag"].visible and card.text.count("qviz-verdict-mode") == 1
    state.bits2 = 3  # the second plan stays off while its method is "none"
    assert ctl.wait(JOIN) and state.comparison2 is None
    ctl.close()


def test_the_budget_plan_shows_the_prescription_beside_the_uniform_plan():
    """The budget toggle prescribes (progress by step, cancellable), then shows the prescribed
    plan (first) beside the uniform plan of the same budget (second); its mean bits <= budget."""
    from qviz.quant.memory import footprint
    from qviz.views.components import figure_views

    lab = tiny_lab()
    state = tiny_state()
    seen: list[str] = []
    state.param.watch(lambda e: seen.append(e.new), "status")
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    views = figure_views(state)
    ctl.request_compare()
    assert ctl.wait(JOIN)
    bar = views["budget"].plot
    assert not bar.root.visible  # off by default: no prescription ran
    state.param.update(budget=3.5, budget_on=True)
    assert ctl.wait(JOIN) and state.error == "", state.error
    pres, uni_label, uni_bits = state.budget_result
    assert pres.budget_bits == 3.5 and pres.effective_bits <= 3.5
    fp = footprint(lab.model, pres.plan, include_embeddings=False)
    assert fp.effective_bits <= 3.5 and abs(fp.effective_bits - pres.effective_bits) < 1e-9
    assert uni_bits <= 3.5 and state.comparison2.plan_label == uni_label
    assert bar.root.visible and list(bar.sources["budget"].data["bits"]) == list(pres.bits)
    assert bar.extra["budget"].location == 3.5
    assert any("sensitivity" in m and "/12" in m for m in seen), seen  # 3 layers x 4 bits
    assert views["cka"].plot2.root.visible
    assert state.shown[0] == "prescribed 3.5 bits/weight" and state.stale_note() == ""
    state.budget = 3.0  # the sensitivity is measured once: a new budget spends no steps
    n_seen = len(seen)
    assert ctl.wait(JOIN) and state.budget_result[0].budget_bits == 3.0
    assert not any("sensitivity" in m for m in seen[n_seen:])
    state.budget_on = False
    assert ctl.wait(JOIN)
    assert state.budget_result is None and state.comparison2 is None and not bar.root.visible
    ctl.close()


def test_the_budget_plan_is_cancellable():
    lab = tiny_lab()
    state = tiny_state()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn())
    ctl.request_compare()
    assert ctl.wait(JOIN)
    ctl.cancel()
    gate = threading.Event()
    original = lab.prescribe

    def prescribe(*a, **kw):
        gate.wait(JOIN)  # the Cancel button is pressed while the sensitivity runs
        return original(*a, **kw)

    lab.prescribe = prescribe
    state.budget_on = True
    ctl.cancel()
    gate.set()
    assert ctl.wait(JOIN)
    assert state.status.startswith("cancelled") and state.budget_result is None
    assert not state.busy
    ctl.close()


def test_serve_method_flags_set_the_method_and_the_side_by_side_method(monkeypatch):
    """`qviz serve --method A --method B`: A is the dashboard's method, B the second plan's."""
    import qviz.app
    from qviz import cli

    got: dict = {}
    monkeypatch.setattr(qviz.app, "serve", lambda **kw: got.update(kw))
    assert cli.main(["serve", "--method", "rtn", "--method", "gptq", "--port", "5999"]) == 0
    assert got["methods"] == ["rtn", "gptq"] and got["port"] == 5999
    assert cli.main(["serve"]) == 0 and got["methods"] == []
    with pytest.raises(SystemExit, match="given 3 times"):
        cli.main(["serve", *["--method", "rtn"] * 3])
    from qviz.views.models import LabRegistry

    monkeypatch.setattr(qviz.app, "_REGISTRY", LabRegistry(lambda name: tiny_lab()))
    for methods, want in ((["rtn", "rtn"], ("rtn", "rtn")), ([], ("rtn", "none"))):
        page = qviz.app.model_page("tiny", methods)
        page.switch("tiny")
        assert (page.dashboard.state.method, page.dashboard.state.method2) == want
        page.dashboard.controller.close()
