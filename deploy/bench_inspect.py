"""Measure `defectscope inspect` on this PC: images/s and peak memory (RSS) of the run.

    python deploy/bench_inspect.py MODEL [--images 2000] [--min-side 96] [--max-side 512]
                                         [--repeat 1] [--workdir DIR] [-- extra inspect options]

Synthetic PNGs (`defectscope synth` surfaces of random size, or with --source simple a dark
texture with bright blobs) are generated once in --workdir;
the inspect run is a real subprocess, timed end to end (start-up and model load included), and
its peak RSS comes from the OS (wait4).  --repeat N lists every image N times via @list.txt,
which shows whether memory stays flat as the number of inputs grows.  Linux/macOS only (wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, lo: int, hi: int, seed: int = 0) -> list[Path]:
    """Dark grey textures of random sizes, every third with a bright disc; made once per folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:06d}.png"
        paths.append(p)
        if p.exists():
            continue
        w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
        arr = rng.integers(10, 70, (h, w), dtype=np.uint8)
        if i % 3 == 0:
            r = max(4, min(w, h) // 6)
            cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
            yy, xx = np.ogrid[:h, :w]
            arr[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 250
        Image.fromarray(arr, "L").save(p, compress_level=1)
    return paths


def synth_images(folder: Path, n: int, lo: int, hi: int) -> list[Path]:
    """The project's own synthetic surfaces (`defectscope synth`), generated once per folder."""
    if not (folder / "manifest.csv").exists():
        cmd = [sys.executable, "-m", "defectscope", "synth", str(folder), "--n", str(n)]
        cmd += ["--min-size", str(lo), "--max-size", str(hi)]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise SystemExit(f"bench_inspect: generating the images failed: {last}")
    return sorted(folder.rglob("*.png"))


def run_inspect(model: str, listing: Path, out: Path, extra: list[str]) -> dict[str, object]:
    cmd = [sys.executable, "-m", "defectscope", "inspect", model, f"@{listing}", "-o", str(out), *extra]
    out.unlink(missing_ok=True)  # rows left by an earlier run must not be counted as this one's
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        stdout, stderr = fo.read().decode(), fe.read().decode()
    rows = 0
    if out.exists():
        with open(out, encoding="utf-8") as f:
            rows = sum(1 for _ in f)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {
        "rows": rows,
        "seconds": round(elapsed, 2),
        "images_per_s": round(rows / elapsed, 1),
        "peak_rss_mib": round(usage.ru_maxrss * scale / 2**20, 1),
        "exit_code": proc.returncode,
        "summary": stdout.strip().splitlines()[0] if stdout.strip() else stderr.strip()[-300:],
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument(
        "--source",
        choices=("synth", "simple"),
        default="synth",
        help="images from `defectscope synth` (default) or a simple built-in generator",
    )
    p.add_argument("--repeat", type=int, default=1, help="list every image this many times")
    p.add_argument("--workdir", default=None, help="where images are generated (kept for reuse)")
    a = p.parse_args(argv)
    if a.images < 1 or a.repeat < 1:
        p.error(f"--images and --repeat must be >= 1, got {a.images} and {a.repeat}")
    if not 16 <= a.min_side <= a.max_side:
        p.error(f"need 16 <= --min-side <= --max-side, got {a.min_side} and {a.max_side}")
    if not os.path.isfile(a.model):
        p.error(f"{a.model}: no such model file; expected an exported model (.onnx)")
    work = Path(a.workdir or Path(tempfile.gettempdir()) / "defectscope-bench")
    folder = work / f"{a.source}_{a.images}_{a.min_side}_{a.max_side}"
    t0 = time.perf_counter()
    make = synth_images if a.source == "synth" else make_images
    paths = make(folder, a.images, a.min_side, a.max_side)
    gen = time.perf_counter() - t0
    listing = work / f"list_{a.images}_x{a.repeat}.txt"
    with open(listing, "w", encoding="utf-8") as f:
        for _ in range(a.repeat):
            f.writelines(f"{q}\n" for q in paths)
    result = run_inspect(a.model, listing, work / "bench.jsonl", extra)
    result.update({"inputs": a.images * a.repeat, "generate_s": round(gen, 1), "extra": " ".join(extra)})
    print(json.dumps(result))
    if result["exit_code"] not in (0, 1):  # 1: some inputs got error rows; anything else: no measurement
        print(f"bench_inspect: inspect failed: {result['summary']}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
