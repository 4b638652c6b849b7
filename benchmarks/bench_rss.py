"""Peak RSS of a child command that the caller's own memory cannot inflate.

``wait4`` on a child started directly from a big process reports at least the *parent's* peak RSS:
on ``exec`` Linux folds the high-water mark of the memory the child had before (the parent's,
shared through vfork or copied by fork) into the child's ``ru_maxrss``.  A benchmark process holding
PyTorch and decoded images would therefore read its own size instead of `defectscope inspect`'s.
So the command is started by a minimal launcher (``python -I -S``, a few MiB) that forks, execs and
``wait4``s it, and reports the result through a small JSON file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

_LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - t0
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
with open(out, "w") as f:
    json.dump({"exit_code": os.waitstatus_to_exitcode(status), "seconds": seconds,
               "peak_rss_bytes": usage.ru_maxrss * scale}, f)
"""


def run_measured(
    cmd: list[str],
    stdout: IO[Any] | int | None,
    stderr: IO[Any] | int | None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` (in ``env``, default ours); returns exit_code, seconds (fork to exit) and peak_rss_mib."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        result = Path(tmp) / "rss.json"
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result), *cmd]
        subprocess.run(launcher, stdout=stdout, stderr=stderr, env=env, check=False)
        if not result.is_file():
            raise RuntimeError(f"the RSS launcher failed to run {cmd[:3]}...")
        data = json.loads(result.read_text(encoding="utf-8"))
    return {
        "exit_code": int(data["exit_code"]),
        "seconds": float(data["seconds"]),
        "peak_rss_mib": round(data["peak_rss_bytes"] / 2**20, 1),
    }
