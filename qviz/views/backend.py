"""The Backend: the result cache every session of one Lab shares, holding the Lab weakly.

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

import dataclasses
import inspect
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from qviz.lab import CKA_CONTEXT
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.results import Comparison, LayerMap, PatchGrid
from qviz.views.state import DashboardState

PARETO_BITS = (2, 3, 4, 5, 6, 8)
# whole-plan moves of the budget slider's local search (lab.prescribe's refine_passes): at 3 bits
# on SmolLM2, 16 moves (~6 s) take the calibration KL from 6.23 to 4.79, 64 (~19 s) to 4.48
REFINE_PASSES = 16
N_FACTS = 60  # facts per accuracy point in the dashboard (the report takes --facts)


def call_with_cancel(fn: Callable, *args, cancel: threading.Event | None = None, **kw):
    """``fn(*args, **kw)``, passing ``cancel=`` when ``fn`` takes it (Lab methods that do)."""
    if cancel is not None and "cancel" in inspect.signature(fn).parameters:
        kw["cancel"] = cancel
    return fn(*args, **kw)


@dataclasses.dataclass
class PendingMap(LayerMap):
    """The CKA map of a first look (``Backend.first_look``): every cell NaN (drawn grey) while
    the pooled context runs; its caption says so."""

    @property
    def how(self) -> str:
        return f"computing, pooled over {self.n_prompts} prompts ..."

    @staticmethod
    def like(cka: LayerMap, n_prompts: int) -> PendingMap:
        n = cka.values.shape[0]
        return PendingMap(np.full((n, n), np.nan), 0, cka.estimator, n_prompts=n_prompts,
                          drop_first=True)  # fmt: skip


def is_first_look(cmp: Comparison | None) -> bool:
    """Whether ``cmp`` is a first look: its CKA map and verdict still computing."""
    return cmp is not None and isinstance(cmp.cka, PendingMap)


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
                lab.compare,
                prompt,
                target=target,
                plan=plan,
                cka_context=CKA_CONTEXT,
                cancel=cancel,
            ),
        )

    def first_look(
        self, prompt: str, target: str, plan: QuantPlan, cancel: threading.Event | None = None
    ) -> Comparison:
        """What the one prompt shows of ``plan`` before the pooled CKA context is run: the
        comparison itself when cached, else the views of the prompt alone -- logit lens,
        attention, FFN and residual, equal to the full comparison's (they pool the prompt
        only) -- with the CKA map pending (``PendingMap``, NaN), no verdict and no isolation
        test (the verdict's evidence: the CKA diagonal and that test). Its forwards and lens
        are cached in the Lab, so ``compare`` then adds only the isolation test, the context's
        forward and the CKA."""
        full = self.peek(self.compare_key(prompt, target, plan))
        if full is not None:
            return full
        lab = self.lab

        def compute() -> Comparison:
            cmp = call_with_cancel(lab.compare, prompt, target=target, plan=plan, cka_context=0,
                                   isolation=False, cancel=cancel)  # fmt: skip
            return dataclasses.replace(
                cmp, cka=PendingMap.like(cmp.cka, 1 + CKA_CONTEXT), verdict=None
            )

        return self._cached(("first look", prompt, target, plan), compute)

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

    # the budget plan (issue 17): prescription and the uniform plan of the same budget --------
    def prescribe(self, budget: float, method: str, group_size, cancel=None, progress=None):
        """``lab.prescribe`` for the dashboard (no baselines, no greedy search, no check): the
        per-layer sensitivity of (method, group size) is measured once and reused by every
        later budget, so only the first call spends the ~L x 4 forward passes
        (``progress(done, total)`` after each of them); each budget then measures its starting
        plans whole and tries ``REFINE_PASSES`` moves (seconds, not the default 64)."""
        lab = self.lab

        def compute():
            sens = self.peek(("sensitivity", method, group_size))
            kw = {"sensitivity": sens} if sens is not None else {}
            pres = lab.prescribe(
                float(budget), methods=(method,), group_size=group_size, cancel=cancel,
                progress=progress, baselines=False, greedy=False, check=False,
                refine_passes=REFINE_PASSES, **kw,
            )  # fmt: skip
            self._cached(("sensitivity", method, group_size), lambda: pres.sensitivity)
            return pres

        return self._cached(("prescribe", float(budget), method, group_size), compute)

    def prefetch(
        self,
        plans: list[QuantPlan],
        cancel: threading.Event | None = None,
        prompt: str | None = None,
        target: str | None = None,
        delay: float = 0.0,
    ) -> threading.Thread:
        """Materialize ``plans`` in the background (``Lab.prefetch``: within the engine's
        budget, never evicting the plan in use), and with ``prompt`` and ``target`` also their
        whole comparison into this cache, each plan's right after its weights; the started
        thread. A set ``cancel`` stops it before its next forward pass; ``delay``: seconds of
        idle pause first."""
        then = None
        if prompt is not None:
            then = lambda plan: self.compare(prompt, target, plan, cancel=cancel)  # noqa: E731
        return self.lab.prefetch(plans, cancel=cancel, then=then, delay=delay)

    def uniform_within(self, budget: float, method: str, group_size) -> tuple | None:
        """(plan, decoder bits/weight) of the uniform plan of ``method`` with the most bits
        per weight within ``budget`` (bits 2..8, the dashboard's group sizes; the footprint
        counts decoder Linears as prescribe does); None when none fits."""

        def compute():
            groups = [group_size, 32, 64, 128, None]
            return self.lab.uniform_within(budget, method=method, group_sizes=groups)

        return self._cached(("uniform", float(budget), method, group_size), compute)


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
