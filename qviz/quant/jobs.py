"""A slow computation shared by every caller that asks for it, run once in a daemon thread.

The engine runs a calibrated method's plan as one ``SharedJob``: a second request for the same
plan joins the running job instead of computing it again. Each member gets the progress calls
(made in the worker thread, so blocking in one pauses the work), waits for the result, and leaves
as soon as its own ``cancel`` event is set. The work sees a ``cancel`` that reads set once no
member is left that still wants the result, and stops at its next step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from qviz.cancel import Cancelled

_POLL_S = 0.05  # how often a waiting member looks at its own cancel event


class _Abandoned:
    """Event-like: ``is_set()`` once every member has left or set its own cancel."""

    def __init__(self, job: SharedJob) -> None:
        self._job = job

    def is_set(self) -> bool:
        with self._job._cond:
            members = list(self._job._members.values())
        return all(c is not None and c.is_set() for c, _ in members)


class SharedJob:
    """``work(cancel, on_progress) -> result`` in a daemon thread, for its members.

    ``cancelled(last)`` builds the exception a leaving member raises (``last``: the latest
    (done, total) or None); ``on_abandon()`` is called once when the last member leaves early.
    """

    def __init__(
        self,
        work: Callable[[Any, Callable[[int, int], None]], Any],
        cancelled: Callable[[tuple[int, int] | None], Cancelled],
        on_abandon: Callable[[], None] = lambda: None,
        name: str = "qviz-job",
    ) -> None:
        self._work, self._cancelled, self._on_abandon = work, cancelled, on_abandon
        self._cond = threading.Condition()
        self._members: dict[int, tuple[threading.Event | None, Callable | None]] = {}
        self._next = 0
        self.cancel = _Abandoned(self)
        self.last: tuple[int, int] | None = None
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # worker -------------------------------------------------------------------------------------
    def start(self) -> SharedJob:
        self._thread.start()
        return self

    def _progress(self, done: int, total: int) -> None:
        with self._cond:
            self.last = (done, total)
            listeners = [cb for _, cb in self._members.values() if cb is not None]
            self._cond.notify_all()
        for cb in listeners:  # outside every lock: a listener may block (and so pause the work)
            cb(done, total)

    def _run(self) -> None:
        try:
            result, error = self._work(self.cancel, self._progress), None
        except BaseException as err:  # handed to the members, raised in their threads
            result, error = None, err
        with self._cond:
            self.result, self.error, self.finished = result, error, True
            self._cond.notify_all()

    # members ------------------------------------------------------------------------------------
    def join(
        self,
        cancel: threading.Event | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Become a member; a late joiner is told the latest progress at once."""
        with self._cond:
            token, self._next = self._next, self._next + 1
            self._members[token] = (cancel, on_progress)
            last = self.last
        if last is not None and on_progress is not None:
            on_progress(*last)
        return token

    def wait(self, token: int) -> Any:
        """The result (or the work's error), or the member's Cancelled once its event is set."""
        cancel = self._members[token][0]
        try:
            with self._cond:
                while not self.finished and not (cancel is not None and cancel.is_set()):
                    self._cond.wait(_POLL_S)
                if not self.finished:
                    raise self._cancelled(self.last)
            return self._outcome()
        finally:
            self._leave(token)

    def _outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result

    def _leave(self, token: int) -> None:
        with self._cond:
            self._members.pop(token, None)
            abandoned = not self.finished and not self._members
        if abandoned:
            self._on_abandon()
