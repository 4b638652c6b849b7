"""Scan every image once before training: full decode, preprocessed size, pixel statistics.

One pass gives three things: (1) all bad files with their reasons before the first step (no
crash in epoch 7 on a truncated JPEG), (2) each image's preprocessed size for the bucket
sampler, (3) exact per-channel pixel sums for the normalisation mean/std — no second read.
Decoding runs in a thread pool (Pillow releases the GIL while decoding and resizing).

`defectscope scan` is the same check as a command; it never imports torch.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.files import error_line
from ..runtime.image import ImageLoadError, LoaderConfig, load_image
from ..runtime.options import CommandParser
from ..runtime.outputs import OutputError, check_not_input, check_output_file
from ..runtime.results import csv_cell


@dataclass(frozen=True)
class ScanRecord:
    """A good image: preprocessed (height, width) and per-channel sums over its pixels (0..255)."""

    height: int
    width: int
    sums: tuple[float, ...]
    sq_sums: tuple[float, ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


@dataclass(frozen=True)
class BadFile:
    path: str
    kind: str
    reason: str


@dataclass
class ScanResult:
    """``records[i]`` belongs to ``paths[i]``; it is ``None`` exactly for the files in ``bad``."""

    paths: list[str]
    records: list[ScanRecord | None]
    bad: list[BadFile]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.bad


#: how many bad files a refusal names (the train command prints it as one line); ``defectscope scan`` lists all
SHOWN_BAD_FILES = 5


class BadFilesError(ValueError):
    """Raised before training when files are bad and ``on_bad_file`` is ``fail``: how many of each kind, the
    first :data:`SHOWN_BAD_FILES`, and where the whole list comes from (``bad`` holds them all)."""

    def __init__(
        self, bad: Sequence[BadFile], total: int, hint: str = "", origin: Mapping[str, str] | None = None
    ) -> None:
        self.bad = list(bad)
        where = origin or {}
        lines = [
            f"  {b.path}: [{b.kind}] {b.reason}"
            + (f" (listed in {where[b.path]})" if b.path in where else "")
            for b in self.bad[:SHOWN_BAD_FILES]
        ]
        if len(self.bad) > SHOWN_BAD_FILES:
            lines.append(
                f"  ... and {len(self.bad) - SHOWN_BAD_FILES} more (defectscope scan with the same data settings "
                "and --rejects FILE lists every one)"
            )
        if os.sep == "/" and any("\\" in b.path for b in self.bad if b.kind == "vanished"):
            lines.append("  paths with backslashes name no folder here: write the manifest's paths with /")
        kinds = Counter(b.kind for b in self.bad)
        counts = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())
        super().__init__(
            f"{len(self.bad)} of {total} image files cannot be used ({counts}):\n"
            + "\n".join(lines)
            + (f"\n{hint}" if hint else "")
        )


def _check_one(path: str, cfg: LoaderConfig) -> ScanRecord | BadFile:
    try:
        arr = load_image(path, cfg)
    except ImageLoadError as exc:
        return BadFile(exc.path, exc.kind, exc.reason)
    except Exception as exc:  # a decoder bug must not hide the other files' reports
        return BadFile(path, "unexpected", f"{type(exc).__name__}: {exc}")
    h, w, c = arr.shape
    sums, sq = [], []
    for ch in range(c):
        hist = np.bincount(arr[:, :, ch].ravel(), minlength=256).astype(np.float64)
        sums.append(float(hist @ _LEVELS))
        sq.append(float(hist @ _LEVELS_SQ))
    return ScanRecord(h, w, tuple(sums), tuple(sq))


_LEVELS = np.arange(256, dtype=np.float64)
_LEVELS_SQ = _LEVELS**2


def scan_files(
    paths: Sequence[str],
    cfg: LoaderConfig,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Decode every file fully with :func:`load_image` (the exact training/runtime path)."""
    t0 = time.perf_counter()
    records: list[ScanRecord | None] = []
    bad: list[BadFile] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, res in enumerate(pool.map(lambda p: _check_one(p, cfg), paths)):
            if isinstance(res, BadFile):
                records.append(None)
                bad.append(res)
            else:
                records.append(res)
            if progress is not None:
                progress(i + 1, len(paths))
    return ScanResult(list(paths), records, bad, time.perf_counter() - t0)


def check_rejects_not_scanned(path: str | os.PathLike[str], scanned: Sequence[str], option: str) -> None:
    """The rejects list is not one of the images it lists from (a CSV source's images lie anywhere, so the
    folder rule of :func:`~defectscope.runtime.outputs.check_not_input` cannot see them); before the scan."""
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if any(os.path.realpath(p) == real for p in scanned):
        raise OutputError(f"{option} {path}: is one of the images this run reads; give another file")


def write_rejects(path: str | os.PathLike[str], bad: Sequence[BadFile]) -> Path:
    """Write ``path,kind,reason`` rows (header included) for the files that were skipped."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "kind", "reason"))
        writer.writerows((csv_cell(b.path), b.kind, csv_cell(b.reason)) for b in bad)
    return out


def mean_std(records: Sequence[ScanRecord | None], channels: int) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std on the 0..1 scale over all pixels of the given records."""
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    pixels = 0
    for r in records:
        if r is None:
            continue
        total += r.sums
        total_sq += r.sq_sums
        pixels += r.height * r.width
    if pixels == 0:
        raise ValueError("cannot compute mean/std: no readable training images")
    mean = total / pixels / 255.0
    var = np.maximum(total_sq / pixels / 255.0**2 - mean**2, 0.0)
    std = np.maximum(np.sqrt(var), 1e-3)  # a constant image set must not divide by zero
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="defectscope scan",
        description="Decode every image of the dataset that `defectscope train` would load, with the "
        "same Hydra data config (conf/train.yaml, the same groups, overrides and defaults), and list "
        "the bad files. Exit status: 0 all good, 1 some files bad, 2 config error.",
        epilog="examples: defectscope scan data/images   (short form: data=folder data.source.root=...)\n"
        "          defectscope scan experiment=elpv\n"
        "          defectscope scan data=csv data.source.path=manifest.csv data.loader.channels=3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="[FOLDER] OVERRIDE",
        help="Hydra overrides as for `defectscope train`; a first argument without '=' is an image "
        "folder (<root>/<class>/...)",
    )
    p.add_argument("--config-dir", help="a folder of your own configs, as `defectscope train --config-dir`")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default: data.scan_workers)")
    p.add_argument("--rejects", type=Path, help="also write the bad files as CSV path,kind,reason")
    return p


@dataclass(frozen=True)
class ScanConfig:
    """What `defectscope scan` checks: the training data config's source and loader."""

    source: dict[str, Any]
    loader: LoaderConfig
    workers: int


def compose_data_config(overrides: Sequence[str], folder: str | None, config_dir: str | None) -> ScanConfig:
    """Compose conf/train.yaml exactly as `defectscope train` would and take its ``data`` part."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from ..plain import to_plain
    from ..training.app import conf_dir
    from .settings import config_data_settings, loader_config
    from .transforms import check_transform_spec

    extra = [f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"] if config_dir else []
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*(["data=folder"] if folder else []), *overrides, *extra])
    with open_dict(cfg):
        if OmegaConf.is_interpolation(cfg.paths, "launch_dir"):  # ${hydra:runtime.cwd} needs a running app
            cfg.paths.launch_dir = os.getcwd()
        if folder:
            cfg.data.source.root = folder
        cfg.data.rejects_path = None  # scan writes its own (--rejects)
    plain = to_plain(OmegaConf.to_container(cfg.data, resolve=True))
    check_transform_spec(plain.get("train_transform"), "data.train_transform")  # train's own checks: a config
    config_data_settings(plain)  # it would refuse is refused here too, not scanned with
    return ScanConfig(plain["source"], loader_config(plain["loader"]), int(plain.get("scan_workers", 2)))


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, str | None]:
    p = build_parser()
    args = p.parse_args(list(argv))
    folder = None
    if args.overrides and "=" not in args.overrides[0]:
        folder, args.overrides = args.overrides[0], args.overrides[1:]
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args, folder


def main(argv: Sequence[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    from ..training.app_errors import composition_error
    from .sources import SourceError, build_source, input_paths, prepare_source

    try:
        args, folder = _parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        if args.rejects:  # before the scan's work
            check_output_file(args.rejects, "--rejects")  # the rule data.rejects_path is held to
        cfg = compose_data_config(args.overrides, folder, args.config_dir)
        if args.rejects:
            check_not_input(args.rejects, "--rejects", input_paths(cfg.source))
        prepare_source(cfg.source)
        source = build_source(cfg.source, missing="keep")
    except (
        SourceError,
        ValueError,
        TypeError,
        HydraException,
        OmegaConfBaseException,
        OutputError,
        YAMLError,
    ) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        composing = isinstance(exc, HydraException | YAMLError | UnicodeDecodeError)
        text = composition_error(exc, args.overrides) if composing else "; ".join(lines)
        print(error_line("defectscope scan", text or type(exc).__name__), file=sys.stderr)
        return 2
    workers = args.workers or cfg.workers
    paths = [s.path for s in source.samples]
    if args.rejects:
        try:
            check_rejects_not_scanned(args.rejects, paths, "--rejects")
        except OutputError as exc:
            print(error_line("defectscope scan", exc), file=sys.stderr)
            return 2
    print(f"source: {source.description}")
    print(f"loader: {cfg.loader.to_dict()}")
    result = scan_files(paths, cfg.loader, workers)
    _print_result(source, result)
    if args.rejects:
        print(f"rejects written to {write_rejects(args.rejects, result.bad)}")
    return 1 if result.bad else 0


def _print_result(source: Any, result: ScanResult) -> None:
    from .stats import count_table

    good = [(s, r) for s, r in zip(source.samples, result.records) if r is not None]
    n = len(result.paths)
    rate = n / result.seconds if result.seconds > 0 else float("inf")
    print(
        f"scanned {n} files in {result.seconds:.2f} s ({rate:.0f}/s): {len(good)} ok, {len(result.bad)} bad"
    )
    if source.ignored:
        print(
            f"ignored {len(source.ignored)} file(s) (not an image, or outside the class folders), e.g. {source.ignored[0]}"
        )
    print(count_table([s for s, _ in good], source.class_names))
    sizes = Counter((r.width, r.height) for _, r in good)
    if sizes:
        print(f"{len(sizes)} distinct preprocessed sizes (w x h); most common:")
        print("  " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(8)))
    if result.bad:
        kinds = Counter(b.kind for b in result.bad)
        print(f"\n{len(result.bad)} bad file(s) ({', '.join(f'{k}: {n}' for k, n in kinds.most_common())}):")
        for b in result.bad:
            print(f"  {b.path}: [{b.kind}] {b.reason}")


if __name__ == "__main__":
    raise SystemExit(main())
