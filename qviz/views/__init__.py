"""Views: pure bokeh figures (``plots``), Panel components and the Dashboard, ipywidgets front.

Importing this package imports Panel; ``import qviz`` alone does not.
"""

from qviz.views import plots
from qviz.views.components import (
    LAYOUT,
    AttentionDifference,
    AttentionEntropy,
    CKADifference,
    CKAMap,
    DashboardState,
    FFNSignFlips,
    LensView,
    MemoryPareto,
    PatchingHeatmap,
    VerdictCard,
    Worker,
)
from qviz.views.dashboard import Backend, Dashboard, backend_for, extension, in_voila

__all__ = [
    "LAYOUT",
    "AttentionDifference",
    "AttentionEntropy",
    "CKADifference",
    "Backend",
    "CKAMap",
    "Dashboard",
    "DashboardState",
    "FFNSignFlips",
    "LensView",
    "MemoryPareto",
    "PatchingHeatmap",
    "VerdictCard",
    "Worker",
    "backend_for",
    "extension",
    "in_voila",
    "plots",
]
