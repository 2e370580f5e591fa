"""A slider move to a plan never seen paints in two steps (the prompt's views, then the pooled
CKA map and verdict), and the idle dashboard prefetches the neighbouring bit-widths' whole
results; newer moves cancel older work and always go before the prefetch (no browser)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import qviz
from qviz.cancel import check_cancel
from qviz.views.backend import CKA_CONTEXT, Backend, is_first_look, plan_for
from qviz.views.components import verdict_card_html
from qviz.views.session import Controller
from qviz.views.state import DashboardState
from tests.conftest import CharTokenizer, tiny_llama

JOIN = 120  # seconds; only detects a deadlock
PROMPT = "the capital of"


def tiny_lab(cls=qviz.Lab):
    return cls(tiny_llama(), CharTokenizer(), name="tiny")


def tiny_state(**kw) -> DashboardState:
    return DashboardState(**{"model": "tiny", "prompt": PROMPT, "target": "a", "bits": 4,
                             "group_size": 32, **kw})  # fmt: skip


class Recorder:
    """The Controller's dispatch: runs each call now and notes what the state then shows."""

    def __init__(self) -> None:
        self.state: DashboardState | None = None
        self.shown: list[tuple] = []  # (comparison, first look?, busy, status) as each came
        self.last = None

    def clear(self) -> None:
        """Note only what comes after the comparison shown now."""
        self.shown.clear()
        self.last = self.state.comparison

    def __call__(self, fn) -> None:
        fn()
        s = self.state
        if s.comparison is not None and s.comparison is not self.last:
            self.last = s.comparison
            self.shown.append((s.comparison, is_first_look(s.comparison), s.busy, s.status))


def controller(lab, state):
    rec = Recorder()
    rec.state = state
    return Controller(Backend(lab), state, dispatch=rec), rec


def reference(plan):
    """The whole comparison from a Lab of its own (same seed: the same weights)."""
    return tiny_lab().compare(PROMPT, "a", plan, cka_context=CKA_CONTEXT)


def test_a_new_plan_shows_the_prompt_views_first_then_the_pooled_cka_and_verdict(monkeypatch):
    monkeypatch.setenv("QVIZ_PREFETCH", "0")
    lab, state = tiny_lab(), tiny_state()
    ctl, rec = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN)
    # the page's first result comes whole (a page still being sent keeps the first ranges)
    assert [look for _, look, _, _ in rec.shown] == [False]
    rec.clear()
    state.bits = 3
    assert ctl.wait(JOIN)
    (first, look, busy, status), (full, look2, busy2, status2) = rec.shown
    ref = reference(plan_for(state, 3))
    # first: the prompt's own views, equal to the whole comparison's; CKA and verdict pending
    assert look and busy and first.plan_label == ref.plan_label
    assert "CKA map and verdict computing" in status and "showing" not in status
    assert first.verdict is None and np.isnan(first.cka.values).all()
    assert first.cka.values.shape == ref.cka.values.shape and first.cka.difference is None
    assert "computing" in first.cka.how and f"{1 + CKA_CONTEXT} prompts" in first.cka.how
    card = verdict_card_html(tiny_state(bits=3, comparison=first))
    assert "verdict computing" in card and ref.plan_label in card and "no result" not in card
    for got in (first, full):
        np.testing.assert_allclose(got.lens.quantized.prob, ref.lens.quantized.prob, atol=1e-6)
        np.testing.assert_allclose(got.ffn.flip_rate, ref.ffn.flip_rate, atol=1e-6)
        np.testing.assert_allclose(got.residual.cosine, ref.residual.cosine, atol=1e-6)
        np.testing.assert_allclose(got.attention.js, ref.attention.js, atol=1e-6)
    # then: the CKA map pooled with the context prompts and the verdict, busy off
    assert not look2 and not busy2 and status2 == f"showing {ref.plan_label}"
    np.testing.assert_allclose(full.cka.values, ref.cka.values, atol=1e-5)
    assert first.isolation is None  # the verdict's evidence, shown with it
    np.testing.assert_allclose(full.isolation.delta_cosine, ref.isolation.delta_cosine, atol=1e-6)
    assert full.cka.n_prompts == 1 + CKA_CONTEXT and full.verdict.mode == ref.verdict.mode
    # a return to it is one step: the whole result at once
    state.bits = 4
    assert ctl.wait(JOIN)
    rec.clear()
    state.bits = 3
    assert ctl.wait(JOIN)
    assert [look for _, look, _, _ in rec.shown] == [False]
    ctl.close()


class ContextGate(qviz.Lab):
    """compare with the CKA context (the second step) of a 3-bit plan waits for ``release``,
    checking its cancel event the way each forward pass does."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.cancelled: list[str] = []

    def compare(self, prompt, target, plan, *a, cka_context=0, cancel=None, **kw):
        if cka_context and plan.default is not None and plan.default.bits == 3:
            self.entered.set()
            while not self.release.wait(0.01):
                try:
                    check_cancel(cancel, "before the CKA context runs")
                except qviz.cancel.Cancelled:
                    self.cancelled.append(plan.label)
                    raise
        return super().compare(prompt, target, plan, *a, cka_context=cka_context,
                               cancel=cancel, **kw)  # fmt: skip


def test_a_newer_move_cancels_the_context_step_and_its_result_is_never_shown(monkeypatch):
    monkeypatch.setenv("QVIZ_PREFETCH", "0")
    lab, state = tiny_lab(ContextGate), tiny_state()
    ctl, rec = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN)
    rec.clear()
    state.bits = 3
    assert lab.entered.wait(JOIN)  # the 3-bit first look is shown; its context step runs
    assert rec.shown[-1][1] and rec.shown[-1][0].plan_label == plan_for(state, 3).label
    state.bits = 5  # supersedes it
    assert ctl.wait(JOIN)
    assert lab.cancelled == [plan_for(state, 3).label]
    shown = [(c.plan_label, look) for c, look, _, _ in rec.shown]
    five = plan_for(state, 5).label
    assert shown == [(plan_for(state, 3).label, True), (five, True), (five, False)]
    assert state.comparison.plan_label == five and not state.busy
    ctl.close()


def test_idle_prefetch_computes_the_neighbours_whole_results(monkeypatch):
    """After a result, bits +- 1 are compared in the background with the prompt shown; a step
    there shows the whole result at once, equal to a comparison computed on its own."""
    monkeypatch.delenv("QVIZ_PREFETCH", raising=False)
    lab, state = tiny_lab(), tiny_state()
    ctl, rec = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN)  # the prefetch included
    assert ctl.prefetching.error is None
    for bits in (3, 5):
        got = ctl.backend.peek(Backend.compare_key(PROMPT, "a", plan_for(state, bits)))
        ref = reference(plan_for(state, bits))
        np.testing.assert_allclose(got.cka.values, ref.cka.values, atol=1e-5)
        assert got.verdict.mode == ref.verdict.mode
    rec.clear()
    state.bits = 5
    assert ctl.wait(JOIN, prefetch=False)
    assert [(c.plan_label, look) for c, look, _, _ in rec.shown] == [
        (plan_for(state, 5).label, False)
    ]
    ctl.close()


def test_weights_only_prefetch_leaves_the_comparisons_to_the_move(monkeypatch):
    monkeypatch.setenv("QVIZ_PREFETCH", "weights")
    lab, state = tiny_lab(), tiny_state()
    ctl, _ = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN)
    assert {plan_for(state, 3), plan_for(state, 5)} <= set(lab.engine.cached_plans)
    assert ctl.backend.peek(Backend.compare_key(PROMPT, "a", plan_for(state, 3))) is None
    ctl.close()


class PrefetchGate(qviz.Lab):
    """compare of a 3-bit plan (the prefetch's first neighbour) runs until cancelled."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.entered = threading.Event()
        self.stopped = threading.Event()

    def compare(self, prompt, target, plan, *a, cancel=None, **kw):
        if cancel is not None and plan.default is not None and plan.default.bits == 3:
            self.entered.set()
            while True:
                try:
                    check_cancel(cancel, "before a forward")
                except qviz.cancel.Cancelled:
                    self.stopped.set()
                    raise
                if cancel.wait(0.01):
                    continue
        return super().compare(prompt, target, plan, *a, cancel=cancel, **kw)


def test_a_move_stops_the_prefetch_and_goes_first(monkeypatch):
    monkeypatch.delenv("QVIZ_PREFETCH", raising=False)
    lab, state = tiny_lab(PrefetchGate), tiny_state()
    ctl, rec = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN, prefetch=False)
    assert lab.entered.wait(JOIN)  # the prefetch is inside the 3-bit comparison
    prefetch = ctl.prefetching
    state.bits = 6  # not a neighbour: the user's work
    assert lab.stopped.wait(JOIN)
    prefetch.join(JOIN)
    assert not prefetch.is_alive() and prefetch.error is None  # stopped quietly
    assert ctl.backend.peek(Backend.compare_key(PROMPT, "a", plan_for(state, 3))) is None
    assert ctl.wait(JOIN, prefetch=False)
    assert state.comparison.plan_label == plan_for(state, 6).label and not state.busy
    ctl.cancel()  # the Cancel button stops the new prefetch too
    assert ctl.wait(JOIN)
    ctl.close()


def test_lab_prefetch_runs_then_only_on_plans_whose_weights_fit():
    lab = tiny_lab()
    engine = lab.engine
    plans = {b: qviz.QuantPlan.uniform(qviz.QuantConfig(bits=b, group_size=32)) for b in (2, 3, 5)}
    used = qviz.QuantPlan.uniform(qviz.QuantConfig(bits=4, group_size=32))
    engine.materialize(used)
    engine.budget_bytes = 2 * engine.plan_bytes(used)  # room for one more plan
    gptq = qviz.QuantPlan.uniform(qviz.QuantConfig(bits=4, group_size=32, method="gptq"))
    seen = []
    thread = lab.prefetch([gptq, used, plans[3], plans[5]], then=seen.append)
    thread.join(JOIN)
    assert thread.error is None
    assert seen == [used, plans[3]]  # GPTQ skipped; 5-bit would not fit: the thread stopped

    def boom(plan):
        raise RuntimeError("speculative work failed")

    thread = lab.prefetch([plans[3]], then=boom)
    thread.join(JOIN)
    assert isinstance(thread.error, RuntimeError)

    def cancelled(plan):
        raise qviz.cancel.Cancelled("stopped")

    thread = lab.prefetch([plans[3], used], then=cancelled)
    thread.join(JOIN)
    assert thread.error is None and not thread.is_alive()


@pytest.mark.parametrize("bits", [2, 8])
def test_the_ends_of_the_slider_prefetch_their_one_neighbour(monkeypatch, bits):
    monkeypatch.delenv("QVIZ_PREFETCH", raising=False)
    lab, state = tiny_lab(), tiny_state(bits=bits)
    ctl, _ = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN)
    other = 3 if bits == 2 else 7
    assert ctl.backend.peek(Backend.compare_key(PROMPT, "a", plan_for(state, other)))
    ctl.close()


def test_the_neighbour_in_the_direction_of_the_last_move_is_prefetched_first(monkeypatch):
    monkeypatch.delenv("QVIZ_PREFETCH", raising=False)

    class Spy(qviz.Lab):
        orders: list = []

        def prefetch(self, plans, **kw):
            self.orders.append([p.default.bits for p in plans])
            return super().prefetch(plans, **kw)

    lab, state = tiny_lab(Spy), tiny_state()
    ctl, _ = controller(lab, state)
    ctl.start()
    assert ctl.wait(JOIN)
    for bits in (5, 6, 5):
        state.bits = bits
        assert ctl.wait(JOIN)
    assert lab.orders == [[3, 5], [6, 4], [7, 5], [4, 6]]
    ctl.close()


def test_a_move_within_the_idle_pause_prefetches_nothing():
    lab, stop = tiny_lab(), threading.Event()
    plan = qviz.QuantPlan.uniform(qviz.QuantConfig(bits=3, group_size=32))
    seen = []
    thread = lab.prefetch([plan], cancel=stop, then=seen.append, delay=JOIN)
    stop.set()  # the next move, during the pause
    thread.join(JOIN)
    assert not thread.is_alive() and seen == [] and plan not in lab.engine.cached_plans
    thread = lab.prefetch([plan], then=seen.append, delay=0.01)  # no move: it runs
    thread.join(JOIN)
    assert seen == [plan] and plan in lab.engine.cached_plans


def test_in_a_jupyter_kernel_only_weights_are_prefetched(monkeypatch):
    """There the results reach the figures on the worker thread: an instant prefetched result
    would race the kernel's handling of the next widget message."""
    import qviz.views.session as session

    monkeypatch.delenv("QVIZ_PREFETCH", raising=False)
    monkeypatch.setattr(session, "in_kernel", lambda: True)
    lab, state = tiny_lab(), tiny_state()
    for kw in ({}, {"dispatch": lambda fn: fn()}):  # the Panel and the ipywidgets fronts
        other = Controller(Backend(lab), tiny_state(), **kw)
        assert not other.prefetch_results
        other.close()
    ctl = Controller(Backend(lab), state, dispatch=lambda fn: fn(), prefetch_results=False)
    ctl.start()
    assert ctl.wait(JOIN)
    assert plan_for(state, 3) in set(lab.engine.cached_plans)
    assert ctl.backend.peek(Backend.compare_key(PROMPT, "a", plan_for(state, 3))) is None
    ctl.close()
