"""SIGTERM (``kill``, a service or a scheduler stopping) handled as Ctrl+C is, by the commands that clean up on
Ctrl+C: inspect writes its pending rows, export removes its temporary files, search marks and re-queues the
running trial. Killed silently, they left a report's temporary file, a 14 MB fp32 graph in /tmp, a trial
RUNNING for ever."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

_pending = threading.Event()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt again if a SIGTERM came: a signal handler's exception raised inside a garbage
    collector's callback is printed and dropped ("Exception ignored in ..."), and the run went on to the end;
    long loops call this at their safe points (a training batch, a finished trial)."""
    if _pending.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def terminate_as_interrupt(deferred: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (elsewhere the block changes
    nothing: only the main thread may set a handler); the previous handler is back afterwards. ``deferred``:
    only at the next :func:`check_interrupt`, for loops that write a database (an exception raised in the
    middle of an SQLite commit was a traceback of its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        _pending.set()
        if not deferred:
            raise KeyboardInterrupt

    def unraisable(
        record: Any,
    ) -> None:  # the dropped interrupt is raised again by check_interrupt: no traceback
        if not (_pending.is_set() and isinstance(record.exc_value, KeyboardInterrupt)):
            hook(record)

    previous, hook = signal.signal(signal.SIGTERM, interrupt), sys.unraisablehook
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = hook
        _pending.clear()
