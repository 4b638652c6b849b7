"""`defectscope inspect MODEL INPUT... -o results.jsonl`: batch inspection on a line PC.

Exactly-once contract: each input gets one JSONL row; rows are committed (one write + flush) batch
by batch and fsync'd at most every ``--fsync-interval`` seconds, so after a crash or ``kill -9`` a rerun with ``--resume`` truncates a torn last
line, skips every input that has a row and inspects the rest.  CSV and HTML report are rebuilt
from the JSONL at the end.  Exit codes: 0 all inputs inspected, 1 some error rows, 2 bad command
line or unusable model, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .heatmap import save_overlay
from .inputs import InputSpecError, check_specs, expand_inputs
from .inspector import Inspector, MetadataError, ModelLoadError, ProviderError
from .pipeline import Batcher, Item, Result, decode_stream, infer
from .progress import Progress
from .providers import GRAPH_OPT_CHOICES, PROVIDER_CHOICES
from .report import RunInfo, build_figures, render_html, write_report
from .results import (
    JsonlWriter,
    ResultsFileError,
    error_row,
    load_done,
    ok_row,
    recover_jsonl,
    skip_done,
    write_csv,
)
from .summary import DEFAULT_MAX_ITEMS, Summary
from .trt import add_trt_options

PROG = "defectscope inspect"


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect images with an exported defectscope ONNX model (no torch needed).",
        epilog="Exit status: 0 all inputs inspected, 1 some inputs failed (error rows), 2 bad usage or model.",
    )
    p.add_argument("model", help="exported .onnx model (carries its own preprocessing and classes)")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders, glob patterns or @list.txt"
    )
    p.add_argument("-o", "--output", required=True, help="results JSONL (one row per input)")
    p.add_argument("--csv", help="also write the rows as CSV (regenerated from the JSONL)")
    p.add_argument("--report", help="write a self-contained HTML report")
    p.add_argument("--heatmaps", help="folder for CAM overlay PNGs of NG images")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders of folder inputs")
    p.add_argument("--batch-size", type=int, default=16, help="images per inference batch (default 16)")
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="decoding threads (default: min(4, CPUs))"
    )
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto", help="execution provider")
    p.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: physical cores)"
    )
    p.add_argument("--graph-opt", choices=GRAPH_OPT_CHOICES, default="all", help="graph optimisation level")
    p.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder")
    add_trt_options(p)
    p.add_argument(
        "--threshold", type=float, default=None, help="NG when P(defect) >= this (default: the model's)"
    )
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


def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.workers < 0:
        p.error(f"--workers must be >= 0, got {a.workers}")
    if a.threshold is not None and not 0.0 <= a.threshold <= 1.0:
        p.error(f"--threshold must lie in [0, 1], got {a.threshold}")
    if a.fsync_interval < 0:
        p.error(f"--fsync-interval must be >= 0 seconds, got {a.fsync_interval}")
    if a.report_items < 0:
        p.error(f"--report-items must be >= 0, got {a.report_items}")
    if os.path.isdir(a.output):
        p.error(f"-o {a.output!r} is a folder; give a file name such as results.jsonl")
    outs = [os.path.abspath(x) for x in (a.output, a.csv, a.report) if x]
    if len(set(outs)) != len(outs):
        p.error("-o, --csv and --report must be different files")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        _check_args(parser, args)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        return run(args)
    except (MetadataError, ModelLoadError, ProviderError, InputSpecError, ResultsFileError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


class _Session:
    """Mutable state of one run: counts for the progress line and the writer."""

    def __init__(self, inspector: Inspector, writer: JsonlWriter, args: argparse.Namespace, threshold: float):
        self.inspector = inspector
        self.writer = writer
        self.args = args
        self.threshold = threshold
        self.ok = self.ng = self.errors = 0
        self.progress = Progress()

    @property
    def done(self) -> int:
        return self.ok + self.ng + self.errors

    def error(self, item: Item) -> None:
        insp = self.inspector
        self.writer.add(
            error_row(
                item.path,
                item.error or "unknown",
                sha256=insp.sha256,
                provider=insp.provider,
                latency_ms=item.decode_ms,
            )
        )
        self.errors += 1
        self.progress.update(self.done, self.ok, self.ng, self.errors)

    def results(self, results: list[Result]) -> None:
        insp = self.inspector
        for r in results:
            if r.decision is None or r.item.size is None:
                r.item.error = r.error
                self.error(r.item)
                continue
            if (
                self.args.heatmaps
                and r.decision.verdict == "NG"
                and r.cam is not None
                and r.item.array is not None
            ):
                save_overlay(self.args.heatmaps, r.item.path, r.item.array, r.cam)
            self.writer.add(
                ok_row(
                    r.item.path,
                    r.decision,
                    r.item.size,
                    sha256=insp.sha256,
                    provider=insp.provider,
                    latency_ms=r.latency_ms,
                )
            )
            if r.decision.verdict == "NG":
                self.ng += 1
            else:
                self.ok += 1
        self.writer.commit()  # heat maps first, then the rows: a crash in between only redoes work
        self.progress.update(self.done, self.ok, self.ng, self.errors)


def run(args: argparse.Namespace) -> int:
    check_specs(args.inputs)
    inspector = Inspector.from_args(args)
    threshold = inspector.threshold if args.threshold is None else float(args.threshold)
    out = Path(args.output)
    done = None
    if args.resume and out.exists():
        torn = recover_jsonl(out)
        if torn:
            print(f"{PROG}: dropped a torn last line ({torn} bytes) from {out}", file=sys.stderr)
        done = load_done(out, inspector.sha256)
    if args.heatmaps:
        Path(args.heatmaps).mkdir(parents=True, exist_ok=True)

    warn = lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr)  # noqa: E731
    paths = expand_inputs(args.inputs, recursive=args.recursive, warn=warn)
    if done:
        paths = skip_done(paths, done)
    writer = JsonlWriter(out, append=bool(args.resume), fsync_interval_s=args.fsync_interval)
    session = _Session(inspector, writer, args, threshold)
    want_cam = bool(args.heatmaps) and inspector.has_cam
    batcher = Batcher.for_stream(args.batch_size)
    window = max(2 * args.workers, args.batch_size) + args.workers
    t0 = time.perf_counter()
    interrupted = False
    try:
        for item in decode_stream(paths, inspector.loader_config, args.workers, window):
            if item.error is not None:
                session.error(item)
                if writer.pending >= args.batch_size:
                    writer.commit()
                continue
            for batch in batcher.add(item):
                session.results(infer(inspector, batch, threshold, want_cam=want_cam))
        for batch in batcher.drain():
            session.results(infer(inspector, batch, threshold, want_cam=want_cam))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        writer.close()
        session.progress.close()
    elapsed = time.perf_counter() - t0
    if interrupted:
        print(
            f"{PROG}: interrupted after {writer.committed} rows this session; "
            f"rerun the same command with --resume to finish",
            file=sys.stderr,
        )
        return 130
    return _finish(args, inspector, threshold, session.done, elapsed)


def _finish(
    args: argparse.Namespace, inspector: Inspector, threshold: float, n_session: int, elapsed: float
) -> int:
    """Everything after inference is derived from the JSONL, the source of truth."""
    summary = Summary.from_jsonl(args.output, max_items=args.report_items)
    if summary.total == 0:
        print(f"{PROG}: error: no input images found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    meta = inspector.metadata
    if args.csv:
        write_csv(args.output, args.csv, meta.class_names)
    if args.report:
        info = RunInfo(
            model_path=inspector.model_path,
            model_sha256=inspector.sha256,
            model_name=meta.model_name,
            model_variant=meta.variant,
            provider=_provider_text(summary.providers, inspector),
            threshold=threshold,
            model_threshold=meta.threshold,
            threshold_source=dict(meta.threshold_source),
            class_names=list(meta.class_names),
            good_class=meta.good_class,
            results_path=str(args.output),
            created=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
            session_images=n_session,
            session_seconds=elapsed,
        )
        figures = build_figures(inspector, summary.ng_items, threshold)
        write_report(args.report, render_html(summary, info, figures))
    rate = f"{n_session / elapsed:.1f} img/s" if elapsed > 0 and n_session else "n/a"
    print(
        f"inspected {summary.total} inputs: OK {summary.ok}, NG {summary.ng}, errors {summary.error} "
        f"(this session {n_session} in {elapsed:.1f} s, {rate}; provider {inspector.provider_summary}, "
        f"threshold {threshold:g})"
    )
    if summary.error_kinds:
        print("errors by kind: " + ", ".join(f"{k} {n}" for k, n in summary.error_kinds.most_common()))
    written = [str(x) for x in (args.output, args.csv, args.report) if x]
    print("wrote " + ", ".join(written) + (f"; heat maps in {args.heatmaps}" if args.heatmaps else ""))
    return 1 if summary.error else 0


def _provider_text(providers: Any, inspector: Inspector) -> str:
    used = ", ".join(f"{k} ({n} rows)" for k, n in providers.most_common())
    return f"{inspector.provider_summary} ({', '.join(inspector.providers)}); rows by provider: {used}"
