"""Several models in one served process: the Lab registry and the page's model selector.

``LabRegistry`` keeps at most ``max_resident`` Labs (``qviz serve``: ``QVIZ_SERVE_MODELS``,
default 2), one per model name, shared by every session that picks that model. A load runs on
its own thread, so sessions on other models keep working. Sessions ``acquire`` the model they
show and ``release`` it when they switch or close; when a new model needs a place, the least
recently used model no session uses is dropped, and when every place is in use the request is
refused with a message (never a silent overcommit of memory).

``ModelPage`` is one session's part of the served page: the model selector, the loading
progress and the Dashboard of the chosen model. Switching builds a fresh Dashboard on the new
model's Lab from the old settings (bits, group size, method, prompt, ...; the selected layer
clamped to the new depth), so another model's result is never shown as current. A notebook's
``Dashboard(lab)`` has no selector: the user chose the Lab.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import panel as pn

from qviz.views.dashboard import Dashboard, backend_for, server_doc
from qviz.views.state import DashboardState

LOADING, READY, FAILED = "loading", "ready", "error"


class RegistryFull(RuntimeError):
    """Every resident place is held by a model some session uses: nothing can be dropped."""


@dataclass
class Entry:
    """One model's place in the registry: its state, Lab or error, users and last use."""

    name: str
    status: str = LOADING
    lab: object | None = None
    error: str = ""
    started: float = 0.0
    seconds: float = 0.0  # load time once ready
    users: set = field(default_factory=set)
    last_used: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class LabRegistry:
    """Labs by model name, loaded once on a background thread, at most ``max_resident`` kept.

    ``loader(name) -> Lab`` does the loading (``Lab.load`` plus the server's limits in
    ``qviz serve``). Thread-safe; the loader runs outside the lock, so loads of different
    models, and sessions on loaded ones, never wait for each other.
    """

    def __init__(
        self,
        loader: Callable[[str], object],
        max_resident: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if int(max_resident) < 1:
            raise ValueError(f"max_resident must be >= 1 (QVIZ_SERVE_MODELS), got {max_resident}")
        self._loader = loader
        self.max_resident = int(max_resident)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self.dropped: list[str] = []  # names dropped to make room, oldest first (for the log)

    # inspection -----------------------------------------------------------------------------
    def entry(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def resident(self) -> list[str]:
        """Names loaded or loading, least recently used first."""
        with self._lock:
            live = [e for e in self._entries.values() if e.status != FAILED]
            return [e.name for e in sorted(live, key=lambda e: e.last_used)]

    def users(self, name: str) -> int:
        with self._lock:
            e = self._entries.get(name)
            return len(e.users) if e else 0

    # loading --------------------------------------------------------------------------------
    def request(self, name: str, owner: Hashable | None = None) -> Entry:
        """The entry of ``name``, its load started on a thread when absent (or failed before).

        ``owner`` (a session) becomes one of its users at once, so the model is not dropped
        while it loads. Raises RegistryFull (nothing started) when every place is in use.
        """
        with self._lock:
            e = self._entries.get(name)
            now = self._clock()
            if e is None or e.status == FAILED:
                self._make_room(name)
                e = self._entries[name] = Entry(name, started=now)
                threading.Thread(
                    target=self._load, args=(e,), name=f"qviz-load-{name}", daemon=True
                ).start()
            e.last_used = now
            if owner is not None:
                e.users.add(owner)
            return e

    def get(self, name: str, owner: Hashable | None = None, timeout: float | None = None):
        """The Lab of ``name``, waiting for its load (raises RuntimeError when it failed)."""
        e = self.request(name, owner)
        if not e.done.wait(timeout):
            raise TimeoutError(f"model {name!r} still loading after {timeout} s")
        if e.status == FAILED:
            raise RuntimeError(f"could not load model {name!r}: {e.error}")
        return e.lab

    def _load(self, e: Entry) -> None:
        try:
            lab = self._loader(e.name)
        except Exception as err:  # shown in the page, never only logged
            with self._lock:
                e.status, e.error = FAILED, f"{type(err).__name__}: {err}"
                e.users.clear()
        else:
            with self._lock:
                e.lab, e.status = lab, READY
                e.seconds = self._clock() - e.started
        e.done.set()

    def _make_room(self, name: str) -> None:
        """Drop least recently used unused models until ``name`` fits (lock held)."""
        live = [e for e in self._entries.values() if e.status != FAILED]
        while len(live) >= self.max_resident:
            idle = [e for e in live if not e.users and e.status == READY]
            if not idle:
                busy = ", ".join(f"{e.name} ({len(e.users)} sessions)" for e in live)
                raise RegistryFull(
                    f"cannot load {name!r}: {self.max_resident} models are resident and in use "
                    f"({busy}); pick one of those, close a session, or serve with a larger "
                    "QVIZ_SERVE_MODELS"
                )
            victim = min(idle, key=lambda e: e.last_used)
            del self._entries[victim.name]
            victim.lab = None  # sessions still showing it hold their own reference
            self.dropped.append(victim.name)
            live.remove(victim)

    # users ----------------------------------------------------------------------------------
    def release(self, name: str, owner: Hashable) -> None:
        """``owner`` no longer shows ``name`` (it may be dropped when a place is needed)."""
        with self._lock:
            e = self._entries.get(name)
            if e is not None and owner in e.users:
                e.users.discard(owner)
                e.last_used = self._clock()


# the page -------------------------------------------------------------------------------------
CARRIED = (*DashboardState.SETTINGS, *DashboardState.SETTINGS2, "component", "selected_layer")


def carried_settings(settings: dict, n_layers: int) -> dict:
    """The settings a switch keeps: every control, the selected layer clamped to ``n_layers``."""
    kept = {k: settings[k] for k in CARRIED if k in settings}
    if kept.get("selected_layer") is not None:
        kept["selected_layer"] = max(0, min(int(kept["selected_layer"]), n_layers - 1))
    return kept


class ModelPage(pn.viewable.Viewer):
    """One session's model selector, loading progress and Dashboard (``qviz serve``).

    ``background``: load on the registry's thread and poll from the session's event loop (under
    a server, the default there); else wait for the load in ``switch`` (scripts, tests). Tests
    call ``poll()`` to advance a background switch without a server. ``settings``: the first
    Dashboard's DashboardState values (later ones carry the previous Dashboard's).
    """

    def __init__(
        self,
        registry: LabRegistry,
        model: str,
        choices: list[str] | None = None,
        background: bool | None = None,
        settings: dict | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.model: str | None = None  # the model whose Dashboard is shown (None while loading)
        self.wanted = model
        self.dashboard: Dashboard | None = None
        self._settings: dict = dict(settings or {})  # the first Dashboard's settings
        self._closed = False
        self._doc = server_doc()
        self.background = self._doc is not None if background is None else background
        choices = list(dict.fromkeys([*(choices or []), model]))
        self.select = pn.widgets.Select(
            name="Model", options=choices, value=model, width=220, css_classes=["qviz-model"]
        )
        self.title = pn.pane.Markdown(self._title(model), margin=(5, 10))
        self.progress = pn.indicators.Progress(
            active=True, visible=False, width=200, css_classes=["qviz-model-busy"]
        )
        self.message = pn.pane.HTML("", css_classes=["qviz-model-status"], width=520)
        self.header = pn.Row(self.title, self.select, self.progress, self.message)
        self.body = pn.Column(sizing_mode="stretch_width")
        self._poller = None
        self.select.param.watch(lambda e: self.switch(e.new), "value")
        if self._doc is not None:
            pn.state.on_session_destroyed(self.close)
        self.switch(model, force=True)

    @staticmethod
    def _title(model: str) -> str:
        return f"## qviz: how weight quantization breaks {model}"

    # switching ------------------------------------------------------------------------------
    def switch(self, model: str, force: bool = False) -> None:
        """Show ``model``: drop the current Dashboard (its work cancelled), load, rebuild."""
        if self._closed or (model == self.wanted and not force):
            return
        if self.dashboard is not None:
            self._settings = {k: getattr(self.dashboard.state, k) for k in CARRIED}
            self.dashboard.controller.close()  # cancels its work and lets go of its Lab
        for name in {self.model, self.wanted} - {None}:  # shown, or still loading for us
            self.registry.release(name, self)
        self.dashboard, self.model, self.wanted = None, None, model
        self.title.object = self._title(model)
        if self.select.value != model:
            self.select.value = model
        try:
            entry = self.registry.request(model, self)
        except RegistryFull as err:
            self._show_error(str(err))
            return
        self.body[:] = [pn.pane.Str(f"Loading {model} ...", css_classes=["qviz-loading"])]
        if not self.background:
            entry.done.wait()
        if not self.poll() and self._doc is not None and self._poller is None:
            self._poller = pn.state.add_periodic_callback(self.poll, period=250)

    def poll(self) -> bool:
        """Put the Dashboard in once the wanted model is loaded (or the error); True when done."""
        if self._closed:
            return True
        model = self.wanted
        entry = self.registry.entry(model)
        if entry is None or self.model == model:
            done = True
        elif entry.status == READY and entry.lab is not None:
            self._show(model, entry.lab, entry.seconds)
            done = True
        elif entry.status == FAILED:
            self._show_error(f"Could not load model {model!r}: {entry.error}")
            done = True
        else:
            self._show_progress(entry)
            done = False
        if done and self._poller is not None:
            self._poller.stop()
            self._poller = None
        return done

    def _show(self, model: str, lab, seconds: float) -> None:
        n_layers = backend_for(lab).n_layers
        state = DashboardState(model=model, **carried_settings(self._settings, n_layers))
        note = ""
        try:
            lab.check(state.plan())
        except (ValueError, ImportError) as err:  # e.g. a method this model cannot take
            note = f"; {state.method} does not apply ({err}): back to rtn"
            state.method = "rtn"
        self.dashboard = Dashboard(lab, state=state)
        self.model = model
        self.body[:] = [self.dashboard]
        self.progress.visible = False
        self.message.object = _note(f"{model}: {n_layers} layers, loaded in {seconds:.0f} s{note}")

    def _show_progress(self, entry: Entry) -> None:
        elapsed = max(0.0, time.monotonic() - entry.started) if entry.started else 0.0
        self.progress.visible = True
        self.message.object = _note(
            f"loading {entry.name} ... {elapsed:.0f} s (other sessions keep working)"
        )

    def _show_error(self, msg: str) -> None:
        self.progress.visible = False
        self.message.object = ""
        self.body[:] = [
            pn.pane.Alert(msg, alert_type="danger", css_classes=["qviz-error", "qviz-model-error"])
        ]

    def close(self, *_args) -> None:
        """The session is gone: cancel its work and release its model."""
        self._closed = True
        if self.dashboard is not None:
            self.dashboard.controller.close()
        for name in {self.model, self.wanted} - {None}:
            self.registry.release(name, self)
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

    def __panel__(self):
        return self.body


def _note(msg: str) -> str:
    return f'<code class="qviz-model-status-text">{html.escape(msg)}</code>'
