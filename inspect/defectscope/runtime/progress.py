"""A tiny single-line progress display for terminals (no tqdm on line PCs).

The number of inputs is not known up front (inputs are streamed), so it shows counts and rate
rather than a percentage.  When stderr is not a terminal it stays silent: logs get a summary.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_SPIN = "|/-\\"


class Progress:
    def __init__(
        self, stream: TextIO | None = None, enabled: bool | None = None, interval: float = 0.1
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.start = time.monotonic()
        self._last = 0.0
        self._ticks = 0
        self._width = 0
        self._state: tuple[int, int, int, int] | None = None

    def update(self, done: int, ok: int, ng: int, errors: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        self._state = (done, ok, ng, errors)
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self._ticks += 1
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"{_SPIN[self._ticks % 4]} {done} images  OK {ok}  NG {ng}  errors {errors}  "
            f"{done / elapsed:.1f} img/s  {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}"
        )
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """Show the final counts (updates are rate-limited) and end the line."""
        if self.enabled and self._state is not None:
            self.update(*self._state, force=True)
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()
