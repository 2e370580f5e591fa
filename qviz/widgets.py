"""``qviz.widgets.dashboard(lab)``: the ipywidgets-only dashboard (see ``qviz.views.widgets``)."""

from qviz.views.widgets import WidgetDashboard, dashboard, load_bokehjs

__all__ = ["WidgetDashboard", "dashboard", "load_bokehjs"]
