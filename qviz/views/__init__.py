"""Views: pure bokeh figures (``plots``), Panel components and the Dashboard, ipywidgets front.

Importing this package imports Panel; ``import qviz`` alone does not.
"""

from qviz.views import plots
from qviz.views.components import (
    AttentionEntropy,
    CKAMap,
    DashboardState,
    FFNSignFlips,
    LensTrajectory,
    MemoryPareto,
    PatchingHeatmap,
    VerdictCard,
    Worker,
)
from qviz.views.dashboard import Backend, Dashboard, backend_for, extension, in_voila

__all__ = [
    "AttentionEntropy",
    "Backend",
    "CKAMap",
    "Dashboard",
    "DashboardState",
    "FFNSignFlips",
    "LensTrajectory",
    "MemoryPareto",
    "PatchingHeatmap",
    "VerdictCard",
    "Worker",
    "backend_for",
    "extension",
    "in_voila",
    "plots",
]
