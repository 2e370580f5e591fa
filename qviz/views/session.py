"""One session's work: the shared Backend, the superseding Worker and the Controller.

Sessions share one :class:`Backend` per Lab but never state. Slow work runs on
:class:`Worker` threads with a ``threading.Event`` per job: a newer
request, a return to a cached setting, the Cancel button or a closed session sets it, and the
work stops at its next step (``qviz.cancel.Cancelled``). Results reach the page on the UI thread
(the bokeh document's next tick under ``panel serve``); the last result stays shown, marked
stale, until the new one is ready; errors appear as a message in the app.

The Backend and the cache layers: :mod:`qviz.views.backend`. Views see only the Lab's methods
and result objects (``compare``, ``trace``, ``prepare``, ``memory_table``), never its model,
engine or the bundled data.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import panel as pn

from qviz.cancel import Cancelled
from qviz.quant.config import QuantConfig, QuantPlan
from qviz.views.backend import (  # noqa: F401 (re-exported)
    CKA_CONTEXT,
    N_FACTS,
    PARETO_BITS,
    Backend,
    backend_for,
    call_with_cancel,
    is_first_look,
    needs_calibration,
    plan_for,
)
from qviz.views.state import DashboardState

log = logging.getLogger(__name__)
PREFETCH_PAUSE_S = 0.3  # idle time after a result before the neighbours are prefetched


class Worker:
    """Runs one kind of slow job off the UI thread; a newer request supersedes older ones.

    ``submit(job)`` queues ``job`` (a no-argument callable); at most one runs at a time and only
    the latest queued job runs next. ``deliver(result, error, token)`` is called with the outcome
    of the most recent request only (stale outcomes are dropped), through ``dispatch``, which
    moves the call onto the UI thread (e.g. a bokeh document's ``add_next_tick_callback``).
    """

    def __init__(
        self,
        deliver: Callable[[object, BaseException | None, int], None],
        dispatch: Callable[[Callable[[], None]], None],
        name: str = "qviz-worker",
    ) -> None:
        self._deliver = deliver
        self._dispatch = dispatch
        self._name = name
        self._lock = threading.Lock()
        self._pending: tuple[int, Callable[[], object]] | None = None
        self._running = False
        self._token = 0
        self._idle = threading.Event()
        self._idle.set()

    @property
    def token(self) -> int:
        """The id of the latest request."""
        return self._token

    def submit(self, job: Callable[[], object]) -> int:
        with self._lock:
            self._token += 1
            token = self._token
            self._pending = (token, job)
            self._idle.clear()
            if self._running:
                return token
            self._running = True
        threading.Thread(target=self._loop, name=self._name, daemon=True).start()
        return token

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running (for tests and scripts)."""
        return self._idle.wait(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._pending is None:
                    self._running = False
                    self._idle.set()
                    return
                token, job = self._pending
                self._pending = None
            result, error = None, None
            try:
                result = job()
            except Exception as err:  # shown in the app, never only logged
                error = err
            with self._lock:
                latest = token == self._token
            if latest:
                try:
                    self._dispatch(lambda r=result, e=error, t=token: self._deliver(r, e, t))
                except Exception:  # nowhere to deliver (a closed session): keep the loop alive
                    pass


def is_notebook_comm() -> bool:
    """True inside a Jupyter kernel (notebook or Voila), where raw bokeh changes need a push."""
    import sys

    return "ipykernel" in sys.modules and not (pn.state.curdoc and pn.state.curdoc.session_context)


def in_kernel() -> bool:
    """True inside a running Jupyter kernel (a notebook, JupyterLab or Voila)."""
    import sys

    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def server_doc():
    """This session's bokeh document under a Panel server, else None (notebook, scripts)."""
    doc = pn.state.curdoc
    return doc if doc is not None and doc.session_context is not None else None


def ui_call(doc, fn: Callable[[], None]) -> None:
    """Run ``fn`` (which edits raw bokeh models) where that is safe.

    Under a server the edit must hold the document lock, which widget callbacks do not:
    schedule it on the document's next tick (thread-safe, keeps order). Elsewhere run it now.
    """
    if doc is None:
        fn()
        return
    try:
        doc.add_next_tick_callback(fn)
    except Exception:  # the session is gone: nothing to update
        pass


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
        if done == 0:  # the method started: no rate yet (calibrated ones capture inputs first)
            self.t0 = now
            self.report(f"preparing {self.label}: capturing calibration inputs ...")
            return
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

    def __init__(
        self,
        backend: Backend,
        state: DashboardState,
        dispatch=None,
        prefetch_results: bool | None = None,
    ) -> None:
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
        self._budget_key = None
        self._prefetch_stop = threading.Event()
        self.prefetching: threading.Thread | None = None  # the last prefetch (tests join it)
        self._last_bits: int | None = None  # of the last result shown: the slider's direction
        # whole results prefetched, not only weights; not in a Jupyter kernel, where results
        # reach the figures on the worker thread: a prefetched (instant) result would race the
        # kernel's handling of the next widget message (bokeh documents are not thread-safe)
        kernel_front = in_kernel() and server_doc() is None
        if prefetch_results is None:
            prefetch_results = not kernel_front
        self.prefetch_results = prefetch_results
        # two-step paint (the prompt's views, then the pooled CKA) where results reach the
        # figures through the server's loop; a kernel front gets whole results, as the same
        # race (two updates of one move from the worker thread) made Voila's test flaky
        self.first_looks = not kernel_front
        settings = [*DashboardState.SETTINGS, *DashboardState.SETTINGS2]
        state.param.watch(self.request_compare, settings)
        state.param.watch(
            self.request_pareto, ["group_size", "symmetric", "method", "protect_first"]
        )

    def start(self) -> None:
        """The first results. No first look here: a page that is still being sent (Voila sends
        the widgets' state as it was when the cell ran) would miss the figures' first ranges
        and titles, which the whole result then leaves as they are."""
        self.request_pareto()
        self.request_compare(first_look=False)

    # cancellation ---------------------------------------------------------------------------
    def _fresh_cancel(self, kind: str) -> threading.Event:
        """Cancel ``kind``'s running job (it stops at its next step) and return a new event."""
        self._cancel[kind].set()
        ev = self._cancel[kind] = threading.Event()
        return ev

    def cancel(self, *_events) -> None:
        """The Cancel button: every running job stops at its next step; results stay shown."""
        self._prefetch_stop.set()
        for kind in self.KINDS:
            self._cancel[kind].set()

    def close(self, *_args) -> None:
        """The session is gone: cancel everything, ignore later requests and let go of the Lab
        (the server's session-destroyed callback keeps a closed controller alive; its Lab must
        be free to go, e.g. when the served app's registry drops that model)."""
        self._closed = True
        self.cancel()
        self.lab = None

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
        """The state's plan, checked against the model at once (errors show before any work)."""
        try:
            plan = self.state.plan()
            self.lab.check(plan)
            return plan
        except (ValueError, ImportError) as err:
            self.state.error = str(err)
            return None

    # compare --------------------------------------------------------------------------------
    def request_compare(self, *_events, first_look: bool = True) -> None:
        """Compare the current settings (instant when cached), and the second plan beside it
        when there is one; supersedes older requests. A plan not cached shows its
        ``first_look`` first (the prompt's views), then the whole result. The budget plan:
        ``_request_budget``."""
        s = self.state
        if self._closed:
            return
        if s.budget_on:
            return self._request_budget()
        self._budget_key = None
        plan = self._plan()
        if plan is None:
            return
        try:
            plan2 = s.plan2()
            if plan2 is not None:
                self.lab.check(plan2)
        except (ValueError, ImportError) as err:
            s.error = str(err)
            return
        prompt, target = s.prompt, s.target
        asked, asked2 = (plan.label, prompt, target), s.asked2()
        cancel = self._fresh_cancel("compare")  # a newer request or a cached setting: stop
        self._prefetch_stop.set()  # the user moved: the slider's own plan goes first
        plans = [p for p in (plan, plan2) if p is not None]
        cached = [self.backend.peek(Backend.compare_key(prompt, target, p)) for p in plans]

        def result(c1, c2=None) -> dict:
            shown2 = asked2 if c2 is not None else None
            return {"comparison": c1, "shown": asked, "comparison2": c2, "shown2": shown2,
                    "budget_result": None}  # fmt: skip

        if all(c is not None for c in cached):  # no model work, but through the worker too
            self._workers["compare"].submit(lambda: result(*cached))
            return
        first = plans[0] if cached[0] is None else plans[1]
        say = self._start("compare", self._first_status(first))

        def work():  # progressive: what the prompt alone shows first, then the pooled CKA
            look = first_look and self.first_looks
            looks = [self._compare_one(p, prompt, target, cancel, say, look) for p in plans]
            pending = [c.plan_label for c in looks if is_first_look(c)]
            if not pending:
                return result(*looks)
            self._post_first_look(say, result(*looks), pending)
            full = self.backend.compare  # the plans are prepared: the CKA context's forward
            return result(
                *[
                    full(prompt, target, p, cancel=cancel) if is_first_look(c) else c
                    for p, c in zip(plans, looks, strict=True)
                ]
            )

        say.token = self._workers["compare"].submit(work)

    def _post_first_look(self, say, result: dict, pending: list[str]) -> None:
        """Show a first look from the worker thread (on the UI thread), while its request is
        still the newest; busy stays on and the status names the part still computing."""
        status = (
            f"{' and '.join(pending)}: prompt views shown; CKA map and verdict computing "
            f"over {1 + CKA_CONTEXT} prompts ..."
        )

        def show() -> None:
            if not self._closed and self._workers["compare"].token == say.token:
                self._show(result, status, busy=True)

        try:  # as with a Worker's delivery: a failure to show it never stops the work
            self._dispatch(show)
        except Exception:  # noqa: BLE001 - e.g. a front's push failing off its thread
            log.warning("qviz: a first look could not be shown", exc_info=True)

    def _start(self, kind: str, status: str):
        """Busy with ``status``; returns ``say(msg)`` reporting while ``say.token`` is newest."""
        self._set_busy(kind, True, status)

        def say(msg: str) -> None:  # the token is known once submit returns
            self._report(kind, say.token, msg)

        say.token = None
        return say

    @staticmethod
    def _first_status(plan) -> str:
        if any(needs_calibration(c.method) for c in _configs(plan)):
            return f"preparing {plan.label}: capturing calibration inputs ..."
        return f"computing {plan.label} ..."

    def _compare_one(self, plan, prompt: str, target: str, cancel, say, first_look=False):
        """Prepare ``plan`` (progress per layer) and compare it with full precision; with
        ``first_look``, only what the prompt alone shows of it (``Backend.first_look``). The
        whole comparison when it is cached."""
        cached = self.backend.peek(Backend.compare_key(prompt, target, plan))
        if cached is not None:
            return cached
        say(self._first_status(plan))
        self.lab.prepare(plan, cancel=cancel, on_progress=Progress(plan.label, say))
        if first_look:
            say(f"comparing {plan.label} with full precision on the prompt ...")
            return self.backend.first_look(prompt, target, plan, cancel=cancel)
        say(f"comparing {plan.label} with full precision ...")
        return self.backend.compare(prompt, target, plan, cancel=cancel)

    def _request_budget(self) -> None:
        """The budget plan: prescribe (slow the first time: ~L x 4 forward passes, with
        progress), then compare it and the uniform plan of the same budget, side by side."""
        s = self.state
        budget, method, group = float(s.budget), s.method, s.group_size
        prompt, target = s.prompt, s.target
        key = (budget, method, group, prompt, target)
        if key == self._budget_key and self._busy["compare"]:
            return  # already under way (a setting the budget plan does not use changed)
        self._budget_key = key
        asked, asked2 = s.asked(), s.asked2()
        cancel = self._fresh_cancel("compare")
        say = self._start("compare", f"prescribing {budget:g} bits/weight ...")
        t0 = time.monotonic()

        def step(done: int, total: int) -> None:  # prescribe's progress: sensitivity variants
            if 0 < done < total:
                eta = (time.monotonic() - t0) / done * (total - done)
                say(f"prescribing {budget:g} bits/weight: sensitivity {done}/{total}, "
                    f"ETA {mmss(eta)} ...")  # fmt: skip

        def work():
            pres = self.backend.prescribe(budget, method, group, cancel=cancel, progress=step)
            uni = self.backend.uniform_within(budget, method, group)
            c1 = self._compare_one(pres.plan, prompt, target, cancel, say)
            c2 = None if uni is None else self._compare_one(uni[0], prompt, target, cancel, say)
            uniform = (uni[0].label, uni[1]) if uni else ("none", 0.0)
            return {"comparison": c1, "shown": asked, "comparison2": c2, "shown2": asked2,
                    "budget_result": (pres, *uniform)}  # fmt: skip

        say.token = self._workers["compare"].submit(work)

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
        shown = " beside ".join(
            c.plan_label for c in (result["comparison"], result["comparison2"]) if c is not None
        )
        self._show(result, f"showing {shown}", busy=False)
        self._prefetch_neighbours()

    def _show(self, result: dict, status: str, busy: bool) -> None:
        """Put a compare result (or a first look) into the state, on the UI thread."""
        s = self.state
        updates = {**result, "error": ""}
        n = len(result["comparison"].ffn.flip_rate)
        if s.selected_layer is None or s.selected_layer >= n:
            updates["selected_layer"] = n // 2
        s.param.update(**updates)
        self._set_busy("compare", busy, status)

    def _prefetch_neighbours(self) -> None:
        """While idle, compute the bit-widths next to the one shown, one after the other: the
        weights (within the engine's budget, never evicting the plan in use) then the whole
        comparison of the prompt shown, so a slider step there shows at once. It starts after
        ``PREFETCH_PAUSE_S`` of idle time (quick moves and the page's own updates go first) and
        stops before its next forward pass at the next request, the Cancel button or a closed
        session. The neighbour in the direction of the last move goes first. Round-to-nearest
        only: its weights cost tens of ms a plan (HQQ or GGUF encoding would hold the engine
        for seconds). ``QVIZ_PREFETCH=0``: off; ``=weights`` (and in a Jupyter kernel, see
        ``prefetch_results``): the weights only."""
        s = self.state
        mode = os.environ.get("QVIZ_PREFETCH", "1")
        if self._closed or s.budget_on or s.method != "rtn" or mode == "0":
            return
        self._prefetch_stop = threading.Event()
        bits, last = int(s.bits), self._last_bits
        self._last_bits = bits
        order = (bits + 1, bits - 1) if last is not None and last < bits else (bits - 1, bits + 1)
        plans = [plan_for(s, b) for b in order if 2 <= b <= 8]
        whole = {"prompt": s.prompt, "target": s.target}
        if mode == "weights" or not self.prefetch_results:
            whole = {}
        try:
            self.prefetching = self.backend.prefetch(
                plans, cancel=self._prefetch_stop, delay=PREFETCH_PAUSE_S, **whole
            )
        except (ValueError, ImportError):  # a plan the model cannot take: nothing to prefetch
            pass

    # tracing --------------------------------------------------------------------------------
    def request_trace(self, *_events) -> None:
        """Run the causal-tracing sweep of the current settings (the budget plan: the
        prescribed plan shown) in the background."""
        s = self.state
        if self._closed:
            return
        plan = s.budget_result[0].plan if s.budget_on and s.budget_result else self._plan()
        if plan is None:
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

    def wait(self, timeout: float | None = 60, prefetch: bool = True) -> bool:
        """Block until queued work is done, the idle prefetch too unless ``prefetch`` is
        False (scripts and tests; never call it in a callback)."""
        ok = True
        for w in self._workers.values():
            ok = w.wait(timeout) and ok
        if prefetch and self.prefetching is not None:
            self.prefetching.join(timeout)
            ok = ok and not self.prefetching.is_alive()
        return ok


def _configs(plan: QuantPlan) -> list[QuantConfig]:
    return [c for c in (plan.default, *(c for _, c in plan.overrides)) if c is not None]


def _label(state: DashboardState) -> str:
    return state.shown[0] if state.shown else "nothing yet"
