"""`defectscope watch` that SIGKILLs itself at a chosen crash point (the tests' fault injection).

    python tests/watch_crash.py POINT:BATCH WATCH-ARGS...

POINT is ``after_commit`` or ``mid_move`` (see Watcher._process); the hook is handed to
:func:`defectscope.runtime.watch.main` directly, so production code reads no environment for it.
"""

from __future__ import annotations

import os
import signal
import sys

from defectscope.runtime.watch import main


def crash_at(spec: str):  # type: ignore[no-untyped-def]
    point, _, batch = spec.partition(":")

    def hook(at: str, n: int) -> None:
        if (at, n) == (point, int(batch or 1)):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[2:], on_event=crash_at(sys.argv[1])))
