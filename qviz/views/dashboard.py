"""``Dashboard(lab)``: the controls and every view, one DashboardState per session.

Sessions share one :class:`Backend` per Lab but never state. Slow work runs on
:class:`~qviz.views.components.Worker` threads with a ``threading.Event`` per job: a newer
request, a return to a cached setting, the Cancel button or a closed session sets it, and the
work stops at its next step (``qviz.cancel.Cancelled``). Results reach the page on the UI thread
(the bokeh document's next tick under ``panel serve``); the last result stays shown, marked
stale, until the new one is ready; errors appear as a message in the app.

Cache layers, lowest first (each does work the others do not):

1. the GPTQ disk cache: calibrated weights per (model, plan), across processes;
2. the engine's LRU of materialized weights per plan (a byte budget), in the Lab's engine;
3. the Lab's activation caches per (prompt, plan) and reference statistics per fact set;
4. the Backend's result LRU (at most ``max_items``): finished Comparison, PatchGrid and memory
   rows per setting, so returning to a setting shows it at once with no model work at all.

Views see only the Lab's methods and result objects (``compare``, ``trace``, ``prepare``,
``memory_table``), never its model, engine or the bundled data.
"""

from __future__ import annotations

import html
import inspect
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

import panel as pn

from qviz.cancel import Cancelled
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.results import Comparison, PatchGrid
from qviz.views.components import (
    GROUP_SIZES,
    DashboardState,
    DivPane,
    VerdictCard,
    Worker,
    arrange,
    figure_views,
    is_notebook_comm,
    method_names,
    server_doc,
    ui_call,
)

PARETO_BITS = (2, 3, 4, 5, 6, 8)
N_FACTS = 60  # facts per accuracy point in the dashboard (the report takes --facts)


def call_with_cancel(fn: Callable, *args, cancel: threading.Event | None = None, **kw):
    """``fn(*args, **kw)``, passing ``cancel=`` when ``fn`` takes it (Lab methods that do)."""
    if cancel is not None and "cancel" in inspect.signature(fn).parameters:
        kw["cancel"] = cancel
    return fn(*args, **kw)


class Backend:
    """The result cache every session of one Lab shares (cache layer 4, see the module doc).

    Holds its Lab weakly: the dashboards using it hold the Lab, so dropping them (and the
    user's own reference) lets the Lab and its model be garbage-collected.
    """

    def __init__(self, lab, max_items: int = 128) -> None:
        self._lab = weakref.ref(lab)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._max = max_items

    @property
    def lab(self):
        lab = self._lab()
        if lab is None:
            raise RuntimeError("the Lab of this dashboard was garbage-collected")
        return lab

    @property
    def name(self) -> str:
        return str(self.lab.name)

    @property
    def n_layers(self) -> int:
        return int(self.lab.n_layers)

    def _cached(self, key: tuple, compute: Callable[[], object]) -> object:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = compute()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return value

    def peek(self, key: tuple) -> object | None:
        with self._lock:
            return self._cache.get(key)

    def __len__(self) -> int:
        return len(self._cache)

    @staticmethod
    def compare_key(prompt: str, target: str, plan: QuantPlan) -> tuple:
        return ("compare", prompt, target, plan)

    def compare(
        self, prompt: str, target: str, plan: QuantPlan, cancel: threading.Event | None = None
    ) -> Comparison:
        key = self.compare_key(prompt, target, plan)
        lab = self.lab
        return self._cached(
            key,
            lambda: call_with_cancel(
                lab.compare, prompt, target=target, plan=plan, cancel=cancel
            ),  # fmt: skip
        )

    def trace(
        self,
        prompt: str,
        target: str,
        plan: QuantPlan,
        component: str,
        cancel: threading.Event | None = None,
    ) -> PatchGrid:
        key = ("trace", prompt, target, plan, component)
        lab = self.lab
        return self._cached(
            key,
            lambda: call_with_cancel(
                lab.trace, prompt, target=target, plan=plan, component=component, cancel=cancel
            ),
        )

    def memory_row(
        self, plan: QuantPlan, n_facts: int, cancel: threading.Event | None = None
    ) -> dict:
        """The plan's MemoryTable row (accuracy on ``n_facts`` facts, NaN when 0)."""
        lab = self.lab
        return self._cached(
            ("memory", plan, n_facts),
            lambda: lab.memory_table([plan], n_facts=n_facts, cancel=cancel).rows[0],
        )

    def pareto_rows(
        self, state: DashboardState, n_facts: int | None = None, cancel=None
    ) -> list[dict]:
        """Memory (and accuracy when ``n_facts``, else any cached one) per bit-width."""
        rows = []
        for bits in PARETO_BITS:
            plan = plan_for(state, bits)
            row = self.peek(("memory", plan, N_FACTS)) if not n_facts else None
            if row is None:
                row = self.memory_row(plan, n_facts or 0, cancel)
            rows.append({**row, "bits": bits, "label": f"{bits}-bit"})
        return rows


_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Lab -> Backend, weakly
_BACKENDS_LOCK = threading.Lock()


def backend_for(lab) -> Backend:
    """The one Backend of ``lab`` in this process (sessions share it; the Lab is held weakly)."""
    if isinstance(lab, Backend):
        return lab
    with _BACKENDS_LOCK:
        b = _BACKENDS.get(lab)
        if b is None:
            b = _BACKENDS[lab] = Backend(lab)
        return b


def plan_for(state: DashboardState, bits: int) -> QuantPlan:
    """The state's plan with ``bits`` instead of its own bit-width."""
    cfg = QuantConfig(
        bits=bits, group_size=state.group_size, symmetric=state.symmetric, method=state.method
    )
    if state.protect_first > 0:
        return QuantPlan.protect_first(cfg, n=int(state.protect_first), bits=8)
    return QuantPlan.uniform(cfg)


def needs_calibration(method: str) -> bool:
    """Whether ``method`` calibrates on data (slow, per-layer progress), from the registry."""
    try:
        from qviz.quant import METHODS

        obj = METHODS[method]
        for attr in ("needs_calibration", "calibrated"):
            if hasattr(obj, attr):
                return bool(getattr(obj, attr))
    except (ImportError, KeyError, TypeError):
        pass
    return method != "rtn"


def in_voila() -> bool:
    """True in a Voila kernel (its env vars), where Panel must use ipywidgets comms."""
    return bool(os.environ.get("VOILA_KERNEL_ID")) or os.environ.get(
        "SERVER_SOFTWARE", ""
    ).startswith("voila")


def extension(**kw) -> None:
    """``pn.extension`` set up for offline use: inline resources; ipywidgets comms in Voila."""
    if in_voila():
        pn.extension(comms="ipywidgets", inline=True, **kw)
    elif is_notebook_comm():
        pn.extension(inline=True, **kw)
    else:
        pn.extension(**kw)


def _dispatcher() -> Callable[[Callable[[], None]], None]:
    """Run callbacks on this session's UI thread: the document's next tick under a server."""
    doc = server_doc()
    if doc is not None:
        return lambda fn: ui_call(doc, fn)  # thread-safe; a closed session drops the result
    return lambda fn: fn()


def mmss(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """Status lines of a prepare: "layer i/n, ETA mm:ss" from the measured per-layer rate."""

    def __init__(self, label: str, report: Callable[[str], None]) -> None:
        self.label, self.report = label, report
        self.t0 = time.monotonic()
        self.t1: float | None = None  # when the first layer finished (calibration capture ends)

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.t1 is None or done <= 1:
            self.t1, per_layer = now, now - self.t0
        else:
            per_layer = (now - self.t1) / (done - 1)
        eta = f", ETA {mmss(per_layer * (total - done))}" if done < total else ""
        self.report(f"preparing {self.label}: layer {done}/{total}{eta} ...")


class Controller:
    """Turns one session's settings into background work on the shared Backend.

    Watches the state's settings, runs compare / trace / memory jobs on superseding workers,
    each with its own cancel event, and writes results, the busy flag, status and error
    messages back into the state through ``dispatch`` (the UI thread). The last request wins:
    a result is shown only while it is still the newest of its kind. Shared by the Panel
    Dashboard and the ipywidgets front.
    """

    KINDS = ("compare", "trace", "pareto")

    def __init__(self, backend: Backend, state: DashboardState, dispatch=None) -> None:
        self.backend = backend
        self.lab = backend.lab  # held strongly while this session lives (the Backend is weak)
        self.state = state
        dispatch = dispatch or _dispatcher()
        self._dispatch = dispatch
        self._cancel = {k: threading.Event() for k in self.KINDS}
        self._closed = False
        self._workers = {
            "compare": Worker(self._on_compare, dispatch, "qviz-compare"),
            "trace": Worker(self._on_trace, dispatch, "qviz-trace"),
            "pareto": Worker(self._on_pareto, dispatch, "qviz-pareto"),
        }
        self._busy = dict.fromkeys(self.KINDS, False)
        state.param.watch(self.request_compare, list(DashboardState.SETTINGS))
        state.param.watch(
            self.request_pareto, ["group_size", "symmetric", "method", "protect_first"]
        )

    def start(self) -> None:
        self.request_pareto()
        self.request_compare()

    # cancellation ---------------------------------------------------------------------------
    def _fresh_cancel(self, kind: str) -> threading.Event:
        """Cancel ``kind``'s running job (it stops at its next step) and return a new event."""
        self._cancel[kind].set()
        ev = self._cancel[kind] = threading.Event()
        return ev

    def cancel(self, *_events) -> None:
        """The Cancel button: every running job stops at its next step; results stay shown."""
        for kind in self.KINDS:
            self._cancel[kind].set()

    def close(self, *_args) -> None:
        """The session is gone: cancel everything and ignore later requests."""
        self._closed = True
        self.cancel()

    def _set_busy(self, kind: str, busy: bool, status: str | None = None) -> None:
        self._busy[kind] = busy
        upd = {"busy": any(self._busy.values())}
        if status is not None:
            upd["status"] = status
        self.state.param.update(**upd)

    def _report(self, kind: str, token: int, msg: str) -> None:
        """Status ``msg`` from a worker thread, shown if ``token`` is still the newest job."""

        def show() -> None:
            if self._workers[kind].token == token:
                self.state.status = msg

        self._dispatch(show)

    def _plan(self):
        try:
            return self.state.plan()
        except ValueError as err:
            self.state.error = str(err)
            return None

    # compare --------------------------------------------------------------------------------
    def request_compare(self, *_events) -> None:
        """Compare the current settings (instant when cached); supersedes older requests."""
        s = self.state
        plan = self._plan()
        if plan is None or self._closed:
            return
        prompt, target = s.prompt, s.target
        asked = (plan.label, prompt, target)
        cancel = self._fresh_cancel("compare")  # a newer request or a cached setting: stop
        cached = self.backend.peek(Backend.compare_key(prompt, target, plan))
        if cached is not None:  # no model work, but still through the worker: newest wins
            self._workers["compare"].submit(lambda: (asked, cached))
            return
        first = (
            f"preparing {plan.label}: capturing calibration inputs ..."
            if any(needs_calibration(c.method) for c in _configs(plan))
            else f"computing {plan.label} ..."
        )
        self._set_busy("compare", True, first)
        token_box: dict = {}

        def say(msg: str) -> None:  # the token is known once submit returns
            self._report("compare", token_box.get("token"), msg)

        def work():
            self.lab.prepare(plan, cancel=cancel, on_progress=Progress(plan.label, say))
            say(f"comparing {plan.label} with full precision ...")
            return asked, self.backend.compare(prompt, target, plan, cancel=cancel)

        token_box["token"] = self._workers["compare"].submit(work)

    def _on_compare(self, result, error, token) -> None:
        s = self.state
        if token != self._workers["compare"].token:
            return  # a newer request is queued: its result will come
        if isinstance(error, Cancelled):
            self._set_busy(
                "compare", False, f"cancelled; {s.stale_note() or 'showing ' + _label(s)}"
            )
            return
        if error is not None:
            s.error = f"{type(error).__name__}: {error}"
            self._set_busy("compare", False, "")
            return
        asked, cmp = result
        updates = {"comparison": cmp, "shown": asked, "error": ""}
        n = len(cmp.ffn.flip_rate)
        if s.selected_layer is None or s.selected_layer >= n:
            updates["selected_layer"] = n // 2
        s.param.update(**updates)
        self._set_busy("compare", False, f"showing {cmp.plan_label}")

    # tracing --------------------------------------------------------------------------------
    def request_trace(self, *_events) -> None:
        """Run the causal-tracing sweep of the current settings in the background."""
        s = self.state
        plan = self._plan()
        if plan is None or self._closed:
            return
        prompt, target, comp = s.prompt, s.target, s.component
        cancel = self._fresh_cancel("trace")
        self._set_busy("trace", True, f"tracing {comp} under {plan.label} ...")

        def work():
            self.lab.prepare(plan, cancel=cancel)
            return self.backend.trace(prompt, target, plan, comp, cancel=cancel)

        self._workers["trace"].submit(work)

    def _on_trace(self, result, error, token) -> None:
        if token != self._workers["trace"].token:
            return
        if isinstance(error, Cancelled):
            self._set_busy("trace", False, "tracing cancelled")
            return
        if error is not None:
            self.state.error = f"{type(error).__name__}: {error}"
        else:
            self.state.param.update(patch_grid=result, error="")
        self._set_busy("trace", False, "tracing done" if error is None else "")

    # memory and accuracy --------------------------------------------------------------------
    def request_pareto(self, *_events, measure: bool = False) -> None:
        """Memory per bit-width now; fact-recall accuracy too when ``measure`` (slow)."""
        s = self.state
        if self._closed:
            return
        cancel = self._fresh_cancel("pareto")
        if measure:
            self._set_busy("pareto", True, f"measuring accuracy on {N_FACTS} facts ...")
        self._workers["pareto"].submit(
            lambda: self.backend.pareto_rows(s, n_facts=N_FACTS if measure else None, cancel=cancel)
        )

    def _on_pareto(self, result, error, token) -> None:
        if token != self._workers["pareto"].token:
            return
        if isinstance(error, Cancelled):
            self._set_busy("pareto", False, "accuracy cancelled")
            return
        if error is not None:
            self.state.error = f"{type(error).__name__}: {error}"
        else:
            self.state.pareto_rows = result
        self._set_busy("pareto", False, None)

    def wait(self, timeout: float | None = 60) -> bool:
        """Block until queued work is done (scripts and tests; never call it in a callback)."""
        ok = True
        for w in self._workers.values():
            ok = w.wait(timeout) and ok
        return ok


def _configs(plan: QuantPlan) -> list[QuantConfig]:
    return [c for c in (plan.default, *(c for _, c in plan.overrides)) if c is not None]


def _label(state: DashboardState) -> str:
    return state.shown[0] if state.shown else "nothing yet"


class Dashboard(pn.viewable.Viewer):
    """Controls and every view for one Lab: ``qviz.views.Dashboard(lab)``."""

    def __init__(self, lab, state: DashboardState | None = None, **params) -> None:
        super().__init__(**params)
        self.backend = backend_for(lab)
        self.state = state or DashboardState(model=self.backend.name)
        s = self.state
        self.controller = Controller(self.backend, s)
        self.views = {**figure_views(s), "verdict": VerdictCard(s)}
        self._controls = self._build_controls()
        s.param.watch(self._on_busy, ["busy", "error", "status"])
        self._on_busy()
        if server_doc() is not None:  # a closed tab cancels this session's work
            pn.state.on_session_destroyed(self.controller.close)
        self.controller.start()

    def request_trace(self) -> None:
        """Run the causal-tracing sweep of the current settings in the background."""
        self.controller.request_trace()

    def cancel(self) -> None:
        """Stop this session's running work at its next step (the Cancel button)."""
        self.controller.cancel()

    def wait(self, timeout: float | None = 60) -> bool:
        """Block until queued work is done (scripts and tests; never call it in a callback)."""
        return self.controller.wait(timeout)

    # controls -------------------------------------------------------------------------------
    def _bits_from_widget(self, event) -> None:
        if event.new is not None:
            self._widget_bits = int(event.new)
            self.state.bits = int(event.new)

    def _bits_to_widget(self, event) -> None:
        # Only a change made elsewhere (a script, a test) moves the slider. Echoing the slider's
        # own value back is what snapped it back under load: its (throttled) value from an
        # earlier key press arrived after later presses had moved the handle, and the echo
        # set the handle to that older value, from which the next presses then counted.
        if event.new != self._widget_bits:
            self._widget_bits = event.new
            self.bits_slider.value = event.new

    def _build_controls(self) -> pn.Column:
        s = self.state
        self._widget_bits = s.bits
        self.bits_slider = pn.widgets.IntSlider(
            name="Weight bits", start=2, end=8, value=s.bits, width=250, css_classes=["qviz-bits"]
        )
        # only a released drag (or a key press) requests work: dragging stays smooth
        self.bits_slider.param.watch(self._bits_from_widget, "value_throttled")
        s.param.watch(self._bits_to_widget, "bits")
        w = pn.widgets
        kw = {"width": 250}
        prompt = w.TextInput.from_param(s.param.prompt, name="Prompt", **kw)
        target = w.TextInput.from_param(s.param.target, name="Target (one token)", **kw)
        group = w.Select(name="Group size", options=GROUP_SIZES, value=s.group_size, **kw)
        group.link(s, value="group_size")
        sym = w.Checkbox.from_param(s.param.symmetric, name="Symmetric")
        method = w.Select.from_param(
            s.param.method, name="Method (calibrated ones are slow)", options=method_names(), **kw
        )
        protect = w.IntSlider.from_param(
            s.param.protect_first, name="Protect first k (8-bit)", **kw
        )
        component = w.Select.from_param(s.param.component, name="Tracing component", **kw)
        self.trace_button = w.Button(name="Run causal tracing", button_type="primary")
        self.trace_button.on_click(lambda _e: self.request_trace())
        self.acc_button = w.Button(name=f"Measure accuracy ({N_FACTS} facts)")
        self.acc_button.on_click(lambda _e: self.controller.request_pareto(measure=True))
        self.cancel_button = w.Button(name="Cancel", button_type="warning", disabled=True)
        self.cancel_button.on_click(lambda _e: self.cancel())
        self.layer_input = w.IntInput(
            name="Selected layer", value=s.selected_layer, start=0, width=250
        )
        self.layer_input.link(s, value="selected_layer")
        s.param.watch(lambda e: setattr(self.layer_input, "value", e.new), "selected_layer")
        self.progress = pn.indicators.Progress(
            active=True, visible=False, width=240, bar_color="primary", css_classes=["qviz-busy"]
        )
        self.status = DivPane("", css_classes=["qviz-status"], width=260)
        self.alert = DivPane("", css_classes=["qviz-error"], width=260, visible=False)
        return pn.Column(
            pn.pane.Markdown(f"**qviz** · {self.backend.name}"),
            prompt,
            target,
            self.bits_slider,
            group,
            sym,
            method,
            protect,
            self.layer_input,
            component,
            self.trace_button,
            self.acc_button,
            self.cancel_button,
            self.progress,
            self.status,
            self.alert,
            width=280,
        )

    def _on_busy(self, *_events) -> None:
        s = self.state
        self.progress.visible = s.busy
        self.cancel_button.disabled = not s.busy
        self.status.text = status_html(s.status)
        self.alert.text = (
            '<div class="qviz-error-text" style="color:#842029;background:#f8d7da;'
            'border:1px solid #f5c2c7;padding:8px;border-radius:4px;white-space:pre-wrap">'
            f"{html.escape(s.error)}</div>"
        )
        self.alert.visible = bool(s.error)

    def __panel__(self):
        main = arrange(self.views, pn.Row, pn.Column)
        return pn.Row(self._controls, main, css_classes=["qviz-dashboard"])

    def ipywidget(self):
        """The dashboard as an ipywidget with inline resources and stylesheets (for Voila)."""
        return panel_ipywidget(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        if pn.config.comms == "ipywidgets":
            return self.ipywidget()._repr_mimebundle_(include=include, exclude=exclude)
        return super()._repr_mimebundle_(include, exclude)


def status_html(status: str) -> str:
    """The status line as HTML, escaped (both fronts)."""
    return f'<code class="qviz-status-text">{html.escape(status)}</code>' if status else ""


def panel_ipywidget(obj):
    """A Panel object as a jupyter_bokeh widget whose JS and CSS are all embedded (offline)."""
    from bokeh.document import Document
    from bokeh.models import UIElement
    from jupyter_bokeh.widgets import BokehModel
    from panel.io.notebook import patch_inline_stylesheets
    from panel.io.resources import set_resource_mode

    doc = Document()
    with set_resource_mode("inline"):
        model = pn.panel(obj).get_root(doc=doc)
    for sub in model.select({"type": UIElement}):
        patch_inline_stylesheets(sub)
    return BokehModel(model, combine_events=True)
