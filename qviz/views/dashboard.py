"""``Dashboard(lab)``: the controls and every view, one DashboardState per session.

Sessions share one :class:`Backend` per Lab (the loaded model and result caches) but never
state. Slow work runs on :class:`~qviz.views.components.Worker` threads; results reach the page
on the UI thread (the bokeh document's next tick under ``panel serve``), the last result stays
shown until the new one is ready, and errors appear as a message in the app.
"""

from __future__ import annotations

import html
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import panel as pn

from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.memory import footprint
from qviz.results import Comparison, PatchGrid
from qviz.views.components import (
    GROUP_SIZES,
    DashboardState,
    DivPane,
    VerdictCard,
    Worker,
    figure_views,
    is_notebook_comm,
    server_doc,
    ui_call,
)

PARETO_BITS = (2, 3, 4, 5, 6, 8)


class Backend:
    """One Lab shared by every session, with LRU caches of comparisons, traces and accuracies."""

    def __init__(self, lab, max_items: int = 128) -> None:
        self.lab = lab
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._max = max_items

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

    @staticmethod
    def compare_key(prompt: str, target: str, plan: QuantPlan) -> tuple:
        return ("compare", prompt, target, plan)

    def compare(self, prompt: str, target: str, plan: QuantPlan) -> Comparison:
        key = self.compare_key(prompt, target, plan)
        return self._cached(key, lambda: self.lab.compare(prompt, target=target, plan=plan))

    def trace(self, prompt: str, target: str, plan: QuantPlan, component: str) -> PatchGrid:
        if not hasattr(self.lab, "trace"):
            raise NotImplementedError("causal tracing is not available in this version of qviz")
        key = ("trace", prompt, target, plan, component)
        return self._cached(
            key, lambda: self.lab.trace(prompt, target=target, plan=plan, component=component)
        )

    def accuracy(self, plan: QuantPlan, n_facts: int) -> float:
        from qviz.data import load_facts

        facts = load_facts()[:n_facts]
        key = ("accuracy", plan, n_facts)
        return self._cached(key, lambda: self.lab.evaluate(plan, prompts=facts).accuracy)

    def pareto_rows(self, state: DashboardState, n_facts: int | None = None) -> list[dict]:
        """Memory (and accuracy when ``n_facts``, else any cached one) per bit-width."""
        rows = []
        for bits in PARETO_BITS:
            plan = plan_for(state, bits)
            fp = footprint(self.lab.model, plan)
            if n_facts:
                acc = self.accuracy(plan, n_facts)
            else:
                acc = self.peek(("accuracy", plan, N_FACTS))
            rows.append(
                {
                    "bits": bits,
                    "label": f"{bits}-bit",
                    "mib": fp.bytes / 2**20,
                    "effective_bits": fp.effective_bits,
                    "accuracy": float("nan") if acc is None else float(acc),
                }
            )
        return rows


N_FACTS = 60  # facts per accuracy point in the dashboard (the report takes --facts)

_BACKENDS: dict[int, Backend] = {}
_BACKENDS_LOCK = threading.Lock()


def backend_for(lab) -> Backend:
    """The one Backend of ``lab`` in this process (sessions share it)."""
    if isinstance(lab, Backend):
        return lab
    with _BACKENDS_LOCK:
        b = _BACKENDS.get(id(lab))
        if b is None or b.lab is not lab:
            b = _BACKENDS[id(lab)] = Backend(lab)
        return b


def plan_for(state: DashboardState, bits: int) -> QuantPlan:
    """The state's plan with ``bits`` instead of its own bit-width."""
    cfg = QuantConfig(
        bits=bits, group_size=state.group_size, symmetric=state.symmetric, method=state.method
    )
    if state.protect_first > 0:
        return QuantPlan.protect_first(cfg, n=int(state.protect_first), bits=8)
    return QuantPlan.uniform(cfg)


def in_voila() -> bool:
    """True in a Voila kernel (its env vars)."""
    return bool(os.environ.get("VOILA_KERNEL_ID")) or os.environ.get(
        "SERVER_SOFTWARE", ""
    ).startswith("voila")


def _panel_picks_comms() -> bool:
    """Colab and VS Code: Panel detects these front ends and sets their comms itself."""
    import sys

    return "google.colab" in sys.modules or any(
        k in os.environ for k in ("VSCODE_PID", "VSCODE_CWD")
    )


def extension(**kw) -> None:
    """``pn.extension`` set up for offline use: inline resources; ipywidgets comms in Jupyter.

    In any Jupyter kernel (JupyterLab, Notebook 7, Voila) the dashboard travels as one
    jupyter_bokeh widget. Panel's default notebook comm opens only once the kernel has
    answered the page's comm request, which it cannot do while later cells run ("run all");
    an update pushed from a worker thread before then is queued on that thread's event loop,
    which never runs, and is lost (empty figures, a status stuck at "computing ..."). A widget
    comm is open from the start and its messages are sent from any thread.
    """
    if is_notebook_comm():
        if not _panel_picks_comms():
            kw.setdefault("comms", "ipywidgets")
        pn.extension(inline=True, **kw)
    else:
        pn.extension(**kw)


def _dispatcher() -> Callable[[Callable[[], None]], None]:
    """Run callbacks on this session's UI thread: the document's next tick under a server."""
    doc = server_doc()
    if doc is not None:
        return lambda fn: ui_call(doc, fn)  # thread-safe; a closed session drops the result
    return lambda fn: fn()


class Controller:
    """Turns one session's settings into background work on the shared Backend.

    Watches the state's settings, runs compare / trace / accuracy jobs on superseding workers,
    and writes results, the busy flag, status and error messages back into the state through
    ``dispatch`` (the UI thread). Shared by the Panel Dashboard and the ipywidgets front.
    """

    def __init__(self, backend: Backend, state: DashboardState, dispatch=None) -> None:
        self.backend = backend
        self.state = state
        dispatch = dispatch or _dispatcher()
        self._dispatch = dispatch
        self._cancel = threading.Event()  # set when a newer request supersedes a running GPTQ
        self._compare_worker = Worker(self._on_compare, dispatch, "qviz-compare")
        self._trace_worker = Worker(self._on_trace, dispatch, "qviz-trace")
        self._pareto_worker = Worker(self._on_pareto, dispatch, "qviz-pareto")
        self._busy = {"compare": False, "trace": False, "pareto": False}
        state.param.watch(
            self.request_compare,
            ["prompt", "target", "bits", "group_size", "symmetric", "method", "protect_first"],
        )
        state.param.watch(
            self.request_pareto, ["group_size", "symmetric", "method", "protect_first"]
        )

    def start(self) -> None:
        self.request_pareto()
        self.request_compare()

    def _set_busy(self, kind: str, busy: bool, status: str = "") -> None:
        self._busy[kind] = busy
        self.state.param.update(busy=any(self._busy.values()), status=status)

    def _plan(self):
        try:
            return self.state.plan()
        except ValueError as err:
            self.state.error = str(err)
            return None

    def request_compare(self, *_events) -> None:
        """Compare the current settings (instant when cached); supersedes older requests."""
        s = self.state
        plan = self._plan()
        if plan is None:
            return
        prompt, target = s.prompt, s.target
        cached = self.backend.peek(Backend.compare_key(prompt, target, plan))
        if cached is not None:  # no model work, but still through the worker: newest wins
            self._compare_worker.submit(lambda: cached)
            return
        self._set_busy("compare", True, f"computing {plan.label} ...")
        self._cancel.set()  # a GPTQ run for older settings stops at its next layer
        cancel = self._cancel = threading.Event()

        def progress(done: int, total: int) -> None:
            msg = f"GPTQ {plan.label}: layer {done}/{total} ..."
            self._dispatch(lambda: self.state.param.update(status=msg))

        def work():
            self.backend.lab.engine.materialize(plan, cancel=cancel, on_progress=progress)
            return self.backend.compare(prompt, target, plan)

        self._compare_worker.submit(work)

    def _on_compare(self, result, error, _token) -> None:
        s = self.state
        if error is not None:
            s.error = f"{type(error).__name__}: {error}"
            self._set_busy("compare", False, "")
            return
        updates = {"comparison": result, "error": ""}
        n = len(result.ffn.flip_rate)
        if s.selected_layer is None or s.selected_layer >= n:
            updates["selected_layer"] = n // 2
        s.param.update(**updates)
        self._set_busy("compare", False, f"showing {result.plan_label}")

    def request_trace(self, *_events) -> None:
        """Run the causal-tracing sweep of the current settings in the background."""
        s = self.state
        plan = self._plan()
        if plan is None:
            return
        prompt, target, comp = s.prompt, s.target, s.component
        self._set_busy("trace", True, f"tracing {comp} under {plan.label} ...")
        self._trace_worker.submit(lambda: self.backend.trace(prompt, target, plan, comp))

    def _on_trace(self, result, error, _token) -> None:
        if error is not None:
            self.state.error = f"{type(error).__name__}: {error}"
        else:
            self.state.param.update(patch_grid=result, error="")
        self._set_busy("trace", False, "tracing done" if error is None else "")

    def request_pareto(self, *_events, measure: bool = False) -> None:
        """Memory per bit-width now; fact-recall accuracy too when ``measure`` (slow)."""
        s = self.state
        if measure:
            self._set_busy("pareto", True, f"measuring accuracy on {N_FACTS} facts ...")
        self._pareto_worker.submit(
            lambda: self.backend.pareto_rows(s, n_facts=N_FACTS if measure else None)
        )

    def _on_pareto(self, result, error, _token) -> None:
        if error is not None:
            self.state.error = f"{type(error).__name__}: {error}"
        else:
            self.state.pareto_rows = result
        self._set_busy("pareto", False, "")

    def wait(self, timeout: float | None = 60) -> bool:
        """Block until queued work is done (scripts and tests; never call it in a callback)."""
        ok = True
        for w in (self._compare_worker, self._trace_worker, self._pareto_worker):
            ok = w.wait(timeout) and ok
        return ok


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
        self.controller.start()

    def request_trace(self) -> None:
        """Run the causal-tracing sweep of the current settings in the background."""
        self.controller.request_trace()

    def wait(self, timeout: float | None = 60) -> bool:
        """Block until queued work is done (scripts and tests; never call it in a callback)."""
        return self.controller.wait(timeout)

    # controls -------------------------------------------------------------------------------
    def _build_controls(self) -> pn.Column:
        s = self.state
        self.bits_slider = pn.widgets.IntSlider(
            name="Weight bits", start=2, end=8, value=s.bits, width=250, css_classes=["qviz-bits"]
        )
        # only a released drag (or a key press) requests work: dragging stays smooth
        self.bits_slider.param.watch(
            lambda e: setattr(s, "bits", int(e.new)) if e.new is not None else None,
            "value_throttled",
        )
        s.param.watch(lambda e: setattr(self.bits_slider, "value", e.new), "bits")
        w = pn.widgets
        kw = {"width": 250}
        prompt = w.TextInput.from_param(s.param.prompt, name="Prompt", **kw)
        target = w.TextInput.from_param(s.param.target, name="Target (one token)", **kw)
        group = w.Select(name="Group size", options=GROUP_SIZES, value=s.group_size, **kw)
        group.link(s, value="group_size")
        sym = w.Checkbox.from_param(s.param.symmetric, name="Symmetric")
        method = w.Select.from_param(s.param.method, name="Method (gptq is slow)", **kw)
        protect = w.IntSlider.from_param(
            s.param.protect_first, name="Protect first k (8-bit)", **kw
        )
        component = w.Select.from_param(s.param.component, name="Tracing component", **kw)
        self.trace_button = w.Button(name="Run causal tracing", button_type="primary")
        self.trace_button.on_click(lambda _e: self.request_trace())
        self.acc_button = w.Button(name=f"Measure accuracy ({N_FACTS} facts)")
        self.acc_button.on_click(lambda _e: self.controller.request_pareto(measure=True))
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
            self.progress,
            self.status,
            self.alert,
            width=280,
        )

    def _on_busy(self, *_events) -> None:
        s = self.state
        self.progress.visible = s.busy
        self.status.text = f"<code>{html.escape(s.status)}</code>" if s.status else ""
        self.alert.text = (
            '<div class="qviz-error-text" style="color:#842029;background:#f8d7da;'
            'border:1px solid #f5c2c7;padding:8px;border-radius:4px;white-space:pre-wrap">'
            f"{html.escape(s.error)}</div>"
        )
        self.alert.visible = bool(s.error)

    def __panel__(self):
        v = self.views
        main = pn.Column(
            pn.Row(v["cka"], v["verdict"]),
            pn.Row(v["lens"], pn.Column(v["ffn"], v["attention"])),
            pn.Row(v["patch"], v["pareto"]),
        )
        return pn.Row(self._controls, main, css_classes=["qviz-dashboard"])

    def ipywidget(self):
        """The dashboard as an ipywidget with inline resources and stylesheets (for Voila)."""
        return panel_ipywidget(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        if pn.config.comms == "ipywidgets":
            return self.ipywidget()._repr_mimebundle_(include=include, exclude=exclude)
        return super()._repr_mimebundle_(include, exclude)


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
