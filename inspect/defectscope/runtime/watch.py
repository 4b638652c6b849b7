"""`defectscope watch MODEL --in HOT --out OUT`: the command line of the hot-folder watcher.

Options shared with `inspect` come from :mod:`.options`; the watcher itself, its commit protocol
and its crash recovery are in :mod:`.watcher`.  Exit status: 0 stopped by SIGTERM/SIGINT (the batch
in flight is finished; 130 when Ctrl+C comes while the model loads), 1 results could not be written (disk full: every row before is intact,
unrecorded files stay in the hot folder; restart once fixed), 2 configuration error (model,
folders, options), which a service manager must not restart (deploy/defectscope-watch.service:
``RestartPreventExitStatus=2``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .files import error_line
from .hotfolder import log
from .inspector import Inspector, MetadataError, ModelLoadError, ProviderError, check_model_path
from .options import CommandParser, add_shared_options, run_options
from .outputs import RESULTS_JSONL, OutputError, check_name, check_output_file, check_output_folder
from .results import ResultsFileError
from .watcher import FOLDERS, RESULTS_NAME, EventHook, WatchConfig, Watcher

PROG = "defectscope watch"
#: an hour between polls, a day of waiting for a paused writer: beyond that a value is a typo
MAX_INTERVAL_S, MAX_GRACE_S = 3600.0, 86400.0


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Watch a hot folder: inspect each completely written file once, append its row to "
        "OUT/results.jsonl and move it to OUT/OK, OUT/NG or OUT/error.",
        epilog="Exit status: 0 stopped by SIGTERM/SIGINT, 1 results could not be written (restart once "
        "fixed), 2 configuration error (do not restart).",
    )
    add_shared_options(p)
    p.add_argument("--in", dest="hot", required=True, help="hot folder to watch (not recursive)")
    p.add_argument("--out", required=True, help="output folder: results.jsonl and OK/, NG/, error/")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    p.add_argument(
        "--stable-polls",
        type=int,
        default=2,
        help="a file is complete when size and mtime are unchanged over this many polls (default 2)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds a file that reads as incomplete (truncated, empty) is watched for more writes "
        "after its last change before it is moved to error/ (default 10)",
    )
    return p


def parse_config(p: argparse.ArgumentParser, argv: Sequence[str]) -> WatchConfig:
    """Parse and check the command line (``p.error`` exits 2 on a usage error)."""
    a = p.parse_args(list(argv))
    run = run_options(p, a)
    if not 0 < a.interval <= MAX_INTERVAL_S:  # also refuses nan (a busy loop) and inf (a traceback)
        p.error(f"--interval must be a number of seconds in (0, {MAX_INTERVAL_S:g}], got {a.interval}")
    if a.stable_polls < 1:
        p.error(f"--stable-polls must be >= 1, got {a.stable_polls}")
    if not 0 <= a.grace <= MAX_GRACE_S:  # nan would hold an empty file forever
        p.error(f"--grace must be a number of seconds in [0, {MAX_GRACE_S:g}], got {a.grace}")
    return WatchConfig(run, a.hot, a.out, a.interval, a.stable_polls, a.grace)


def check_folders(cfg: WatchConfig) -> None:
    """--in, --out (and its results file and folders) and --heatmaps, before the model is loaded
    and after the model argument is checked (a missing model is named first, as in `inspect`)."""
    # OutputError for --in too: main reports every folder mistake alike, one line and exit 2
    if not os.path.isdir(cfg.hot):
        raise OutputError(f"--in {cfg.hot!r} is not an existing folder")
    check_name(cfg.out, "--out")  # before resolve(), which raises for a loop of links
    if cfg.run.heatmaps:
        check_name(cfg.run.heatmaps, "--heatmaps")
    hot, out = Path(cfg.hot).resolve(), Path(cfg.out).resolve()
    if hot == out or hot in {out / f for f in FOLDERS.values()}:
        raise OutputError("--in must not be --out or one of its OK/NG/error folders")
    if cfg.run.heatmaps and Path(cfg.run.heatmaps).resolve() == hot:  # each overlay would be a new part
        raise OutputError("--heatmaps must not be --in: every heat map written there would be inspected")
    try:  # each inspected file is moved out of --in: a folder the service user cannot write files nothing
        check_output_folder(cfg.hot, "--in")
    except OutputError as exc:
        raise OutputError(
            f"{exc}; watch moves every inspected file out of --in into --out's OK/NG/error folders, so the user "
            "it runs as needs write access to --in"
        ) from None
    check_output_folder(cfg.out, "--out")
    check_output_file(Path(cfg.out) / RESULTS_NAME, "--out", special_ok=False, writes=RESULTS_JSONL)
    for sub in FOLDERS.values():
        check_output_folder(Path(cfg.out) / sub, "--out")
    if cfg.run.heatmaps:
        check_output_folder(cfg.run.heatmaps, "--heatmaps")


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        if not stop.is_set():
            log(f"watch: {signal.Signals(signum).name} received; finishing the batch in flight")
        stop.set()

    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None, *, on_event: EventHook | None = None) -> int:
    """``on_event`` is for tests only (crash points); the command line never sets it."""
    parser = build_parser()
    try:
        cfg = parse_config(parser, sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        check_model_path(cfg.run.session.model)
        check_folders(cfg)
        inspector = Inspector.from_config(cfg.run.session)
        watcher = Watcher(cfg, inspector, on_event)
    except (MetadataError, ModelLoadError, ProviderError, ResultsFileError, OutputError) as exc:
        print(error_line(PROG, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C while the model loads (a TensorRT engine build takes minutes)
        print(f"{PROG}: interrupted while starting; nothing was inspected or moved", file=sys.stderr)
        return 130
    _install_signals(watcher.stop)
    try:
        return watcher.run()
    except (OutputError, ResultsFileError) as exc:  # at start-up: the results file cannot be used
        print(error_line(PROG, exc), file=sys.stderr)
        return 2


__all__ = ["WatchConfig", "Watcher", "build_parser", "main"]
