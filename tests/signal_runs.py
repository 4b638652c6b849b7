"""Stopping a command at a chosen moment: a signal once a condition holds (a checkpoint written, a
generation half done), for the tests of what a killed or stopped run leaves behind."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def signal_when(
    proc: subprocess.Popen[str],
    ready: Callable[[], bool],
    what: str,
    timeout_s: float,
    sig: int = signal.SIGTERM,
) -> tuple[str | None, str | None]:
    """Send ``sig`` to ``proc`` once ``ready()`` holds (the test fails when ``proc`` ends first or ``what`` is
    not there within ``timeout_s``); returns its output once it has ended (killed if it outlives 120 s)."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
            time.sleep(0.01)
        proc.send_signal(sig)
        return proc.communicate(timeout=120)
    finally:
        proc.kill()


def partial_holds(parent: Path, pattern: str, pngs: int) -> Callable[[], bool]:
    """Whether a generation's ``.partial`` folder (``parent``/``pattern``) holds ``pngs`` images yet."""

    def ready() -> bool:
        partial = list(parent.glob(pattern))
        return bool(partial) and sum(1 for _ in partial[0].rglob("*.png")) >= pngs

    return ready
