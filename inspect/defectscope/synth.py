"""`defectscope synth`: a synthetic product-surface dataset, so every part can be tried without real data.

Images are textured surfaces (base level, gradient, low-frequency blotches, brushing, grain) of
varying width and height, either defect-free (`good`) or carrying one defect (`scratch`, `spot`,
`crack`) at a random position and orientation.  Defects are a few pixels wide and of clear but
not saturating contrast, so a small CNN can learn them while they stay local.

Regions (``--region``): ``anywhere`` (default) puts a defect anywhere in the image; ``left``,
``centre`` and ``right`` draw it on the canvas of that third of the width (full height) only, so
the whole defect lies inside the third and its size follows the third's.  Training on one region
and testing on another is the position-holdout test of translation invariance
(``benchmarks/position_holdout.py``).

Reproducibility: image ``i`` draws only from ``numpy.random.default_rng([seed, i])`` and the class
plan only from ``default_rng(seed)``; PNGs are written with fixed settings and no metadata, so the
same seed gives byte-identical files.  numpy and Pillow only (no torch): the generator also feeds
line-PC tests.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .runtime.options import CommandParser
from .runtime.outputs import OutputError, check_output_folder
from .synth_output import (
    MANIFEST,
    SYNTH_MARKER,
    abandon,
    check_replaceable,
    partial_folder,
    replace_with,
    write_marker,
)

__all__ = ["MANIFEST", "SYNTH_MARKER", "generate", "main", "synth_params"]

DEFAULT_CLASSES = ("good", "scratch", "spot", "crack")
#: where defects may lie; the thirds split the width at round(w/3) and round(2w/3)
REGIONS = ("anywhere", "left", "centre", "right")
_PNG_COMPRESS_LEVEL = 1  # fixed: identical bytes for identical pixels; fast to write

Rng = np.random.Generator


# --------------------------------------------------------------------------- background


def _smooth_field(rng: Rng, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    gh = max(2, round(cells * h / max(h, w)))
    gw = max(2, round(cells * w / max(h, w)))
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    field = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _background(rng: Rng, h: int, w: int) -> np.ndarray:
    """A plausible machined / moulded surface as float32 grey levels (H, W)."""
    base = rng.uniform(85.0, 170.0)
    yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    angle = rng.uniform(0.0, 2.0 * math.pi)
    gradient = rng.uniform(8.0, 30.0) * (math.cos(angle) * xx + math.sin(angle) * yy)
    blotches = rng.uniform(4.0, 10.0) * _smooth_field(rng, h, w, int(rng.integers(3, 7)))
    # Brushing: a 1-D noise profile smeared along rows or columns.
    if rng.random() < 0.5:
        profile = np.convolve(rng.standard_normal(w), np.ones(3) / 3.0, mode="same")
        brushing = profile[None, :].astype(np.float32)
    else:
        profile = np.convolve(rng.standard_normal(h), np.ones(3) / 3.0, mode="same")
        brushing = profile[:, None].astype(np.float32)
    grain = rng.standard_normal((h, w), dtype=np.float32)
    grain *= rng.uniform(2.0, 5.0)
    grain += base + gradient + blotches + rng.uniform(1.5, 4.0) * brushing
    return grain


# --------------------------------------------------------------------------- defects
# Each painter draws a defect mask (float32 in [0, 1], soft edges) and returns its signed contrast.


def _blurred(mask: Image.Image, radius: float) -> np.ndarray:
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _random_point(rng: Rng, h: int, w: int, margin: float) -> tuple[float, float]:
    return rng.uniform(margin * w, (1 - margin) * w), rng.uniform(margin * h, (1 - margin) * h)


def _scratch(rng: Rng, h: int, w: int) -> tuple[np.ndarray, float]:
    """A long, thin, gently curved line; bright or dark like a tool mark."""
    side = min(h, w)
    length = rng.uniform(0.35, 0.75) * side
    cx, cy = _random_point(rng, h, w, 0.25)
    angle = rng.uniform(0.0, math.pi)
    bend = rng.uniform(-0.15, 0.15) * length
    ts = np.linspace(-0.5, 0.5, 7)
    px = cx + ts * length * math.cos(angle) - (1 - 4 * ts**2) * bend * math.sin(angle)
    py = cy + ts * length * math.sin(angle) + (1 - 4 * ts**2) * bend * math.cos(angle)
    mask = Image.new("L", (w, h), 0)
    width = max(2, round(side / rng.uniform(45.0, 70.0)))
    ImageDraw.Draw(mask).line(list(zip(px.tolist(), py.tolist())), fill=255, width=width, joint="curve")
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return _blurred(mask, 0.7), sign * rng.uniform(40.0, 70.0)


def _spot(rng: Rng, h: int, w: int) -> tuple[np.ndarray, float]:
    """A soft-edged elliptical stain or pit, rotated at random; usually dark."""
    side = min(h, w)
    a = rng.uniform(0.05, 0.11) * side
    b = a * rng.uniform(0.55, 1.0)
    cx, cy = _random_point(rng, h, w, 0.15)
    angle = rng.uniform(0.0, math.pi)
    t = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
    wobble = 1.0 + 0.12 * np.sin(3 * t + rng.uniform(0, 2 * math.pi))
    ex, ey = a * wobble * np.cos(t), b * wobble * np.sin(t)
    px = cx + ex * math.cos(angle) - ey * math.sin(angle)
    py = cy + ex * math.sin(angle) + ey * math.cos(angle)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon(list(zip(px.tolist(), py.tolist())), fill=255)
    sign = -1.0 if rng.random() < 0.75 else 1.0
    return _blurred(mask, max(1.0, a / 4.0)), sign * rng.uniform(35.0, 65.0)


def _crack(rng: Rng, h: int, w: int) -> tuple[np.ndarray, float]:
    """A jagged dark random walk with one or two branches."""
    side = min(h, w)
    step = side / rng.uniform(14.0, 20.0)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    width = max(2, round(side / 90.0))

    def walk(x: float, y: float, heading: float, steps: int) -> list[tuple[float, float]]:
        pts = [(x, y)]
        for _ in range(steps):
            heading += rng.uniform(-0.7, 0.7)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            pts.append((x, y))
        return pts

    x0, y0 = _random_point(rng, h, w, 0.3)
    heading = rng.uniform(0.0, 2.0 * math.pi)
    trunk = walk(x0, y0, heading, int(rng.integers(6, 11)))
    draw.line(trunk, fill=255, width=width + 1, joint="curve")
    for _ in range(int(rng.integers(1, 3))):
        bx, by = trunk[int(rng.integers(1, len(trunk) - 1))]
        branch = walk(
            bx, by, heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2), int(rng.integers(2, 5))
        )
        draw.line(branch, fill=255, width=width, joint="curve")
    return _blurred(mask, 0.6), -rng.uniform(55.0, 85.0)


PAINTERS: dict[str, Callable[[Rng, int, int], tuple[np.ndarray, float]] | None] = {
    "good": None,
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
}


# --------------------------------------------------------------------------- images and dataset


def region_columns(region: str, w: int) -> tuple[int, int]:
    """The column range [x0, x1) of ``region`` in an image ``w`` pixels wide."""
    cuts = (0, round(w / 3), round(2 * w / 3), w)
    if region == "anywhere":
        return 0, w
    third = REGIONS.index(region) - 1
    return cuts[third], cuts[third + 1]


def render(
    seed: int, index: int, label: str, channels: int, size_range: tuple[int, int], region: str = "anywhere"
) -> np.ndarray:
    """Image ``index`` of a dataset with ``seed``: HWC uint8 (or HW for one channel)."""
    rng = np.random.default_rng([seed, index])
    lo, hi = size_range
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    grey = _background(rng, h, w)
    painter = PAINTERS[label]
    if painter is not None:
        x0, x1 = region_columns(region, w)
        mask, contrast = painter(rng, h, x1 - x0)
        grey[:, x0:x1] += contrast * mask
    if channels == 1:
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    rgb = grey[:, :, None] * tint[None, None, :]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def class_plan(n: int, seed: int, classes: Sequence[str]) -> list[str]:
    """Balanced labels for ``n`` images (counts differ by at most one), shuffled by ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    return [classes[int(k) % len(classes)] for k in order]


def synth_params(
    n: int, seed: int, channels: int, min_size: int, max_size: int, classes: Sequence[str], region: str
) -> dict[str, Any]:
    """What :data:`SYNTH_MARKER` records: the parameters that decide every byte of a generated set."""
    from . import __version__

    params = {
        "n": n,
        "seed": seed,
        "channels": channels,
        "min_size": min_size,
        "max_size": max_size,
        "classes": list(classes),
        "generator_version": __version__,
    }
    if region != "anywhere":  # absent for the default, so sets generated before regions existed stay valid
        params["region"] = region
    return params


def check_request(
    n: int,
    channels: int,
    size_range: tuple[int, int],
    classes: Sequence[str],
    region: str = "anywhere",
    seed: int = 0,
    workers: int | None = None,
    prefix: str = "synth: ",
) -> None:
    """Every generation parameter, before anything is written or replaced; ``prefix`` names where they
    came from (``data.source.`` for the synthetic source)."""
    lo, hi = size_range
    problems = (
        (n < 1, f"n must be >= 1, got {n}"),
        (seed < 0, f"seed must be >= 0, got {seed}"),
        (workers is not None and workers < 1, f"workers must be >= 1, got {workers}"),
        (channels not in (1, 3), f"channels must be 1 or 3, got {channels}"),
        (
            not 16 <= lo <= hi,
            f"min_size and max_size must satisfy 16 <= min_size <= max_size, got {lo} and {hi}",
        ),
        (not classes, "classes: at least one class is required"),
        (len(set(classes)) != len(classes), f"classes: duplicate class names in {list(classes)}"),
        (region not in REGIONS, f"region: unknown region {region!r}; valid: {', '.join(REGIONS)}"),
    )
    for failed, message in problems:
        if failed:
            raise ValueError(prefix + message)
    unknown = [c for c in classes if c not in PAINTERS]
    if unknown:
        raise ValueError(
            f"{prefix}classes: unknown class(es) {', '.join(unknown)}; valid: {', '.join(PAINTERS)}"
        )


def generate(
    out: str | Path,
    n: int,
    seed: int = 0,
    channels: int = 1,
    size_range: tuple[int, int] = (96, 512),
    classes: Sequence[str] = DEFAULT_CLASSES,
    *,
    workers: int | None = None,
    region: str = "anywhere",
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Path:
    """Write ``n`` images as ``out/<class>/<class>_<i>.png`` plus ``out/manifest.csv``; return ``out``.

    Written into a hidden folder inside ``out`` whose entries move in at the end (:mod:`.synth_output`): a
    killed run leaves ``out`` as it was. ``region``: where the defects lie (:data:`REGIONS`; see the module docstring).
    """
    classes = list(classes)
    check_request(n, channels, size_range, classes, region, seed, workers)
    root = Path(out)
    try:
        check_replaceable(root)  # before the work; checked again when the new set takes its place
    except ValueError as exc:
        raise ValueError(f"synth: {exc}") from None
    final, root = root, partial_folder(root)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(n - 1)))
    rows = [
        (f"{label}/{label}_{i:0{digits}d}.png", label) for i, label in enumerate(class_plan(n, seed, classes))
    ]

    def write(i: int) -> None:
        rel, label = rows[i]
        Image.fromarray(render(seed, i, label, channels, size_range, region)).save(
            root / rel, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
        )

    # Threads: numpy, blur and the PNG encoder release the GIL; every image has its own RNG,
    # so the worker count cannot change a single byte.
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for _ in pool.map(write, range(n)):
            pass
    with open(root / MANIFEST, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "label"))
        writer.writerows(rows)
    write_marker(root, synth_params(n, seed, channels, *size_range, classes, region))  # last: complete
    try:
        replaced = replace_with(final, root)
    except (ValueError, OSError) as exc:  # a file put into the old output while this one was generated
        abandon(root)
        raise ValueError(f"synth: {exc}") from None
    if replaced:
        log(f"synth: replaced the earlier synth output in {final} ({replaced} images, its manifest.csv)")
    return final


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="defectscope synth",
        description="Generate a synthetic product-surface dataset: OUT/<class>/*.png and OUT/manifest.csv.",
    )
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--n", type=int, default=240, help="number of images (default 240)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; same seed -> identical files")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 (grey) or 3 (RGB)")
    p.add_argument("--min-size", type=int, default=96, help="smallest width/height (default 96)")
    p.add_argument("--max-size", type=int, default=512, help="largest width/height (default 512)")
    p.add_argument(
        "--classes",
        default=",".join(DEFAULT_CLASSES),
        help=f"comma-separated subset of {','.join(PAINTERS)} (default: all)",
    )
    p.add_argument(
        "--region",
        default="anywhere",
        help=f"where defects lie: {', '.join(REGIONS)} (a third of the width; default anywhere)",
    )
    p.add_argument("--workers", type=int, default=None, help="writer threads (default: up to 4)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    t0 = time.perf_counter()
    try:
        check_output_folder(args.out, "synth")
        root = generate(
            args.out,
            args.n,
            args.seed,
            args.channels,
            (args.min_size, args.max_size),
            classes,
            workers=args.workers,
            region=args.region,
        )
    except (ValueError, OutputError) as exc:
        print(f"defectscope {exc}", file=sys.stderr)
        return 2
    where = "" if args.region == "anywhere" else f", defects in the {args.region} third"
    print(
        f"wrote {args.n} images ({', '.join(classes)}{where}) to {root} in {time.perf_counter() - t0:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
