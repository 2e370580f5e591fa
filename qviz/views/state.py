"""The state of one dashboard session (``param``): every setting and the results shown."""

from __future__ import annotations

import param

from qviz.quant.config import QuantConfig, QuantPlan
from qviz.results import Comparison, PatchGrid
from qviz.views import text

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TARGET = " Paris"
GROUP_SIZES = {"32": 32, "64": 64, "128": 128, "per channel": None}


def method_names() -> list[str]:
    """The quantization methods of the registry ``qviz.quant.METHODS`` (names, in order)."""
    try:
        from qviz.quant import METHODS
    except ImportError:  # before the registry: the tuple of names in quant.config
        from qviz.quant.config import METHODS
    return list(METHODS)


class DashboardState(param.Parameterized):
    """Everything one session sets, plus the results shown; one instance per browser session."""

    model = param.String(default="smollm2-135m", doc="model name or path (set by the app)")
    prompt = param.String(default=DEFAULT_PROMPT)
    target = param.String(default=DEFAULT_TARGET, doc="a single-token expected answer")
    bits = param.Integer(default=4, bounds=(2, 8))
    group_size = param.Selector(default=128, objects=list(GROUP_SIZES.values()))
    symmetric = param.Boolean(default=False)
    method = param.Selector(default="rtn", objects=method_names())
    protect_first = param.Integer(default=0, bounds=(0, 8), doc="first k layers kept at 8 bits")
    selected_layer = param.Integer(default=None, allow_None=True, doc="decoder layer")
    component = param.Selector(default="resid", objects=["resid", "attn", "mlp"])

    comparison = param.ClassSelector(class_=Comparison, default=None, allow_None=True)
    patch_grid = param.ClassSelector(class_=PatchGrid, default=None, allow_None=True)
    pareto_rows = param.List(default=[])
    shown = param.Tuple(default=None, allow_None=True, length=3,
                        doc="(plan label, prompt, target) of the comparison shown")  # fmt: skip
    error = param.String(default="", doc="the last error message, shown in the app")
    busy = param.Boolean(default=False)
    status = param.String(default="")

    SETTINGS = ("prompt", "target", "bits", "group_size", "symmetric", "method", "protect_first")

    def asked(self) -> tuple[str, str, str] | None:
        """(plan label, prompt, target) the controls ask for; None when they are invalid."""
        try:
            return (self.plan().label, self.prompt, self.target)
        except ValueError:
            return None

    def stale_note(self) -> str:
        """ "stale: showing rtn4-g128, asked rtn2-g128" while the comparison shown is older."""
        return text.stale_note(self.shown, self.asked())

    def config(self) -> QuantConfig:
        """The QuantConfig of the current settings (raises ValueError when invalid)."""
        return QuantConfig(
            bits=int(self.bits),
            group_size=self.group_size,
            symmetric=bool(self.symmetric),
            method=self.method,
        )

    def plan(self) -> QuantPlan:
        """The plan of the current settings: uniform, or source protection of the first k."""
        cfg = self.config()
        if self.protect_first > 0:
            return QuantPlan.protect_first(cfg, n=int(self.protect_first), bits=8)
        return QuantPlan.uniform(cfg)
