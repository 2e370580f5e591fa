"""Cancellation shared by every slow job (GPTQ and other calibrated methods, tracing, accuracy).

A job takes ``cancel: threading.Event | None`` and calls ``check_cancel(cancel, where)`` at each
step; a set event raises :class:`Cancelled`, which the job lets through after leaving weights and
caches exactly as they were. Lowest floor: imported by quant, probes, studies and views alike.
"""

from __future__ import annotations

import threading


class Cancelled(RuntimeError):
    """A slow job stopped at its next step because its ``cancel`` event was set."""


def check_cancel(cancel: threading.Event | None, where: str) -> None:
    """Raise ``Cancelled`` naming ``where`` (e.g. "before decoder layer 3 of 30") if set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled {where}")
