"""The options `inspect` and `watch` share, declared once, and the typed configs made from them.

Both commands open one ONNX Runtime session (:class:`SessionConfig`) and decide, batch and decode
the same way (:class:`RunOptions`); only where images come from and where rows go differ.  The
commands hand these dataclasses, never an argparse namespace, to the inspector and the watcher.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from .decision import THRESHOLD_EXPECTED, is_threshold
from .outputs import OutputError, check_output_folder
from .providers import GRAPH_OPT_CHOICES, PROVIDER_CHOICES
from .trt import TRT_MAX_BATCH, add_trt_options


@dataclass(frozen=True)
class SessionConfig:
    """How to open the model's ONNX Runtime session (:meth:`Inspector.from_config`)."""

    model: str
    provider: str = "auto"
    threads: int | None = None
    graph_opt: str = "all"
    trt_cache: str | None = None
    #: TensorRT profile and cache (:mod:`.trt`)
    trt_max_batch: int = TRT_MAX_BATCH
    trt_max_side: int | None = None
    trt_clean: bool = False
    device_id: int = 0  # the GPU of the CUDA and TensorRT providers


@dataclass(frozen=True)
class RunOptions:
    """What `inspect` and `watch` share besides the session."""

    session: SessionConfig
    threshold: float | None = None  # None: the model's own
    batch_size: int = 16
    workers: int = 2
    heatmaps: str | None = None


class CommandParser(argparse.ArgumentParser):
    """The product's argument parser: a mistake is one line naming the option and what was expected,
    with where to read the usage (argparse prints its whole usage block above the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def unit_number(text: str) -> float:
    """argparse type of every ``--threshold`` (and export's shares): a number in [0, 1]; words, NaN
    and inf are refused with the same message in every command."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not is_threshold(value):
        raise argparse.ArgumentTypeError(f"expected {THRESHOLD_EXPECTED}, got {text!r}")
    return value


def whole_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum`` (a count of images, workers, convolutions)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_engine_options(p: argparse.ArgumentParser, threads_default: str = "physical cores") -> None:
    """--batch-size, --threads and --provider: one type, range and default each for every command that runs
    an exported model (inspect, watch, evaluate MODEL DATA)."""
    p.add_argument(
        "--batch-size",
        type=whole_at_least(1),
        default=16,
        help="most images per inference batch (default 16)",
    )
    p.add_argument(
        "--threads",
        type=whole_at_least(0),
        default=None,
        help=f"ONNX Runtime threads per inference call (0: physical cores; default: {threads_default})",
    )
    p.add_argument("--provider", choices=PROVIDER_CHOICES, default="auto", help="execution provider")


def add_shared_options(p: argparse.ArgumentParser) -> None:
    """The model argument and every option both commands take, with one default and help each."""
    p.add_argument("model", help="exported .onnx model (carries its own preprocessing and classes)")
    add_engine_options(
        p, "physical cores; inspect on the CPU provider: 1, with one batch per physical core running at once"
    )
    p.add_argument(
        "--workers",
        type=whole_at_least(0),
        default=default_workers(),
        help="decoding threads (default: min(4, CPUs))",
    )
    p.add_argument(
        "--device-id",
        type=int,
        default=0,
        help="GPU index for the CUDA and TensorRT providers (default 0; one runner per GPU on a multi-GPU PC)",
    )
    p.add_argument("--graph-opt", choices=GRAPH_OPT_CHOICES, default="all", help="graph optimisation level")
    p.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder")
    add_trt_options(p)
    p.add_argument(
        "--threshold", type=unit_number, default=None, help="NG when P(defect) >= this (default: the model's)"
    )
    p.add_argument("--heatmaps", default=None, help="folder for CAM overlay PNGs of NG images")


def run_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> RunOptions:
    """Check the shared options (``p.error`` exits 2) and type them."""
    if (
        a.trt_cache
    ):  # told here whatever the provider: on a CPU test PC it was ignored, on the line PC refused
        try:
            check_output_folder(a.trt_cache, "--trt-cache")
        except OutputError as exc:
            p.error(str(exc))
    if a.device_id < 0:
        p.error(f"--device-id must be a GPU index >= 0, got {a.device_id}")
    session = SessionConfig(
        a.model,
        a.provider,
        a.threads,
        a.graph_opt,
        a.trt_cache,
        a.trt_max_batch,
        a.trt_max_side,
        a.trt_cache_clean,
        a.device_id,
    )
    return RunOptions(session, a.threshold, a.batch_size, a.workers, a.heatmaps)
