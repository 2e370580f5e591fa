"""``Dashboard(lab)``: the Panel front -- the controls and every view in ``LAYOUT``, one
DashboardState and Controller per session (see :mod:`qviz.views.session` for the work, its
cancellation and the cache layers).
"""

from __future__ import annotations

import html
import os

import panel as pn

from qviz.views.components import DivPane, VerdictCard, arrange, figure_views
from qviz.views.session import (  # noqa: F401 (re-exported: their old home)
    N_FACTS,
    PARETO_BITS,
    Backend,
    Controller,
    Progress,
    backend_for,
    is_notebook_comm,
    plan_for,
    server_doc,
)
from qviz.views.state import GROUP_SIZES, SAME, DashboardState, method_names


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
        compare = self._compare_controls(kw)
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
            *compare,
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

    def _budget_from_widget(self, event) -> None:
        if event.new is not None:
            self._widget_budget = self.state.budget = float(event.new)

    def _budget_to_widget(self, event) -> None:
        if event.new != self._widget_budget:
            self._widget_budget = self.budget_slider.value = event.new

    def _compare_controls(self, kw: dict) -> list:
        """Side by side (a second method or plan) and the budget plan (prescribed vs uniform)."""
        s, w = self.state, pn.widgets
        method2 = w.Select.from_param(s.param.method2, name="Side by side: second method", **kw)
        method2.css_classes = ["qviz-method2"]
        bits = {SAME: SAME, **{str(b): b for b in range(2, 9)}}
        bits2 = w.Select(name="... its bits", options=bits, value=s.bits2, **kw)
        bits2.css_classes = ["qviz-bits2"]
        group2 = w.Select(name="... its group size", options={SAME: SAME, **GROUP_SIZES},
                          value=s.group_size2, **kw)  # fmt: skip
        bits2.link(s, value="bits2")
        group2.link(s, value="group_size2")
        budget_on = w.Checkbox.from_param(
            s.param.budget_on, name="Budget plan: prescribed vs uniform (slow first time)"
        )
        self.budget_slider = w.FloatSlider(
            name="Budget (bits per weight)", start=2.5, end=8.0, step=0.25, value=s.budget,
            css_classes=["qviz-budget"], **kw,
        )  # fmt: skip
        self._widget_budget = s.budget  # as for the bits slider: never echo its own value back
        self.budget_slider.param.watch(self._budget_from_widget, "value_throttled")
        s.param.watch(self._budget_to_widget, "budget")
        return [method2, bits2, group2, budget_on, self.budget_slider]

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
