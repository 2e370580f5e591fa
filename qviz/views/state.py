"""The state of one dashboard session (``param``): every setting and the results shown."""

from __future__ import annotations

import param

from qviz.quant.config import QuantConfig, QuantPlan
from qviz.results import Comparison, PatchGrid
from qviz.views import text

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TARGET = " Paris"
GROUP_SIZES = {"32": 32, "64": 64, "128": 128, "per channel": None}
SAME = "same"  # the second plan's bits / group size: the first plan's


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

    # side by side (issue 13) and the budget plan (issue 17): a second plan beside the first
    method2 = param.Selector(default="none", objects=["none", *method_names()], doc="off: none")
    bits2 = param.Selector(default=SAME, objects=[SAME, *range(2, 9)])
    group_size2 = param.Selector(default=SAME, objects=[SAME, *GROUP_SIZES.values()])
    budget_on = param.Boolean(default=False, doc="prescribed plan (first) beside uniform (second)")
    budget = param.Number(default=3.5, bounds=(2.5, 8.0), step=0.25, doc="bits per weight")
    comparison2 = param.ClassSelector(class_=Comparison, default=None, allow_None=True)
    shown2 = param.Tuple(default=None, allow_None=True, length=3)
    # (Prescription, uniform plan label, its bits/weight) of the budget plan shown
    budget_result = param.Tuple(default=None, allow_None=True, length=3)

    SETTINGS = ("prompt", "target", "bits", "group_size", "symmetric", "method", "protect_first")
    SETTINGS2 = ("method2", "bits2", "group_size2", "budget_on", "budget")

    def asked(self) -> tuple[str, str, str] | None:
        """(plan label, prompt, target) the controls ask for; None when they are invalid."""
        if self.budget_on:
            return (f"prescribed {self.budget:g} bits/weight", self.prompt, self.target)
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

    def plan2(self) -> QuantPlan | None:
        """The second plan shown side by side (None: off); bits and group size "same" take
        the first plan's (raises ValueError when invalid)."""
        if self.method2 == "none":
            return None
        bits = self.bits if self.bits2 == SAME else self.bits2
        group = self.group_size if self.group_size2 == SAME else self.group_size2
        cfg = QuantConfig(int(bits), group, symmetric=bool(self.symmetric), method=self.method2)
        if self.protect_first > 0:
            return QuantPlan.protect_first(cfg, n=int(self.protect_first), bits=8)
        return QuantPlan.uniform(cfg)

    def asked2(self) -> tuple[str, str, str] | None:
        """(second plan label, prompt, target) the controls ask for; None when off or invalid."""
        if self.budget_on:
            return (f"uniform within {self.budget:g} bits/weight", self.prompt, self.target)
        try:
            plan = self.plan2()
        except ValueError:
            return None
        return None if plan is None else (plan.label, self.prompt, self.target)

    def stale_note2(self) -> str:
        """The stale note of the second plan's views ("" when off or up to date)."""
        return text.stale_note(self.shown2, self.asked2())
