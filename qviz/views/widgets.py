"""``qviz.widgets.dashboard(lab)``: an ipywidgets-only front (no Panel comms needed).

Same DashboardState, Controller, view components and plot functions as the Panel Dashboard;
the figures are shown through ``jupyter_bokeh.BokehModel`` (which syncs in-place data changes
by itself) with BokehJS loaded inline, so it works offline in JupyterLab and in Voila.
"""

from __future__ import annotations

import html

import ipywidgets as W

from qviz.views.components import (
    GROUP_SIZES,
    VERDICT_WATCHED,
    DashboardState,
    arrange,
    figure_views,
    method_names,
    verdict_card_html,
)
from qviz.views.dashboard import N_FACTS, Controller, backend_for, status_html
from qviz.views.state import SAME

_BOKEH_LOADED = False


def load_bokehjs() -> None:
    """Load BokehJS into the notebook page from inline resources (offline), once."""
    global _BOKEH_LOADED
    if not _BOKEH_LOADED:
        from bokeh.io import output_notebook
        from bokeh.resources import INLINE

        output_notebook(resources=INLINE, hide_banner=True)
        _BOKEH_LOADED = True


class WidgetDashboard:
    """The ipywidgets dashboard; ``.widget`` is the root ``ipywidgets.Box``."""

    def __init__(self, lab, state: DashboardState | None = None, load_js: bool = True) -> None:
        from jupyter_bokeh import BokehModel

        if load_js:
            load_bokehjs()
        self.backend = backend_for(lab)
        self.state = s = state or DashboardState(model=self.backend.name)
        self.controller = Controller(self.backend, s, dispatch=lambda fn: fn())
        self.views = figure_views(s)
        self.figures = {k: BokehModel(v.root) for k, v in self.views.items()}
        self.verdict = W.HTML(verdict_card_html(s))
        verdict = lambda *_: setattr(self.verdict, "value", verdict_card_html(s))  # noqa: E731
        s.param.watch(verdict, VERDICT_WATCHED)
        self.controls = self._controls()
        main = arrange({**self.figures, "verdict": self.verdict}, _hbox, _vbox)
        self.widget = W.HBox([self.controls, main])
        self.controller.start()

    def _controls(self) -> W.VBox:
        s = self.state
        lay = W.Layout(width="260px")
        style = {"description_width": "90px"}
        prompt = W.Text(s.prompt, description="Prompt", continuous_update=False, layout=lay)
        target = W.Text(s.target, description="Target", continuous_update=False, layout=lay)
        bits = W.IntSlider(s.bits, min=2, max=8, description="Bits", continuous_update=False)
        bits.add_class("qviz-bits")
        group = W.Dropdown(options=list(GROUP_SIZES.items()), value=s.group_size,
                           description="Group size", layout=lay, style=style)  # fmt: skip
        sym = W.Checkbox(s.symmetric, description="Symmetric")
        method = W.Dropdown(options=method_names(), value=s.method, description="Method")
        protect = W.IntSlider(s.protect_first, min=0, max=8, description="Protect k",
                              continuous_update=False)  # fmt: skip
        layer = W.IntText(s.selected_layer or 0, description="Layer", layout=lay)
        component = W.Dropdown(options=["resid", "attn", "mlp"], value=s.component,
                               description="Tracing")  # fmt: skip
        same = [(SAME, SAME)]
        method2 = W.Dropdown(options=["none", *method_names()], value=s.method2,
                             description="Beside", style=style)  # fmt: skip
        bits2 = W.Dropdown(options=same + [(str(b), b) for b in range(2, 9)], value=s.bits2,
                           description="its bits", style=style)  # fmt: skip
        group2 = W.Dropdown(options=same + list(GROUP_SIZES.items()), value=s.group_size2,
                            description="its group", style=style)  # fmt: skip
        budget_on = W.Checkbox(s.budget_on, description="Budget plan (prescribe)")
        budget = W.FloatSlider(s.budget, min=2.5, max=8.0, step=0.25, description="Budget",
                               continuous_update=False)  # fmt: skip
        trace = W.Button(description="Run causal tracing")
        trace.on_click(lambda _b: self.controller.request_trace())
        acc = W.Button(description=f"Accuracy ({N_FACTS} facts)")
        acc.on_click(lambda _b: self.controller.request_pareto(measure=True))
        self.cancel = W.Button(description="Cancel", button_style="warning", disabled=True)
        self.cancel.on_click(lambda _b: self.controller.cancel())
        self.progress = W.IntProgress(value=1, min=0, max=1, bar_style="info", layout=lay)
        self.status = W.HTML("")
        self.error = W.HTML("")
        self.error.add_class("qviz-error")
        pairs = {
            "prompt": prompt, "target": target, "bits": bits, "group_size": group,
            "symmetric": sym, "method": method, "protect_first": protect,
            "selected_layer": layer, "component": component, "method2": method2,
            "bits2": bits2, "group_size2": group2, "budget_on": budget_on, "budget": budget,
        }  # fmt: skip
        for name, w in pairs.items():
            w.observe(lambda ch, n=name: self._set(n, ch["new"]), "value")
            s.param.watch(lambda ev, w=w: self._show(w, ev.new), name)
        s.param.watch(self._on_status, ["busy", "status", "error"])
        self._on_status()
        return W.VBox(
            [*pairs.values(), trace, acc, self.cancel, self.progress, self.status, self.error],
            layout=W.Layout(width="280px"),
        )

    def _set(self, name: str, value) -> None:
        if getattr(self.state, name) != value:
            try:
                setattr(self.state, name, value)
            except ValueError as err:
                self.state.error = str(err)

    @staticmethod
    def _show(widget, value) -> None:
        if value is not None and widget.value != value:
            widget.value = value

    def _on_status(self, *_events) -> None:
        s = self.state
        self.progress.layout.visibility = "visible" if s.busy else "hidden"
        self.cancel.disabled = not s.busy
        self.status.value = status_html(s.status)
        self.error.value = (
            f'<div style="color:#c62828;white-space:pre-wrap">{html.escape(s.error)}</div>'
            if s.error
            else ""
        )

    def wait(self, timeout: float | None = 60) -> bool:
        return self.controller.wait(timeout)

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)


def _hbox(*children) -> W.HBox:
    return W.HBox(list(children))


def _vbox(*children) -> W.VBox:
    return W.VBox(list(children))


def dashboard(lab, state: DashboardState | None = None) -> WidgetDashboard:
    """The ipywidgets dashboard of ``lab`` (display it, or its ``.widget``)."""
    return WidgetDashboard(lab, state)
