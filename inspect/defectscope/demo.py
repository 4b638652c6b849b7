"""`defectscope demo`: the whole product on the built-in synthetic dataset, as a user would run it.

Each step is the real CLI in a subprocess (synth -> train -> export -> inspect), so the demo proves
the commands a quality engineer types, not an in-process shortcut.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="defectscope demo", description=__doc__)
    p.add_argument("--workdir", type=Path, default=Path("demo"), help="where data, run, model and report go")
    p.add_argument("--holdout", type=int, default=120, help="held-out synthetic images to inspect")
    p.add_argument("--experiment", default="smoke", help="training experiment config (conf/experiment/)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the training step")
    return p


def _run(step: str, cmd: list[str]) -> None:
    print(f"\n== {step}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"defectscope demo: step '{step}' failed with exit code {rc}")
    print(f"== {step}: done in {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    work = args.workdir.resolve()
    exe = [sys.executable, "-m", "defectscope"]
    run_dir = work / "train"
    holdout = work / "holdout"
    model = work / "model.onnx"
    results = work / "results.jsonl"
    report = work / "report.html"

    _run(
        "train",
        [
            *exe,
            "train",
            f"experiment={args.experiment}",
            f"paths.data_dir={work / 'data'}",
            f"hydra.run.dir={run_dir}",
            *args.overrides,
        ],
    )
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    if not ckpt.is_file():
        raise SystemExit(f"defectscope demo: training finished but {ckpt} is missing")
    _run("export", [*exe, "export", str(ckpt), "-o", str(model)])
    _run("held-out data", [*exe, "synth", str(holdout), "--n", str(args.holdout), "--seed", "20261125"])
    _run(
        "inspect",
        [
            *exe,
            "inspect",
            str(model),
            str(holdout),
            "--recursive",
            "-o",
            str(results),
            "--report",
            str(report),
        ],
    )
    print(f"\nModel:   {model}\nResults: {results}\nReport:  {report}")
    return 0
