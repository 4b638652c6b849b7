"""`defectscope inspect MODEL INPUT... -o results.jsonl`: batch inspection on a line PC.

Exactly-once contract: each input gets one JSONL row; rows are committed (one write + flush) batch
by batch and fsync'd at most every ``--fsync-interval`` seconds, so after a crash or ``kill -9`` a rerun with ``--resume`` truncates a torn last
line, skips every input that has a row and inspects the rest.  CSV and HTML report are rebuilt
from the JSONL at the end.  Every row records the threshold that decided it and where that came
from; ``--resume`` refuses a file of another model or threshold.  Exit codes: 0 all inputs
inspected, 1 some error rows, 2 bad command line, model, input or output (checked before the first
image; a disk filling up later stops the run with every row before intact), 130 interrupted (Ctrl+C or SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .files import error_line
from .grading import grading_text
from .heatmap import save_overlay
from .inputs import InputSpecError, check_specs, expand_inputs, overlapping_inputs
from .inspector import Inspector, MetadataError, ModelLoadError, ProviderError, check_model_path
from .interrupts import terminate_as_interrupt
from .options import CommandParser, RunOptions, SessionConfig, add_shared_options, run_options
from .outputs import (
    HTML_REPORT,
    RESULTS_CSV,
    RESULTS_JSONL,
    OutputError,
    check_distinct,
    check_output_file,
    check_output_folder,
)
from .pipeline import Batcher, InferenceLanes, Item, Result, decode_stream, inference_lanes
from .progress import Progress
from .providers import candidates, import_ort
from .report import RunInfo, build_figures, render_html, write_report
from .results import (
    JsonlWriter,
    ResultsFileError,
    RunStamp,
    recover_jsonl,
    result_row,
    write_csv,
)
from .resume import load_done, resume_spelling_problem, skip_done
from .summary import DEFAULT_MAX_ITEMS, Summary

PROG = "defectscope inspect"
#: one-line errors (exit 2): bad model, inputs, outputs or results file
USER_ERRORS = (MetadataError, ModelLoadError, ProviderError, InputSpecError, ResultsFileError, OutputError)


@dataclass(frozen=True)
class InspectConfig:
    """One `inspect` command line, checked and typed."""

    run: RunOptions
    inputs: tuple[str, ...]
    output: str
    csv: str | None = None
    report: str | None = None
    recursive: bool = False
    resume: bool = False
    fsync_interval: float = 1.0
    report_items: int = DEFAULT_MAX_ITEMS


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog=PROG,
        description="Inspect images with an exported defectscope ONNX model (no torch needed).",
        epilog="Exit status: 0 all inputs inspected, 1 some inputs failed (error rows), 2 bad usage, "
        "model, input or output (one line on stderr, before any image where possible), 130 interrupted (Ctrl+C or SIGTERM).",
    )
    add_shared_options(p)
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders, glob patterns or @list.txt (one path per line, # starts a comment, "
        "relative lines: from the list's folder; a line naming an existing file as written is that file); "
        "links to folders are not followed in folders or patterns",
    )
    p.add_argument("-o", "--output", required=True, help="results JSONL (one row per input)")
    p.add_argument("--csv", help="also write the rows as CSV (regenerated from the JSONL)")
    p.add_argument("--report", help="write a self-contained HTML report")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run: keep rows, skip their inputs"
    )
    p.add_argument(
        "--fsync-interval",
        type=float,
        default=1.0,
        help="seconds between fsyncs of the JSONL (default 1; 0 = every batch). Rows are flushed every "
        "batch, so a killed process loses nothing; a power cut loses at most this much, and --resume "
        "inspects those inputs again",
    )
    p.add_argument(
        "--report-items", type=int, default=DEFAULT_MAX_ITEMS, help="max NG/error items shown in the report"
    )
    return p


def parse_config(p: argparse.ArgumentParser, argv: Sequence[str]) -> InspectConfig:
    """Parse and check the command line (``p.error`` exits 2 on a usage error)."""
    a = p.parse_args(list(argv))
    run = run_options(p, a)
    if a.fsync_interval < 0:
        p.error(f"--fsync-interval must be >= 0 seconds, got {a.fsync_interval}")
    if a.report_items < 0:
        p.error(f"--report-items must be >= 0, got {a.report_items}")
    return InspectConfig(
        run,
        tuple(a.inputs),
        a.output,
        a.csv,
        a.report,
        a.recursive,
        a.resume,
        a.fsync_interval,
        a.report_items,
    )


def check_outputs(cfg: InspectConfig) -> None:
    """Every output path, before any work: results must be a regular file (``--resume`` reads it)."""
    check_distinct({"-o": cfg.output, "--csv": cfg.csv, "--report": cfg.report})
    check_output_file(cfg.output, "-o", special_ok=False, writes=RESULTS_JSONL)
    for option, path, kind in (("--csv", cfg.csv, RESULTS_CSV), ("--report", cfg.report, HTML_REPORT)):
        if path:
            check_output_file(path, option, writes=kind)
    if cfg.run.heatmaps:
        check_output_folder(cfg.run.heatmaps, "--heatmaps")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        cfg = parse_config(parser, sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return run(cfg)
    except USER_ERRORS as exc:
        print(error_line(PROG, exc), file=sys.stderr)
        return 2


class _Session:
    """Mutable state of one run: counts for the progress line and the writer."""

    def __init__(self, writer: JsonlWriter, stamp: RunStamp, heatmaps: str | None) -> None:
        self.writer = writer
        self.stamp = stamp
        self.heatmaps = heatmaps
        self.ok = self.ng = self.errors = 0
        self.progress = Progress()

    @property
    def done(self) -> int:
        return self.ok + self.ng + self.errors

    def error(self, item: Item) -> None:
        self.writer.add(result_row(Result(item, error=item.error, latency_ms=item.decode_ms), self.stamp))
        self.errors += 1
        self.progress.update(self.done, self.ok, self.ng, self.errors)

    def results_of(self, batches: list[list[Result]]) -> None:
        for results in batches:
            self.results(results)

    def results(self, results: list[Result]) -> None:
        for r in results:
            row = result_row(r, self.stamp)
            verdict = row["verdict"]
            if verdict == "NG" and self.heatmaps and r.cam is not None and r.item.array is not None:
                save_overlay(self.heatmaps, r.item.path, r.item.array, r.cam)
            self.writer.add(row)
            self.ok += verdict == "OK"
            self.ng += verdict == "NG"
            self.errors += verdict is None
        self.writer.commit()  # heat maps first, then the rows: a crash in between only redoes work
        self.progress.update(self.done, self.ok, self.ng, self.errors)


def session_threads(session: SessionConfig) -> int | None:
    """``--threads``, or 1 when the session will run on the CPU provider.

    :class:`InferenceLanes` then runs one single-threaded batch per physical core at once beside
    the decode threads: no intra-op synchronisation, and a preempted thread stalls only its own
    batch (docs/benchmarks.md, decode-bound cases).  GPU providers keep ONNX Runtime's threads.
    """
    if session.threads is not None:
        return session.threads
    first = candidates(session.provider, list(import_ort().get_available_providers()))[0]
    return 1 if first == "cpu" else None


def run(cfg: InspectConfig) -> int:
    """Inputs, outputs and model are checked before the first image; a write that fails later
    (disk full) stops the run with every row written before intact, so ``--resume`` goes on."""
    check_model_path(cfg.run.session.model)
    check_specs(cfg.inputs, recursive=cfg.recursive)
    check_outputs(cfg)
    inspector = Inspector.from_config(replace(cfg.run.session, threads=session_threads(cfg.run.session)))
    stamp = RunStamp.of(inspector.sha256, inspector.provider, inspector.threshold, cfg.run.threshold)
    threshold = stamp.threshold
    out = Path(cfg.output)
    done = None
    if cfg.resume and out.exists():
        torn = recover_jsonl(out)
        if torn:
            print(f"{PROG}: dropped a torn last line ({torn} bytes) from {out}", file=sys.stderr)
        done = load_done(out, stamp)
    if cfg.run.heatmaps:
        Path(cfg.run.heatmaps).mkdir(parents=True, exist_ok=True)

    warn = lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr)  # noqa: E731
    overlap = overlapping_inputs(cfg.inputs, recursive=cfg.recursive)
    if overlap:
        warn(overlap)
    empty: list[str] = []  # inputs that named no image: said after the run, unless no input named any
    paths = expand_inputs(cfg.inputs, recursive=cfg.recursive, warn=empty.append)
    if done:
        paths, renamed = resume_spelling_problem(paths, done, out)
        if renamed:
            raise OutputError(renamed)
        paths = skip_done(paths, done)
    paths = _some_input(paths, cfg.inputs, keep=bool(done))
    if not cfg.resume and out.is_file() and out.stat().st_size > 0:  # a finished or killed run's rows go
        warn(f"{out} held earlier results; they are replaced (--resume would continue that file instead)")
    writer = JsonlWriter(out, append=cfg.resume, fsync_interval_s=cfg.fsync_interval)
    session = _Session(writer, stamp, cfg.run.heatmaps)
    t0 = time.perf_counter()
    interrupted = False
    try:
        with terminate_as_interrupt():
            _inspect_all(cfg, inspector, session, paths, threshold)
    except KeyboardInterrupt:
        interrupted = True
    except OutputError as exc:
        raise OutputError(
            f"{exc}; the rows written before are intact: free space (or fix the folder), then rerun "
            "the same command with --resume"
        ) from None
    finally:
        writer.close()
        session.progress.close()
    if interrupted:  # counted once the file is closed: the batches in flight wrote their rows too
        for message in empty:
            warn(message)
        print(
            f"{PROG}: interrupted after {writer.rows_written()} rows this session; "
            f"rerun the same command with --resume to finish",
            file=sys.stderr,
        )
        return 130
    unmatched = sum(done.values()) if done else 0
    if unmatched:
        warn(
            f"{unmatched} row(s) already in {out} match no input of this run: their files are gone, or the "
            "inputs were given relative to another folder before (then those images now have two rows each)"
        )
    return _finish(cfg, inspector, stamp, session.done, time.perf_counter() - t0, empty)


def _some_input(paths: Iterator[str], specs: Sequence[str], *, keep: bool) -> Iterator[str]:
    """``paths`` unchanged; none at all is refused here, before the results file is touched (a run that
    finds no image must not empty the file of the last one), unless it ``keep``s rows to resume from."""
    first = next(paths, None)
    if first is None:
        if not keep:
            raise InputSpecError(f"no input images found in {' '.join(specs)}")
        return iter(())
    return itertools.chain([first], paths)


def _inspect_all(
    cfg: InspectConfig, inspector: Inspector, session: _Session, paths: Any, threshold: float
) -> None:
    writer, batch_size, workers = session.writer, cfg.run.batch_size, cfg.run.workers
    want_cam = bool(cfg.run.heatmaps) and inspector.has_cam
    batcher = Batcher.for_stream(batch_size)
    window = max(2 * workers, batch_size) + workers
    with InferenceLanes(inspector, threshold, want_cam=want_cam, lanes=inference_lanes(inspector)) as lanes:
        for item in decode_stream(paths, inspector.loader_config, workers, window):
            if item.error is not None:
                session.error(item)
                if writer.pending >= batch_size:
                    writer.commit()
                continue
            for batch in batcher.add(item):
                session.results_of(lanes.submit(batch))
        for batch in batcher.drain():
            session.results_of(lanes.submit(batch))
        session.results_of(lanes.drain())


def _finish(
    cfg: InspectConfig,
    inspector: Inspector,
    stamp: RunStamp,
    n_session: int,
    elapsed: float,
    empty: list[str],
) -> int:
    """Everything after inference is derived from the JSONL, the source of truth. ``empty``: inputs that
    named no image (a warning each; a run where none named any was refused before the file was touched)."""
    threshold = stamp.threshold
    summary = Summary.from_jsonl(cfg.output, max_items=cfg.report_items)
    for message in empty:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    meta = inspector.metadata
    if cfg.csv:
        write_csv(cfg.output, cfg.csv, meta.class_names)
    if cfg.report:
        info = RunInfo(
            model_path=inspector.model_path,
            model_sha256=inspector.sha256,
            model_name=meta.model_name,
            model_variant=meta.variant,
            provider=_provider_text(summary.providers, inspector),
            threshold=threshold,
            threshold_source=stamp.threshold_source,
            model_threshold=meta.threshold,
            model_threshold_source=dict(meta.threshold_source),
            grading=grading_text(meta.grader, meta.grading_source),
            class_names=list(meta.class_names),
            good_class=meta.good_class,
            results_path=str(cfg.output),
            created=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
            session_images=n_session,
            session_seconds=elapsed,
        )
        figures = build_figures(inspector, summary.ng_items, threshold)
        write_report(cfg.report, render_html(summary, info, figures))
    rate = f"{n_session / elapsed:.1f} img/s" if elapsed > 0 and n_session else "n/a"
    print(
        f"inspected {summary.total} inputs: OK {summary.ok}, NG {summary.ng}, errors {summary.error} "
        f"(this session {n_session} in {elapsed:.1f} s, {rate}; provider {inspector.provider_summary}, "
        f"threshold {threshold:g} ({stamp.threshold_source}))"
    )
    if summary.error_kinds:
        print("errors by kind: " + ", ".join(f"{k} {n}" for k, n in summary.error_kinds.most_common()))
    written = [str(x) for x in (cfg.output, cfg.csv, cfg.report) if x]
    heat = f"; heat maps in {cfg.run.heatmaps}" if cfg.run.heatmaps else ""
    print("wrote " + ", ".join(written) + heat)
    return 1 if summary.error else 0


def _provider_text(providers: Any, inspector: Inspector) -> str:
    used = ", ".join(f"{k} ({n} rows)" for k, n in providers.most_common())
    return f"{inspector.provider_summary} ({', '.join(inspector.providers)}); rows by provider: {used}"
