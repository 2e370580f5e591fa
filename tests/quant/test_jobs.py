"""SharedJob: one run for every member, progress to each, stops once every member has left."""

from __future__ import annotations

import threading

import pytest

from qviz.cancel import Cancelled
from qviz.quant.jobs import SharedJob

JOIN_S = 60  # only to detect a deadlock


def _job(steps, gate, abandoned=None):
    """Work of ``steps`` steps that waits for ``gate`` before each step after the first."""

    def work(cancel, progress):
        for i in range(steps):
            if cancel.is_set():
                raise Cancelled(f"stopped before step {i}")
            progress(i, steps)
            if i:
                assert gate.wait(JOIN_S)
        return "done"

    on_abandon = abandoned.set if abandoned is not None else (lambda: None)
    return SharedJob(work, lambda last: Cancelled(f"left at {last}"), on_abandon)


def test_every_member_gets_the_one_result_and_the_progress():
    gate = threading.Event()
    job = _job(3, gate)
    seen_a, seen_b = [], []
    a = job.join(on_progress=lambda d, t: seen_a.append(d))
    job.start()
    b = job.join(on_progress=lambda d, t: seen_b.append(d))
    gate.set()
    assert job.wait(a) == "done" and job.wait(b) == "done"
    assert seen_a == [0, 1, 2] and seen_b[-1] == 2


def test_the_work_stops_only_when_every_member_left():
    gate, abandoned = threading.Event(), threading.Event()
    job = _job(4, gate, abandoned)
    c1, c2 = threading.Event(), threading.Event()
    m1, m2 = job.join(c1), job.join(c2)
    job.start()
    c1.set()
    with pytest.raises(Cancelled, match="left at"):
        job.wait(m1)
    assert not job.cancel.is_set() and not abandoned.is_set()  # m2 still wants it
    c2.set()
    with pytest.raises(Cancelled, match="left at"):
        job.wait(m2)
    assert job.cancel.is_set() and abandoned.is_set()
    gate.set()
    job._thread.join(JOIN_S)
    assert job.finished and isinstance(job.error, Cancelled)


def test_an_error_of_the_work_reaches_every_member():
    def work(cancel, progress):
        raise RuntimeError("boom")

    job = SharedJob(work, lambda last: Cancelled("left"))
    a, b = job.join(), job.join()
    job.start()
    for m in (a, b):
        with pytest.raises(RuntimeError, match="boom"):
            job.wait(m)
